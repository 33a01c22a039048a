"""Export stage: ship one trained model as SavedModel, TFLite (float32/float16/int8) and ONNX.

Consumes ``export:`` in params.yaml, ``reports/metrics/models/<model>.json`` (to choose the best
model and to record its test metrics), ``models/<model>.keras`` with its sidecar json (or the
flow's ``models/best/``), and ``data/split/val.csv`` with the images it names (int8 calibration
and the parity check). Produces ``models/export/``:

- ``saved_model/``, ``model_{float32,float16,int8}.tflite``, ``model.onnx`` (``formats``); int8
  may keep up to its first ``export.int8_float_layers`` weighted layers in float;
- ``labels.txt``: one class name per line, in output order;
- ``model.json``: input size and preprocessing, class order, the source model and why it was
  chosen, its test metrics, each file's size and sha256, and each format's parity with the Keras
  model on validation images; for int8, which ops stayed float.

The folder is built beside the target and swapped in whole, so a killed run leaves the previous
export or the new one. A float format whose top class differs from the Keras model's on more
than ``1 - export.min_float_agreement`` of the check images fails the stage (StageError); an
image where Keras' top two classes are within ``runtimes.TIE`` counts as agreeing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ExportConfig, StageError
from pipeline.export import formats
from pipeline.export.runtimes import (
    OnnxModel,
    Parity,
    SavedModelBytes,
    TFLiteModel,
    keras_predict,
    parity,
)
from pipeline.export.select import ChosenModel, choose_model
from pipeline.files import atomic_write_json, atomic_write_text

FLOAT_FORMATS = ("saved_model", "tflite_float32", "tflite_float16", "onnx")
PREPROCESSING = (
    "Decode the image (JPEG, PNG, GIF first frame, BMP, WebP) to RGB (grey is repeated, alpha "
    "dropped); resize to image_size x image_size, stretching (no crop), with bilinear "
    "antialiased resampling (tf.image.resize(..., antialias=True)); round and clip to 0-255; "
    "feed float32 NHWC pixels in 0-255. The model rescales them itself. The SavedModel's "
    "serving_default signature does all of this from the encoded bytes."
)


@dataclass(frozen=True)
class ExportSummary:
    """What the export stage wrote: the model, each format's size and its parity check."""

    model: str
    reason: str
    sizes: dict[str, int]  # format → bytes on disk
    parity: dict[str, dict[str, float | int]]  # format → Parity.as_dict()

    def __str__(self) -> str:
        sizes = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in self.sizes.items())
        worst = min((p["top1_agreement"] for p in self.parity.values()), default=1.0)
        return (
            f"exported {self.model} ({self.reason}): {sizes}; every format agrees with Keras "
            f"on at least {worst:.1%} of the check images"
        )


