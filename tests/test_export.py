"""The export stage (pipeline/export/): model choice, every format's parity, the manifest."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tinymodels import tiny_convnet

from pipeline.config import ExportConfig, StageError
from pipeline.export import ExportSummary, export
from pipeline.export.formats import onnx_bytes, tflite_bytes, write_tflite_source
from pipeline.export.runtimes import OnnxModel, Parity, TFLiteModel, keras_predict, parity
from pipeline.export.select import choose_model
from pipeline.export.stage import _require_float_parity

IMAGE_SIZE = 32
CLASSES = ["ankle_boot", "sandal", "sneaker"]
FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "tflite_int8", "onnx")


def _write_model(models: Path, name: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = tiny_convnet(IMAGE_SIZE, len(CLASSES))
    model.save(models / f"{name}.keras")
    sidecar = {"class_names": CLASSES, "image_size": IMAGE_SIZE, "model": name}
    (models / f"{name}.json").write_text(json.dumps(sidecar))
    return model


def _write_val_split(root: Path, count: int = 12) -> Path:
    rng = np.random.default_rng(0)
    split = root / "data" / "split"
    split.mkdir(parents=True)
    rows = ["path,class,group"]
    for i in range(count):
        name = CLASSES[i % len(CLASSES)]
        path = root / "data" / "clean" / name / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24 + i, 40, 3), dtype=np.uint8)  # odd sizes: real resize
        Image.fromarray(pixels).save(path)
        rows.append(f"../clean/{name}/{i}.png,{name},g{i}")
    (split / "val.csv").write_text("\n".join(rows) + "\n")
    return split


def _write_metrics(metrics: Path, scores: dict[str, float]) -> None:
    metrics.mkdir(parents=True, exist_ok=True)
    for name, accuracy in scores.items():
        (metrics / f"{name}.json").write_text(
            json.dumps({"accuracy": accuracy, "log_loss": 1 - accuracy})
        )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExportSummary, Path, Path]:
    root = tmp_path_factory.mktemp("export")
    (root / "models").mkdir()
    _write_model(root / "models", "tiny")
    _write_metrics(root / "reports/metrics/models", {"tiny": 0.5})
    split = _write_val_split(root)
    cfg = ExportConfig(representative_images=8, verify_images=12, int8_float_layers=1)
    summary = export(cfg, split, root / "models", root / "reports/metrics/models", root / "export")
    return summary, root / "export", root


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_follows_the_keras_model(
    exported: tuple[ExportSummary, Path, Path], fmt: str
) -> None:
    summary, _, _ = exported
    check = summary.parity[fmt]
    tolerance = {"tflite_float16": 5e-3, "tflite_int8": 0.1}.get(fmt, 1e-4)

    assert check["images"] == 12
    assert check["max_abs_diff"] <= tolerance
    if fmt != "tflite_int8":  # int8 may flip a near-tie of the untrained model; its diff is bounded
        assert check["decisive_agreement"] == 1.0
    if fmt in ("saved_model", "tflite_float32", "onnx"):
        assert check["top1_agreement"] == 1.0


def test_pixel_formats_match_keras_on_images_they_were_not_checked_on(
    exported: tuple[ExportSummary, Path, Path],
) -> None:
    _, out, root = exported
    model = keras.models.load_model(root / "models/tiny.keras")
    pixels = np.random.default_rng(1).uniform(0, 255, (5, IMAGE_SIZE, IMAGE_SIZE, 3))
    reference = keras_predict(model)(pixels.astype(np.float32))

    results = {
        "tflite_float32": parity(reference, TFLiteModel(out / "model_float32.tflite")(pixels)),
        "onnx": parity(reference, OnnxModel(out / "model.onnx")(pixels)),
    }

    assert all(r.max_abs_diff < 1e-4 for r in results.values()), results


def test_saved_model_classifies_encoded_bytes_without_our_code(
    exported: tuple[ExportSummary, Path, Path],
) -> None:
    _, out, root = exported
    files = sorted((root / "data/clean").rglob("*.png"))[:3]
    model = keras.models.load_model(root / "models/tiny.keras")
    decoded = [
        tf.image.resize(tf.io.decode_png(f.read_bytes(), 3), (32, 32), antialias=True)
        for f in files
    ]
    pixels = np.stack([np.clip(np.round(d.numpy()), 0, 255) for d in decoded]).astype(np.float32)

    serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
    result = serve(image_bytes=tf.constant([f.read_bytes() for f in files]))

    assert result["classes"].numpy()[0].astype(str).tolist() == CLASSES
    np.testing.assert_allclose(result["probabilities"].numpy(), model(pixels), atol=1e-6)


def test_quantised_files_store_their_weights_in_the_smaller_type(
    exported: tuple[ExportSummary, Path, Path],
) -> None:
    _, out, _ = exported

    def dtypes(variant: str) -> set[type]:
        interpreter = TFLiteModel(out / f"model_{variant}.tflite").interpreter
        return {detail["dtype"] for detail in interpreter.get_tensor_details()}

    assert np.float16 not in dtypes("float32") and np.int8 not in dtypes("float32")
    assert np.float16 in dtypes("float16")
    assert np.int8 in dtypes("int8")


def test_manifest_and_labels_describe_the_model(exported: tuple[ExportSummary, Path, Path]) -> None:
    _, out, _ = exported
    manifest = json.loads((out / "model.json").read_text())

    assert (out / "labels.txt").read_text().splitlines() == CLASSES
    assert manifest["class_names"] == CLASSES
    assert manifest["input"]["image_size"] == IMAGE_SIZE
    assert manifest["metrics"]["accuracy"] == 0.5
    assert manifest["source"]["file"].endswith("models/tiny.keras")
    assert set(manifest["files"]) == set(FORMATS)
    assert manifest["parity_with_keras"]["onnx"]["top1_agreement"] == 1.0
    assert "antialias=True" in manifest["preprocessing"]
    int8 = manifest["files"]["tflite_int8"]
    assert [t["float_layers"] for t in int8["float_layers_tried"]] == [0, 1]
    assert [op["op"] for op in int8["float_ops"]] == ["CONV_2D"][: int8["float_layers"]]


def _weight_dtypes(data: bytes, tmp_path: Path) -> dict[str, type]:
    """Weighted op → the dtype of its weights, in a TFLite flatbuffer (one op of each kind)."""
    (tmp_path / "dtypes.tflite").write_bytes(data)
    interpreter = TFLiteModel(tmp_path / "dtypes.tflite").interpreter
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    return {
        op["op_name"]: tensors[op["inputs"][1]]["dtype"]
        for op in interpreter._get_ops_details()
        if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")
    }


def _cancelling_first_layer_model() -> keras.Model:
    """A first 1x1 conv whose weights nearly cancel on grey pixels (sum 0.34 of terms near
    100, as MobileNetV2's first depthwise conv on flat image regions): int8 rounding of those
    weights more than doubles its output. A dense layer then holds most of the weights."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3)),
        keras.layers.Conv2D(1, 1, use_bias=False),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(len(CLASSES), activation="softmax"),
    ])  # fmt: skip
    model.layers[0].set_weights([np.array([100.0, -60.0, -39.66]).reshape(1, 1, 3, 1)])
    return model


