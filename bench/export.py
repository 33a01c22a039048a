"""Each exported format against the Keras model it came from, on the whole test split.

Claim (issue "Ship the model"): float formats agree with Keras on >= 99.9 % of test images; int8
loses <= 1 accuracy point and is >= 3x smaller than float32 TFLite. The int8 lines say which ops
the export kept in float (export.int8_float_layers) and the error of each prefix it tried.

Run in a project that has run the pipeline up to evaluate (reads models/, reports/metrics/models/
and data/split/). By default it exports ``--model`` (default: params.yaml's export.model) into a
temporary folder with params.yaml's export settings, so models/export is left alone; with
``--export-dir models/export`` it measures an existing export instead.

Per format: file size, median latency per image at batch 1 on this CPU (the SavedModel from
encoded bytes, so its decode + resize is included; the others from decoded pixels), top-1
agreement with Keras, max absolute probability difference, test accuracy; and the size and
latency ratios against the Keras model (the .keras file; ``model(x)`` at batch 1).

    python bench/export.py                      # export.model from params.yaml
    python bench/export.py --model transfer_finetuned
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pipeline import paths  # noqa: E402
from pipeline.config import load_params  # noqa: E402


def median_latency_ms(run_one: Callable[[int], Any], count: int, warmup: int = 5) -> float:
    """Median wall time of ``run_one(i)`` over ``count`` calls, after ``warmup`` calls."""
    for i in range(warmup):
        run_one(i % count)
    times = []
    for i in range(count):
        started = time.perf_counter()
        run_one(i)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def export_into(model: str | None, params: Path, out: Path) -> Path:
    from pipeline.export import export

    cfg = load_params(params).export
    if model:
        cfg = cfg.model_copy(update={"model": model})
    started = time.perf_counter()
    summary = export(cfg, paths.SPLIT, paths.MODELS, paths.MODEL_METRICS, out)
    print(f"export: {summary.model} in {time.perf_counter() - started:.1f}s ({summary.reason})")
    return out


def runners(export_dir: Path) -> dict[str, tuple[Path, Any]]:
    """Format → (file, callable on pixels or bytes), for the formats present in export_dir."""
    from pipeline.export.runtimes import OnnxModel, SavedModelBytes, TFLiteModel

    found: dict[str, tuple[Path, Any]] = {}
    if (export_dir / "saved_model").is_dir():
        saved_model = export_dir / "saved_model"
        found["saved_model"] = (saved_model, SavedModelBytes(saved_model))
    for variant in ("float32", "float16", "int8"):
        path = export_dir / f"model_{variant}.tflite"
        if path.is_file():
            found[f"tflite_{variant}"] = (path, TFLiteModel(path))
    if (export_dir / "model.onnx").is_file():
        found["onnx"] = (export_dir / "model.onnx", OnnxModel(export_dir / "model.onnx"))
    return found


def size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def bench(export_dir: Path, latency_images: int) -> list[dict[str, Any]]:
    from pipeline.dataset import load_images, load_split
    from pipeline.export.runtimes import keras_predict, parity
    from pipeline.predict import load_model

    manifest = json.loads((export_dir / "model.json").read_text())
    keras_path = Path(manifest["source"]["file"])
    loaded = load_model(keras_path.parent, keras_path.stem)
    test = load_split(paths.SPLIT / "test.csv")
    pixels = load_images(test.paths, loaded.image_size)
    encoded = [p.read_bytes() for p in test.paths]
    truth = np.array([loaded.class_names.index(label) for label in test.labels])
    keras_fn = keras_predict(loaded.model)
    reference = np.concatenate([keras_fn(pixels[i : i + 64]) for i in range(0, len(pixels), 64)])
    count = min(latency_images, len(pixels))

    rows = [{
        "format": "keras", "bytes": keras_path.stat().st_size,
        "ms": median_latency_ms(lambda i: keras_fn(pixels[i : i + 1]), count),
        "agreement": 1.0, "max_diff": 0.0, "accuracy": float(np.mean(reference.argmax(1) == truth)),
    }]  # fmt: skip
    for name, (path, run) in runners(export_dir).items():
        if name == "saved_model":
            probabilities = np.concatenate(
                [run(encoded[i : i + 64]) for i in range(0, len(encoded), 64)]
            )
            ms = median_latency_ms(lambda i, run=run: run(encoded[i : i + 1]), count)
        else:
            probabilities = run(pixels)
            ms = median_latency_ms(lambda i, run=run: run(pixels[i : i + 1]), count)
        match = parity(reference, probabilities)
        rows.append({
            "format": name, "bytes": size_of(path), "ms": ms,
            "agreement": match.top1_agreement, "max_diff": match.max_abs_diff,
            "accuracy": float(np.mean(probabilities.argmax(1) == truth)),
        })  # fmt: skip
    print(f"model {manifest['name']}: {len(pixels)} test images, latency = median of {count}")
    int8 = manifest["files"].get("tflite_int8", {})
    if "float_ops" in int8:
        kept = ", ".join(f"{op['op']} {op['output'].split(';')[0]}" for op in int8["float_ops"])
        tried = ", ".join(
            f"{t['float_layers']}: {t['kl_divergence']:.3g}" for t in int8["float_layers_tried"]
        )
        print(f"int8 keeps {int8['float_layers']} weighted layers float: {kept or 'none'}")
        print(f"int8 mean KL from Keras on the val images by float layers tried: {tried or '-'}")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    keras = rows[0]
    print(
        f"{'format':<15}{'size MB':>9}{'x keras':>9}{'ms/img':>9}{'x keras':>9}"
        f"{'top-1 agree':>13}{'max |dp|':>10}{'accuracy':>10}{'d acc pts':>11}"
    )
    for row in rows:
        print(
            f"{row['format']:<15}{row['bytes'] / 1e6:>9.2f}{row['bytes'] / keras['bytes']:>9.2f}"
            f"{row['ms']:>9.2f}{row['ms'] / keras['ms']:>9.2f}{row['agreement']:>13.2%}"
            f"{row['max_diff']:>10.2g}{row['accuracy']:>10.2%}"
            f"{100 * (row['accuracy'] - keras['accuracy']):>+11.2f}"
        )
    by_name = {row["format"]: row for row in rows}
    if "tflite_int8" in by_name and "tflite_float32" in by_name:
        ratio = by_name["tflite_float32"]["bytes"] / by_name["tflite_int8"]["bytes"]
        print(f"int8 is {ratio:.2f}x smaller than float32 TFLite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="best | a model name | models/best (default: params)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--export-dir", type=Path, help="measure this export instead")
    parser.add_argument("--latency-images", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        export_dir = args.export_dir or export_into(args.model, args.params, Path(tmp) / "export")
        print_table(bench(export_dir, args.latency_images))


if __name__ == "__main__":
    main()