def _evenly_spaced(items: tuple[Path, ...], count: int) -> list[Path]:
    if count >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_formats(
    cfg: ExportConfig, loaded: Any, representative: np.ndarray, out: Path
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """Write every configured format into ``out``; returns format → path, and format → what
    model.json says about how it was quantised (int8 only)."""
    from pipeline.files import atomic_write_bytes

    notes: dict[str, dict[str, Any]] = {}
    written = {
        "saved_model": formats.write_saved_model(
            loaded.model, loaded.class_names, loaded.image_size, out / formats.SAVED_MODEL
        )
    }
    if cfg.tflite:
        source = formats.write_tflite_source(loaded.model, loaded.image_size, out / ".tflite")
        reference = None
        if "int8" in cfg.tflite and cfg.int8_float_layers:
            reference = keras_predict(loaded.model, batch_size=64)(representative)
        for variant in cfg.tflite:
            converted = formats.tflite_bytes(
                source, variant, representative, cfg.int8_float_layers, reference
            )
            path = atomic_write_bytes(out / formats.tflite_file(variant), converted.data)
            written[f"tflite_{variant}"] = path
            if variant == "int8":
                kept = converted.float_ops
                notes["tflite_int8"] = {
                    "float_layers": sum(op["op"] in formats.WEIGHTED_OPS for op in kept),
                    "float_ops": kept,
                    "float_layers_tried": converted.tried,
                }
        shutil.rmtree(source)
    if cfg.onnx:
        data = formats.onnx_bytes(loaded.model, loaded.image_size, cfg.onnx_opset)
        written["onnx"] = atomic_write_bytes(out / formats.ONNX_FILE, data)
    return written, notes


def check_parity(
    written: dict[str, Path], reference: np.ndarray, pixels: np.ndarray, encoded: list[bytes]
) -> dict[str, Parity]:
    """Each written format's parity with the Keras probabilities ``reference`` on the same
    images (the SavedModel from their encoded bytes, the others from decoded pixels)."""
    results: dict[str, Parity] = {}
    for name, path in written.items():
        if name == "saved_model":
            probabilities = SavedModelBytes(path)(encoded)
        elif name == "onnx":
            probabilities = OnnxModel(path)(pixels)
        else:
            probabilities = TFLiteModel(path)(pixels)
        results[name] = parity(reference, probabilities)
    return results


def _require_float_parity(results: dict[str, Parity], minimum: float) -> None:
    for name, result in results.items():
        if name in FLOAT_FORMATS and result.decisive_agreement < minimum:
            raise StageError(
                f"{name}: top class agrees with the Keras model on only "
                f"{result.decisive_agreement:.2%} of {result.images} validation images, near-ties "
                f"excused (export.min_float_agreement is {minimum:.2%}); max probability "
                f"difference {result.max_abs_diff:.3g}"
            )


def describe_model(chosen: ChosenModel, loaded: Any) -> dict[str, Any]:
    """What a client needs to know about the model: input, preprocessing, classes, source,
    test metrics and training record. Shared by model.json and the app's ``GET /model``."""
    return {
        "name": chosen.name,
        "class_names": list(loaded.class_names),
        "input": {
            "image_size": loaded.image_size,
            "shape": [None, loaded.image_size, loaded.image_size, 3],
            "dtype": "float32",
            "color": "RGB",
            "range": [0, 255],
        },
        "preprocessing": PREPROCESSING,
        "output": "probabilities: float32 [N, len(class_names)], softmax, in class_names order",
        "source": {
            "file": chosen.keras_path.as_posix(),
            "sidecar": chosen.sidecar_path.as_posix(),
            "chosen_because": chosen.reason,
        },
        "metrics": {"split": "test", **chosen.metrics},
        "training": loaded.sidecar,
    }


def _versions(onnx: bool) -> dict[str, str]:
    import keras
    import tensorflow as tf

    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    if onnx:
        import onnxruntime
        import tf2onnx

        versions |= {"tf2onnx": tf2onnx.__version__, "onnxruntime": onnxruntime.__version__}
    return versions


def _write_manifest(
    out: Path,
    description: dict[str, Any],
    written: dict[str, Path],
    notes: dict[str, dict[str, Any]],
    results: dict[str, Parity],
    onnx: bool,
) -> None:
    atomic_write_text(out / "labels.txt", "".join(f"{c}\n" for c in description["class_names"]))
    files = {
        name: {
            "path": path.relative_to(out).as_posix(),
            "bytes": _size(path),
            **({"sha256": _sha256(path)} if path.is_file() else {}),
            **notes.get(name, {}),
        }
        for name, path in written.items()
    }
    files["saved_model"] |= {
        "signatures": {
            "serving_default": "image_bytes: string [N] (encoded images) -> classes: string "
            "[N, C], probabilities: float32 [N, C]",
            formats.PIXEL_SIGNATURE: "images: float32 [N, S, S, 3] -> probabilities",
        }
    }
    checks = {name: result.as_dict() for name, result in results.items()}
    manifest = {
        **description,
        "files": files,
        "parity_with_keras": {"check_images": "evenly spaced rows of data/split/val.csv", **checks},
        "versions": _versions(onnx),
    }
    atomic_write_json(out / "model.json", manifest)


def _swap_in(staged: Path, target: Path) -> None:
    """Replace ``target`` with ``staged`` by renames: readers see the old folder or the new."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists():
        shutil.rmtree(old)


def export(
    cfg: ExportConfig, split_dir: Path, models_dir: Path, metrics_dir: Path, out_dir: Path
) -> ExportSummary:
    """Export the model ``cfg.model`` names into ``out_dir`` in every configured format.

    Returns an ExportSummary. Raises StageError naming the file or params key when the model,
    its metrics or val.csv is missing, when ONNX conversion fails, or when a float format
    disagrees with the Keras model (``export.min_float_agreement``).
    """
    from pipeline.dataset import load_images, load_split
    from pipeline.predict import load_model

    chosen = choose_model(cfg.model, models_dir, metrics_dir, cfg.metric, cfg.higher_is_better)
    loaded = load_model(chosen.keras_path.parent, chosen.keras_path.stem)
    val = load_split(Path(split_dir) / "val.csv")
    representative = load_images(
        _evenly_spaced(val.paths, cfg.representative_images), loaded.image_size
    )
    check_paths = _evenly_spaced(val.paths, cfg.verify_images)
    pixels = load_images(check_paths, loaded.image_size)
    reference = keras_predict(loaded.model)(pixels)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staged.chmod(0o755)  # mkdtemp's 0700 would hide the export from other users
    try:
        written, notes = _write_formats(cfg, loaded, representative, staged)
        results = check_parity(written, reference, pixels, [p.read_bytes() for p in check_paths])
        _require_float_parity(results, cfg.min_float_agreement)
        _write_manifest(staged, describe_model(chosen, loaded), written, notes, results, cfg.onnx)
        _swap_in(staged, out_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged)
    sizes = {name: _size(out_dir / path.relative_to(staged)) for name, path in written.items()}
    return ExportSummary(
        chosen.name, chosen.reason, sizes, {n: r.as_dict() for n, r in results.items()}
    )