def test_int8_keeps_a_first_layer_float_when_that_brings_it_near_keras(tmp_path: Path) -> None:
    model = _cancelling_first_layer_model()
    source = write_tflite_source(model, IMAGE_SIZE, tmp_path / "source")
    grey = np.random.default_rng(0).uniform(0, 255, (16, IMAGE_SIZE, IMAGE_SIZE, 1))
    pixels = np.repeat(grey, 3, axis=-1).astype(np.float32)
    reference = keras_predict(model)(pixels)

    float32 = tflite_bytes(source, "float32")
    searched = tflite_bytes(source, "int8", pixels, 2, reference)
    integer = tflite_bytes(source, "int8", pixels, 0, reference)

    errors = [t["kl_divergence"] for t in searched.tried]
    assert len(errors) == 3 and errors[1] < errors[0] / 10
    assert [op["op"] for op in searched.float_ops] == ["CONV_2D"]
    assert _weight_dtypes(searched.data, tmp_path) == {
        "CONV_2D": np.float32,
        "FULLY_CONNECTED": np.int8,
    }
    assert (integer.float_ops, integer.tried) == ([], [])
    assert _weight_dtypes(integer.data, tmp_path) == {
        "CONV_2D": np.int8,
        "FULLY_CONNECTED": np.int8,
    }
    assert len(float32.data) >= 3 * len(searched.data)
    (tmp_path / "int8.tflite").write_bytes(searched.data)
    assert parity(reference, TFLiteModel(tmp_path / "int8.tflite")(pixels)).max_abs_diff < 0.05


