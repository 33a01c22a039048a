"""VGG16 feature extraction: our tf.data pipeline from PNG files vs the in-memory ceiling.

train-transfer's "fast" mode runs the frozen VGG16 base once over every image
(``pipeline.features.cached_features``): read PNG → decode → resize → batch → model, through
``pipeline.dataset.make_dataset``. The ceiling is the same model's ``predict`` on a numpy batch
already decoded and resized in memory (no I/O, no decode). Both use the same model, batch size
and images, measured in this run; the script prints images/s for each and the ratio
pipeline / ceiling (target ≥ 0.80: the input pipeline must keep the model busy).

    python bench/feature_extraction.py                       # 256 images, 64 px, batch 32
    python bench/feature_extraction.py --images 4096 --image-size 180 --batch-size 128   # GPU
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


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--weights", default="hed-bsds500")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from pipeline import models
    from pipeline.dataset import load_split, make_dataset

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
    extractor = models.feature_extractor(
        args.image_size, models.build_vgg16_base(args.image_size, args.weights)
    )

    def pipeline() -> None:
        # cache=False: every repeat pays for reading and decoding, as the single real pass does.
        ds = make_dataset(rows, ["photo"], args.image_size, args.batch_size, cache=False)
        extractor.predict(ds, verbose=0)

    in_memory = np.concatenate(
        [x.numpy() for x, _ in make_dataset(rows, ["photo"], args.image_size, args.batch_size)]
    )

    def ceiling() -> None:
        extractor.predict(in_memory, batch_size=args.batch_size, verbose=0)

    pipeline()  # warm up: traces predict for both input kinds
    ceiling()
    rates = best_rates({"ceiling": ceiling, "pipeline": pipeline}, args.images, args.repeats)
    ceiling_rate, pipeline_rate = rates["ceiling"], rates["pipeline"]
    devices = [d.device_type for d in tf.config.list_physical_devices() if d.device_type != "CPU"]
    where = f"{', '.join(devices)}" if devices else f"CPU only ({os.cpu_count()} cores visible)"
    print(
        f"VGG16 ({args.weights}) features, {args.images} images, {args.image_size} px, "
        f"batch {args.batch_size}, {where}"
    )
    print(f"ceiling  (predict on in-memory numpy): {ceiling_rate:8.1f} images/s")
    print(f"pipeline (tf.data from PNG files):     {pipeline_rate:8.1f} images/s")
    print(f"ratio pipeline / ceiling: {pipeline_rate / ceiling_rate:.2f} (target >= 0.80)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
