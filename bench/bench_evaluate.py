"""How fast the evaluate stage scores a test split, against a naive loop and a physical bound.

    python bench/bench_evaluate.py [--images 300] [--image-size 64] [--classes 3]

Builds a temporary test split of random PNGs and an untrained DLwP baseline model (the weights
do not change the cost), then times:

- naive:   one image at a time — decode it, ``model.predict`` on a batch of one (what a
           straightforward "for each row of test.csv" evaluation does); run on the first
           ``--naive-images`` only, as it is slow, and compared per image;
- stage:   the evaluate stage's path — ``pipeline.dataset.make_dataset`` (parallel decode,
           batched) into one ``model.predict``;
- forward: the bound — ``model.predict`` on images already decoded in memory (no file I/O);
- whole:   ``evaluate()`` end to end: inference plus metrics, CSVs, curves, misclassified grid
           and model card.

stage and forward are the best of ``--repeats`` runs. Prints images/s and the ratios
stage/naive (speed-up over the naive loop) and stage/forward (how close the stage's inference
path comes to the pure-model bound; 1.0 = no I/O overhead).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from pipeline.config import EvaluateConfig
from pipeline.dataset import load_images, load_split, make_dataset
from pipeline.evaluate import evaluate
from pipeline.models import build_baseline


def build_fixture(root: Path, images: int, classes: int, image_size: int) -> list[str]:
    rng = np.random.default_rng(0)
    class_names = [f"class_{i}" for i in range(classes)]
    rows = []
    for i in range(images):
        cls = class_names[i % classes]
        (root / "clean" / cls).mkdir(parents=True, exist_ok=True)
        # Slightly larger than the model input, like cleaned crawl images, so resize is real work.
        pixels = rng.integers(0, 255, (image_size + 16, image_size + 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "clean" / cls / f"{i}.png")
        rows.append([f"../clean/{cls}/{i}.png", cls, str(i)])
    (root / "split").mkdir()
    with open(root / "split" / "test.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "group"])
        writer.writerows(rows)
    model = build_baseline(image_size, classes)
    (root / "models").mkdir()
    model.save(root / "models" / "baseline.keras")
    sidecar = {"class_names": class_names, "image_size": image_size, "model": "baseline"}
    (root / "models" / "baseline.json").write_text(json.dumps(sidecar))
    return class_names


def timed(fn: Callable[[], None], repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls (the least disturbed by other processes)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--naive-images", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import keras

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        class_names = build_fixture(root, args.images, args.classes, args.image_size)
        model = keras.models.load_model(root / "models" / "baseline.keras", compile=False)
        rows = load_split(root / "split" / "test.csv")
        size, batch = args.image_size, args.batch_size

        def stage_path() -> None:
            ds = make_dataset(rows, class_names, size, batch, cache=False)
            model.predict(ds, verbose=0)

        def naive() -> None:
            for path in rows.paths[: args.naive_images]:
                model.predict(load_images([path], size), verbose=0)

        decoded = load_images(rows.paths, size)

        def forward() -> None:
            model.predict(decoded, batch_size=batch, verbose=0)

        def whole() -> None:
            cfg = EvaluateConfig(models=["baseline"], batch_size=batch, image_size=size)
            evaluate(cfg, root / "split", root / "models", root / "reports")

        # Warm up tf.function tracing for both batch shapes so no method pays for it.
        forward()
        model.predict(decoded[:1], verbose=0)
        n = len(rows)
        counts = {"naive": min(n, args.naive_images), "stage": n, "forward": n, "whole": n}
        times = {
            "naive": timed(naive),
            "stage": timed(stage_path, args.repeats),
            "forward": timed(forward, args.repeats),
            "whole": timed(whole),
        }

    rate = {name: counts[name] / seconds for name, seconds in times.items()}
    print(
        f"{n} test images, {args.classes} classes, {size}px, batch {batch}, "
        f"{os.cpu_count()} CPU cores"
    )
    for name, seconds in times.items():
        print(f"  {name:8s} {counts[name]:5d} images {seconds:7.2f} s {rate[name]:8.1f} images/s")
    speedup = rate["stage"] / rate["naive"]
    print(f"speed-up of the stage's inference over the naive loop: {speedup:.1f}x")
    print(
        "stage inference rate / pure forward-pass rate (1.0 = no I/O overhead): "
        f"{rate['stage'] / rate['forward']:.2f}"
    )
    print(f"whole evaluate() time / stage inference time: {times['whole'] / times['stage']:.2f}")


if __name__ == "__main__":
    main()
