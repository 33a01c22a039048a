"""tf.data input pipelines from the split CSVs, shared by train, evaluate and predict.

Consumes ``data/split/{train,val,test}.csv`` (columns ``path,class,group``; ``path`` is relative
to the CSV's own folder) and the image files they name. Produces, in memory only, batches of
``(images, labels)``: images are float32 RGB in the 0–255 range, shape
``[batch, image_size, image_size, 3]``; labels are int32 indices into ``class_names`` (the
sorted class names of train.csv). Models do their own rescaling, so every caller feeds the same
raw pixels, and ``load_images`` gives predict exactly the decode + resize that training saw.

Pipeline: file names → parallel read + decode + resize (uint8) → cache → shuffle → batch →
optional on-the-fly augmentation of the uint8 batch → float32 → prefetch.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from pipeline.config import StageError

REQUIRED_COLUMNS = ("path", "class")


@dataclass(frozen=True)
class SplitRows:
    """One split CSV, read and checked: resolved image paths and their class names."""

    csv_path: Path
    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    groups: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_names(self) -> list[str]:
        """Sorted distinct class names: the model's output order when this is train.csv."""
        return sorted(set(self.labels))


def load_split(csv_path: Path | str, *, check_files: bool = True) -> SplitRows:
    """Read one split CSV and resolve each ``path`` against the CSV's own folder.

    Returns the rows in file order. Raises StageError naming the CSV when it is missing, lacks
    the ``path``/``class`` columns or has no rows, and naming the first image file that does not
    exist (when ``check_files``), so a bad split fails before any training starts.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise StageError(f"{csv_path}: split file not found (run the split stage first)")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StageError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise StageError(f"{csv_path}: no rows")
    paths = tuple(csv_path.parent / r["path"] for r in rows)
    if check_files:
        for line, path in enumerate(paths, start=2):
            if not path.is_file():
                raise StageError(f"{csv_path}:{line}: image file not found: {path}")
    return SplitRows(
        csv_path=csv_path,
        paths=paths,
        labels=tuple(r["class"] for r in rows),
        groups=tuple(r.get("group", "") or "" for r in rows),
    )


def label_indices(rows: SplitRows, class_names: Sequence[str]) -> np.ndarray:
    """Map each row's class to its index in ``class_names``.

    Raises StageError naming the CSV and the class when a class is not in ``class_names``.
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(rows.labels) - index.keys())
    if unknown:
        raise StageError(
            f"{rows.csv_path}: class(es) {', '.join(unknown)} not in the model's classes "
            f"({', '.join(class_names)})"
        )
    return np.array([index[label] for label in rows.labels], dtype=np.int32)


def decode_and_resize(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decode PNG/JPEG/GIF/BMP bytes to a uint8 RGB ``[image_size, image_size, 3]`` tensor.

    Grey and RGBA images become RGB; the image is stretched to a square (the crawl keeps the
    original aspect, the models want a fixed input).
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def make_dataset(
    rows: SplitRows,
    class_names: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
    cache: bool = True,
) -> tf.data.Dataset:
    """Build the batched ``(images, labels)`` dataset for one split.

    Decoding runs in parallel (AUTOTUNE); decoded uint8 images are cached in memory after the
    first epoch (``cache``), so later epochs skip disk and decode. Shuffling is seeded and
    reshuffles every epoch; ``augment`` (``make_tf_augment``'s function: uint8 batch → uint8
    batch) runs after the cache so every epoch sees fresh augmentations.

    Returns a ``tf.data.Dataset`` of float32 images (0–255) and int32 labels. Raises StageError
    for classes not in ``class_names``.
    """
    labels = label_indices(rows, class_names)
    files = tf.data.Dataset.from_tensor_slices(([str(p) for p in rows.paths], labels))
    autotune = tf.data.AUTOTUNE

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_and_resize(tf.io.read_file(path), image_size), label

    ds = files.map(load, num_parallel_calls=autotune, deterministic=True)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=autotune)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


@dataclass(frozen=True)
class EpochBatches:
    """Training batches whose order is a function of (seed, epoch) alone.

    ``reshuffle_each_iteration`` draws each epoch's order from a sequence that restarts with the
    process, so a run resumed at epoch k would see epoch 0's order again and drift from the run
    it replaces. Here epoch e is shuffled with its own seed, so ``for_epochs(k, n)`` gives exactly
    the batches an uninterrupted run would have seen from epoch k on (augmentation is seeded by
    the batch's pixels, so it follows). Pass ``steps_per_epoch`` to ``fit``, which then keeps
    one iterator across epochs.
    """

    examples: tf.data.Dataset  # unbatched, unshuffled (and cached) (x, y) pairs
    size: int
    batch_size: int
    seed: int
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None
    as_float: bool = True

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.size // self.batch_size))

    def for_epochs(self, first: int, last: int) -> tf.data.Dataset:
        """The batches of epochs ``first`` .. ``last - 1``, one after the other."""
        seed = tf.constant(self.seed, tf.int64)

        def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
            order = self.examples.shuffle(
                self.size, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False
            )
            return order.batch(self.batch_size)

        ds = tf.data.Dataset.range(first, max(first, last)).flat_map(one_epoch)
        autotune = tf.data.AUTOTUNE
        if self.augment is not None:
            augment = self.augment
            ds = ds.map(lambda x, y: (augment(x), y), num_parallel_calls=autotune)
        if self.as_float:
            ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=autotune)
        return ds.prefetch(autotune)


def epoch_batches(
    rows: SplitRows,
    class_names: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    seed: int,
    augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
    cache: bool = True,
) -> EpochBatches:
    """``make_dataset``'s training batches as EpochBatches (same decode, cache and augment)."""
    labels = label_indices(rows, class_names)
    files = tf.data.Dataset.from_tensor_slices(([str(p) for p in rows.paths], labels))

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_and_resize(tf.io.read_file(path), image_size), label

    examples = files.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cache:
        examples = examples.cache()
    return EpochBatches(examples, len(rows), batch_size, seed, augment)


def load_images(paths: Sequence[Path | str], image_size: int) -> np.ndarray:
    """Load image files exactly as training does, for predict: float32 ``[N, S, S, 3]``, 0–255.

    Raises StageError naming the file when it is missing or not a decodable image.
    """
    images = []
    for path in paths:
        try:
            data = tf.io.read_file(str(path))
            images.append(decode_and_resize(data, image_size).numpy())
        except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as exc:
            reason = "not found" if isinstance(exc, tf.errors.NotFoundError) else "not an image"
            raise StageError(f"{path}: {reason}") from None
    if not images:
        return np.zeros((0, image_size, image_size, 3), dtype=np.float32)
    return np.stack(images).astype(np.float32)
