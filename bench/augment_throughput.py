"""Images/s of our albumentations transform inside tf.data vs Keras preprocessing layers.

Both pipelines augment the same uint8 images (Fashion-MNIST product photos, resized to
--image-size, grey copied to RGB) with the same augmentation: rotation ±15°, shift ±10 %,
zoom ±10 %, horizontal flip, nearest fill, bilinear resampling. They run in the same process,
interleaved (A, B, A, B, ...) so load from other processes hits both alike; the script prints
the median images/s of each and the ratio albumentations / Keras (target ≥ 1×).

    python bench/augment_throughput.py                 # ~1 min on 2 cores
    python bench/augment_throughput.py --images 8192 --image-size 128 --repeats 5
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from pipeline.augment import make_tf_augment
from pipeline.config import AugmentConfig, TransformsConfig

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def load_images(count: int, image_size: int) -> np.ndarray:
    """``count`` Fashion-MNIST images as uint8 [count, size, size, 3] (random noise without it)."""
    if FASHION_MNIST.exists():
        raw = gzip.decompress(FASHION_MNIST.read_bytes())
        grey = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:count]
        resized = tf.image.resize(grey[..., None], (image_size, image_size)).numpy()
        images = np.repeat(np.clip(resized, 0, 255).astype(np.uint8), 3, axis=-1)
    else:
        print(f"{FASHION_MNIST} not found (apt install dataset-fashion-mnist); using noise")
        images = np.random.default_rng(0).integers(0, 256, (count, image_size, image_size, 3))
    return np.resize(images.astype(np.uint8), (count, image_size, image_size, 3))


def keras_layers_augment(seed: int) -> Callable[[tf.Tensor], tf.Tensor]:
    import keras

    layers = keras.Sequential(
        [
            keras.layers.RandomRotation(15 / 360, fill_mode="nearest", seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed),
            keras.layers.RandomZoom(0.1, fill_mode="nearest", seed=seed),
            keras.layers.RandomFlip("horizontal", seed=seed),
        ]
    )

    def augment(images: tf.Tensor) -> tf.Tensor:
        # The layers compute in float; the trainers' models take uint8-range input either way.
        out = layers(tf.cast(images, tf.float32), training=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    return augment


def albumentations_augment(seed: int, image_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    transforms = TransformsConfig(
        rotation_range=15,
        width_shift_range=0.1,
        height_shift_range=0.1,
        zoom_range=0.1,
        shear_range=0,
        horizontal_flip=True,
        brightness_contrast_p=0,
        crop_p=0,
        fill_mode="nearest",
    )
    return make_tf_augment(AugmentConfig(seed=seed, transforms=transforms), image_size)


def images_per_second(
    images: np.ndarray, augment: Callable[[tf.Tensor], tf.Tensor], batch_size: int
) -> float:
    ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    started = time.perf_counter()
    seen = 0
    for batch in ds:
        seen += int(batch.shape[0])
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each pipeline")
    args = parser.parse_args()

    images = load_images(args.images, args.image_size)
    contenders = {
        "albumentations in tf.data": albumentations_augment(42, args.image_size),
        "keras preprocessing layers": keras_layers_augment(42),
    }
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for augment in contenders.values():  # warm-up: tracing, thread pools
        images_per_second(images[: args.batch_size * 4], augment, args.batch_size)
    for _ in range(args.repeats):
        for name, augment in contenders.items():
            rates[name].append(images_per_second(images, augment, args.batch_size))

    print(
        f"{args.images} images {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs, {args.repeats} interleaved passes each (median images/s):"
    )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, median in medians.items():
        spread = ", ".join(f"{v:.0f}" for v in rates[name])
        print(f"  {name:28s} {median:8.0f} images/s  (passes: {spread})")
    ratio = medians["albumentations in tf.data"] / medians["keras preprocessing layers"]
    print(f"ratio albumentations / keras layers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