def test_best_is_the_highest_by_the_metric_or_lowest_for_losses(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.keras").touch()
    _write_metrics(tmp_path / "metrics", {"a": 0.7, "b": 0.9, "c": 0.8})

    best = choose_model("best", tmp_path, tmp_path / "metrics")
    lowest_loss = choose_model("best", tmp_path, tmp_path / "metrics", "log_loss", False)

    assert best.name == "b"
    assert "b 0.9000, c 0.8000, a 0.7000" in best.reason
    assert lowest_loss.name == "b"


def test_best_skips_scored_models_whose_file_is_gone(tmp_path: Path) -> None:
    (tmp_path / "a.keras").touch()
    _write_metrics(tmp_path / "metrics", {"a": 0.7, "b": 0.9})

    assert choose_model("best", tmp_path, tmp_path / "metrics").name == "a"


def test_a_missing_model_is_named_with_the_params_key(tmp_path: Path) -> None:
    (tmp_path / "baseline.keras").touch()

    with pytest.raises(
        StageError, match=r"nope\.keras: not found \(export\.model is 'nope'; available: baseline\)"
    ):
        choose_model("nope", tmp_path, tmp_path / "metrics")


def test_a_metric_no_model_has_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.keras").touch()
    _write_metrics(tmp_path / "metrics", {"a": 0.7})

    with pytest.raises(StageError, match=r"no numeric 'f2' \(export\.metric\)"):
        choose_model("best", tmp_path, tmp_path / "metrics", "f2")


def test_models_best_reads_the_promoted_copy(tmp_path: Path) -> None:
    best = tmp_path / "best"
    best.mkdir()
    (best / "model.keras").touch()
    (best / "best.json").write_text(
        json.dumps({"model": "baseline", "metric": "accuracy", "value": 0.9})
    )

    chosen = choose_model("models/best", tmp_path, tmp_path / "metrics")

    assert (chosen.name, chosen.keras_path, chosen.metrics) == (
        "baseline",
        best / "model.keras",
        {"accuracy": 0.9},
    )


def test_models_best_without_a_promotion_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no flow run has promoted a model yet"):
        choose_model("models/best", tmp_path, tmp_path / "metrics")


def test_a_float_format_that_disagrees_fails_the_stage_naming_the_key() -> None:
    results = {"tflite_int8": Parity(10, 0.5, 0.4, 0.5), "onnx": Parity(10, 0.8, 0.3, 0.9)}

    with pytest.raises(StageError, match=r"onnx: .* 90\.00% of 10 .*export\.min_float_agreement"):
        _require_float_parity(results, 0.99)


def test_a_flip_between_near_tied_classes_is_not_a_disagreement() -> None:
    keras_probabilities = np.array([[0.501, 0.499], [0.9, 0.1]])
    rounded = np.array([[0.499, 0.501], [0.9, 0.1]])

    result = parity(keras_probabilities, rounded)

    assert (result.top1_agreement, result.decisive_agreement) == (0.5, 1.0)


def test_onnx_without_tf2onnx_fails_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tf2onnx", None)

    with pytest.raises(StageError, match=r"export\.onnx is true but tf2onnx cannot be imported"):
        onnx_bytes(object(), IMAGE_SIZE, 17)
