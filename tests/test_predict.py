"""Predict: ``predict_images`` (the API) and ``python -m pipeline predict`` (the CLI over it):
top classes per image, JSON output, errors for unreadable files and unloadable models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from tinymodels import tiny_convnet

from pipeline.__main__ import main
from pipeline.config import EvaluateConfig
from pipeline.evaluate import evaluate
from pipeline.predict import ImageError, ModelLoadError, ModelNotFoundError, predict_images

CLASSES = ["cat", "dog"]
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/baseline.keras + baseline.json: a tiny untrained 2-class convnet (seeded)."""
    models = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(1)
    model = tiny_convnet(IMAGE_SIZE, len(CLASSES))
    model.save(models / "baseline.keras")
    sidecar = {"class_names": CLASSES, "image_size": IMAGE_SIZE, "model": "baseline"}
    (models / "baseline.json").write_text(json.dumps(sidecar))
    return models


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder with three valid images (PNG, grey JPEG, nested PNG) and a corrupt PNG."""
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        folder / "nested" / "c.png"
    )
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def predict(*args: str | Path) -> int:
    return main(["predict", *map(str, args)])


def test_prints_a_class_for_every_valid_image_and_an_error_for_a_corrupt_one(
    models_dir: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = predict(images, "--model", "baseline", "--models-dir", models_dir)

    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert code == 1
    assert sorted(line.split(":")[0] for line in lines) == [
        str(images / "a.png"),
        str(images / "b.jpg"),
        str(images / "nested" / "c.png"),
    ]
    assert all(line.split(": ")[1].split()[0] in CLASSES for line in lines)
    assert f"error: {images / 'broken.png'}: not an image" in err


def test_json_gives_top_k_classes_with_probabilities_in_descending_order(
    models_dir: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = predict(
        images / "a.png", "--json", "--top", "2", "--model", "baseline", "--models-dir", models_dir
    )

    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probabilities = [entry["probability"] for entry in record["top"]]
    assert code == 0
    assert record["path"] == str(images / "a.png")
    assert [entry["class"] for entry in record["top"]] != [] and len(record["top"]) == 2
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


def test_json_reports_unreadable_image_as_an_error_record(
    models_dir: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = predict(
        images / "broken.png",
        images / "missing.png",
        "--json",
        "--model",
        "baseline",
        "--models-dir",
        models_dir,
    )

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert {r["path"]: r["error"] for r in records} == {
        str(images / "broken.png"): "not an image",
        str(images / "missing.png"): "no such file or folder",
    }


def test_probabilities_match_the_evaluate_stage_for_the_same_image(
    models_dir: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    split = tmp_path / "split"
    split.mkdir()
    with open(split / "test.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ["path", "class", "group"],
                ["../images/a.png", "cat", "a"],
                ["../images/b.jpg", "dog", "b"],
            ]
        )
    evaluate(EvaluateConfig(models=["baseline"]), split, models_dir, tmp_path / "reports")
    with open(tmp_path / "reports" / "predictions" / "baseline.csv", newline="") as fh:
        expected = {Path(r["path"]).name: float(r["prob_cat"]) for r in csv.DictReader(fh)}
    capsys.readouterr()  # drop evaluate's Keras progress lines

    predict(
        images / "a.png",
        images / "b.jpg",
        "--json",
        "--top",
        "2",
        "--model",
        "baseline",
        "--models-dir",
        models_dir,
    )

    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {
        Path(r["path"]).name: next(e["probability"] for e in r["top"] if e["class"] == "cat")
        for r in records
    }
    assert got == pytest.approx(expected, abs=1e-5)


def test_missing_model_exits_2_naming_the_file_and_available_models(
    models_dir: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = predict(images, "--model", "transfer_finetuned", "--models-dir", models_dir)

    err = capsys.readouterr().err
    assert code == 2
    assert "transfer_finetuned.keras: no such model file (available: baseline)" in err


# --- the API ---------------------------------------------------------------------------------


def test_api_gives_top_classes_per_readable_image_and_an_error_per_unreadable_one(
    models_dir: Path, images: Path
) -> None:
    report = predict_images(models_dir, "baseline", [images, images / "gone.png"], top_k=5)

    assert [p.path for p in report.predictions] == [
        images / "a.png",
        images / "b.jpg",
        images / "nested" / "c.png",
    ]
    for prediction in report.predictions:
        probabilities = [c.probability for c in prediction.top]
        assert sorted(c.class_name for c in prediction.top) == CLASSES  # top 5 of 2 classes
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-9)
    assert report.errors == (
        ImageError(images / "gone.png", "no such file or folder"),
        ImageError(images / "broken.png", "not an image"),
    )
    assert not report.complete and report.model == "baseline"


def test_api_probabilities_match_the_evaluate_stage(
    models_dir: Path, images: Path, tmp_path: Path
) -> None:
    split = tmp_path / "split"
    split.mkdir()
    (split / "test.csv").write_text("path,class,group\n../images/a.png,cat,a\n")
    evaluate(EvaluateConfig(models=["baseline"]), split, models_dir, tmp_path / "reports")
    with open(tmp_path / "reports" / "predictions" / "baseline.csv", newline="") as fh:
        (expected,) = [float(r["prob_cat"]) for r in csv.DictReader(fh)]

    report = predict_images(models_dir, "baseline", [images / "a.png"], top_k=2)

    (prediction,) = report.predictions
    assert report.complete
    assert {c.class_name: c.probability for c in prediction.top}["cat"] == pytest.approx(
        expected, abs=1e-6
    )


def test_api_missing_model_names_the_file_and_the_models_there(
    models_dir: Path, images: Path
) -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such model file \(available: baseline\)"):
        predict_images(models_dir, "transfer_finetuned", [images])


def test_api_damaged_model_is_a_model_load_error(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "baseline.keras").write_bytes(b"not a zip")
    (tmp_path / "baseline.json").write_text((models_dir / "baseline.json").read_text())

    with pytest.raises(ModelLoadError, match=r"baseline\.keras: cannot load model"):
        predict_images(tmp_path, "baseline", [])
