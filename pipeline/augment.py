"""Augment stage: albumentations transforms for the training images, and a preview of them.

Consumes ``data/split/train.csv`` (path, class, group; paths relative to the CSV's folder) and the
``augment`` section of params.yaml. Produces:

- ``reports/augment_preview.png``: each of ``preview.images`` training images beside
  ``preview.variants`` augmentations of it (a DVC plot).
- ``data/augmented/``: in ``mode: offline``, ``copies`` augmented PNGs per training image in
  ``images/<class>/<source stem>_<k>.png``, listed in ``manifest.csv`` (path, class, group,
  source, copy; paths relative to data/augmented)
  and, for training, ``train.csv`` (the originals plus the copies, split-CSV columns, paths
  relative to ``data/augmented``), with ``params.json`` recording what the copies were made
  with (``pipeline.resume``: other params wipe them). In ``mode: on_the_fly`` (the default)
  only an empty manifest, because the trainers augment each batch as it is read
  (:func:`make_tf_augment`), so every epoch sees new variants. Validation and test images are
  never read here.

The trainers use :func:`make_tf_augment` inside tf.data; :func:`build_transform` is the same
albumentations pipeline for one image. Both are deterministic given ``cfg.seed``: each batch's
random draws are seeded from (seed, the batch's pixels, how many times this augmenter has seen
it), so results do not depend on thread scheduling in a parallel ``ds.map``. The stateful
albumentations pipelines are cached per thread, never shared between threads.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from pipeline.config import AugmentConfig, StageError, TransformsConfig
from pipeline.files import atomic_path, read_csv, write_csv
from pipeline.resume import fingerprint, reuse_or_wipe

if TYPE_CHECKING:
    import tensorflow as tf

# Keras ImageDataGenerator's fill_mode names → OpenCV border modes (same pixel semantics).
FILL_MODES = {
    "nearest": cv2.BORDER_REPLICATE,  # aaaaaaaa|abcd|dddddddd
    "reflect": cv2.BORDER_REFLECT,  # abcddcba|abcd|dcbaabcd
    "wrap": cv2.BORDER_WRAP,  # abcdabcd|abcd|abcdabcd
    "constant": cv2.BORDER_CONSTANT,  # kkkkkkkk|abcd|kkkkkkkk with k = cval
}

MANIFEST_FIELDS = ["path", "class", "group", "source", "copy"]
SPLIT_FIELDS = ["path", "class", "group"]


def _transforms(cfg: TransformsConfig, height: int, width: int) -> list[A.BasicTransform]:
    """The albumentations steps for images of ``height`` × ``width``, in application order."""
    border = {"border_mode": FILL_MODES[cfg.fill_mode], "fill": cfg.cval}
    steps: list[A.BasicTransform] = []
    if cfg.crop_p > 0:
        steps.append(
            A.RandomResizedCrop(size=(height, width), scale=(cfg.crop_scale, 1.0), p=cfg.crop_p)
        )
    # Each Keras knob has its own probability, as the issue asks; knobs that share a probability
    # (all of them by default) share one Affine, because every extra warp resamples the image
    # (blur at small sizes) and costs time. A knob set to 0 adds nothing.
    knobs: list[tuple[float, dict[str, object]]] = []
    if cfg.rotation_range > 0:
        knobs.append((cfg.rotation_p, {"rotate": (-cfg.rotation_range, cfg.rotation_range)}))
    if cfg.width_shift_range > 0 or cfg.height_shift_range > 0:
        translate = {
            "x": (-cfg.width_shift_range, cfg.width_shift_range),
            "y": (-cfg.height_shift_range, cfg.height_shift_range),
        }
        knobs.append((cfg.shift_p, {"translate_percent": translate}))
    if cfg.shear_range > 0:
        # Keras shears along x only, angle in degrees.
        knobs.append((cfg.shear_p, {"shear": {"x": (-cfg.shear_range, cfg.shear_range), "y": 0}}))
    if cfg.zoom_range > 0:
        scale = (1.0 - cfg.zoom_range, 1.0 + cfg.zoom_range)
        knobs.append((cfg.zoom_p, {"scale": scale, "keep_ratio": True}))
    by_probability: dict[float, dict[str, object]] = {}
    for p, kwargs in knobs:
        if p > 0:
            by_probability.setdefault(p, {}).update(kwargs)
    for p, kwargs in by_probability.items():
        steps.append(A.Affine(**kwargs, p=p, **border))
    if cfg.horizontal_flip:
        steps.append(A.HorizontalFlip(p=0.5))
    if cfg.vertical_flip:
        steps.append(A.VerticalFlip(p=0.5))
    if (cfg.brightness_range > 0 or cfg.contrast_range > 0) and cfg.brightness_contrast_p > 0:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=cfg.brightness_range,
                contrast_limit=cfg.contrast_range,
                p=cfg.brightness_contrast_p,
            )
        )
    return steps


def _compose(cfg: AugmentConfig, height: int, width: int) -> A.Compose:
    compose = A.Compose(_transforms(cfg.transforms, height, width), seed=cfg.seed)
    # Compose(seed=) gives every step its own generator started from the same seed, so the steps'
    # draws (apply or not, angle, shift...) would be correlated; one shared stream avoids that.
    compose.set_random_state(np.random.default_rng(cfg.seed), random.Random(cfg.seed))
    return compose


def build_transform(cfg: AugmentConfig, image_size: int) -> A.Compose:
    """Return the albumentations pipeline for ``image_size`` × ``image_size`` training images.

    The result maps ``transform(image=uint8 HxWxC array)["image"]`` to an augmented array of the
    same shape and dtype; given the same ``cfg.seed`` two transforms produce the same sequence.
    """
    return _compose(cfg, image_size, image_size)


def _seed_for(seed: int, key: bytes, count: int) -> int:
    digest = hashlib.blake2b(
        key, digest_size=8, person=b"c2m-aug", salt=seed.to_bytes(8, "little", signed=True)
    )
    digest.update(count.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def _reseed(compose: A.Compose, seed: int) -> None:
    compose.set_random_state(np.random.default_rng(seed), random.Random(seed))


_per_thread = threading.local()


def _seeded_compose(cfg: AugmentConfig, height: int, width: int, seed: int) -> A.Compose:
    """This thread's pipeline for ``height`` × ``width`` images, reseeded with ``seed``.

    A Compose holds its random state, so one shared by tf.data's threads could be reseeded by
    one call while another draws from it; each thread therefore builds (and keeps the 32 most
    recent of) its own. Reseeding sets every draw, so the pixels do not depend on which
    thread's copy ran or what it ran before.
    """
    build = getattr(_per_thread, "build", None)
    if build is None:
        build = _per_thread.build = functools.lru_cache(maxsize=32)(_compose)
    compose = build(cfg, height, width)
    _reseed(compose, seed)
    return compose


class _BatchAugmenter:
    """Augments uint8 batches with this thread's albumentations pipeline for their shape.

    Each call is seeded from (cfg.seed, the batch's pixels, how often this augmenter has seen
    that exact batch): a reshuffled epoch or a repeated batch gets new variants, yet a run is
    reproducible however tf.data schedules parallel calls. Seeding per call rather than per
    image keeps the reseeding cost (a SeedSequence hash) off the per-image path. The count
    table holds one 16-byte key per distinct batch seen.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self._seen: Counter[bytes] = Counter()
        self._lock = threading.Lock()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        key = hashlib.blake2b(images.data, digest_size=16).digest()
        with self._lock:
            count = self._seen[key]
            self._seen[key] = count + 1
        single = images.ndim == 3
        batch = images[None] if single else images
        seed = _seed_for(self.cfg.seed, key, count)
        transform = _seeded_compose(self.cfg, batch.shape[1], batch.shape[2], seed)
        out = np.empty_like(batch)
        for i, image in enumerate(batch):
            out[i] = transform(image=image)["image"]
        return out[0] if single else out


def make_tf_augment(cfg: AugmentConfig, image_size: int) -> Callable[[tf.Tensor], tf.Tensor]:
    """Return ``fn(images) -> images`` for ``ds.map``: the albumentations pipeline in tf.data.

    ``images`` is a uint8 tensor [B, H, W, C] (or one image [H, W, C]), normally with
    H = W = ``image_size``; the result has the same shape and dtype. Labels are untouched: map
    ``lambda x, y: (fn(x), y)``. Deterministic given ``cfg.seed`` and the order of the dataset
    (not the scheduling of parallel calls). Raises TypeError at trace time for a non-uint8 input.
    """
    import tensorflow as tf

    augmenter = _BatchAugmenter(cfg)
    # Built now, on this thread, so the first training batch does not pay for it.
    _seeded_compose(cfg, image_size, image_size, cfg.seed)

    def augment_images(images: tf.Tensor) -> tf.Tensor:
        if images.dtype != tf.uint8:
            raise TypeError(
                f"make_tf_augment expects uint8 images (raw pixels), got {images.dtype.name}; "
                "augment before casting or rescaling"
            )
        augmented = tf.numpy_function(augmenter, [images], tf.uint8, stateful=True)
        augmented.set_shape(images.shape)
        return augmented

    return augment_images


@dataclass
class AugmentSummary:
    mode: str
    train_images: int
    copies_written: int
    copies_reused: int
    preview: Path

    def __str__(self) -> str:
        if self.mode == "offline":
            done = f"{self.copies_written} augmented copies written"
            if self.copies_reused:
                done += f" ({self.copies_reused} more kept from an interrupted run)"
            done += f" for {self.train_images} training images"
        else:
            done = f"on-the-fly mode: {self.train_images} training images augmented during training"
        return f"{done}; preview {self.preview}"


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise StageError(
            f"{path}: image listed in the split is missing; rerun clean and split"
        ) from None
    except OSError as exc:
        raise StageError(f"{path}: cannot read image: {exc}") from None


def _read_train(split_dir: Path) -> list[dict[str, str]]:
    train_csv = split_dir / "train.csv"
    if not train_csv.exists():
        raise StageError(f"{train_csv}: not found; run the split stage first")
    rows = read_csv(train_csv)
    for number, row in enumerate(rows, start=2):
        missing = [key for key in SPLIT_FIELDS if not row.get(key)]
        if missing:
            raise StageError(f"{train_csv}:{number}: row lacks {', '.join(missing)}")
    if not rows:
        raise StageError(f"{train_csv}: no training images; check the split stage's report")
    return rows


def _augmented_copy(cfg: AugmentConfig, image: np.ndarray, source: str, copy: int) -> np.ndarray:
    """Copy number ``copy`` of one image: seeded by (seed, source path, copy), order-free."""
    seed = _seed_for(cfg.seed, source.encode(), copy)
    return _seeded_compose(cfg, image.shape[0], image.shape[1], seed)(image=image)["image"]


def _preview_sources(cfg: AugmentConfig, rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """``preview.images`` training rows, taking classes in turn, each class in a seeded order."""
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    queues = [
        sorted(members, key=lambda r: _seed_for(cfg.seed, r["path"].encode(), 0))
        for _, members in sorted(by_class.items())
    ]
    chosen: list[dict[str, str]] = []
    depth = 0
    while len(chosen) < min(cfg.preview.images, len(rows)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < cfg.preview.images:
                chosen.append(queue[depth])
        depth += 1
    return chosen


def write_preview(
    cfg: AugmentConfig, split_dir: Path, rows: list[dict[str, str]], preview: Path
) -> Path:
    """Write a PNG grid: each row one training image, then ``preview.variants`` augmentations.

    Returns ``preview``. Raises StageError for an unreadable image.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = _preview_sources(cfg, rows)
    columns = 1 + cfg.preview.variants
    fig, axes = plt.subplots(
        len(sources), columns, figsize=(1.4 * columns, 1.5 * len(sources)), squeeze=False
    )
    for r, row in enumerate(sources):
        image = _load_rgb(split_dir / row["path"])
        cells = [image] + [
            _augmented_copy(cfg, image, row["path"], k) for k in range(cfg.preview.variants)
        ]
        for c, cell in enumerate(cells):
            axis = axes[r][c]
            axis.imshow(cell, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(row["class"], fontsize=8)
            if r == 0:
                axis.set_title("original" if c == 0 else f"augmented {c}", fontsize=8)
    fig.suptitle(f"augment preview (seed {cfg.seed})", fontsize=9)
    fig.tight_layout()
    with atomic_path(preview) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return preview


def _discard_stale_copies(cfg: AugmentConfig, out: Path) -> None:
    """Remove copies made with other params (or of unknown origin): they would mix in silently.

    ``out/params.json`` records the fingerprint of everything but the preview knobs.
    """
    images_dir = out / "images"

    def wipe() -> None:
        shutil.rmtree(images_dir, ignore_errors=True)

    described = cfg.model_dump(mode="json", exclude={"preview"})
    reuse_or_wipe(out / "params.json", fingerprint(described), wipe, described)


def _write_offline(
    cfg: AugmentConfig, split_dir: Path, rows: list[dict[str, str]], out: Path
) -> tuple[int, int]:
    """Write ``cfg.copies`` augmented PNGs per training image; return (written, reused)."""
    from tqdm import tqdm

    _discard_stale_copies(cfg, out)
    manifest: list[dict[str, object]] = []
    written = reused = 0
    for row in tqdm(rows, desc="augment", unit="img"):
        source = split_dir / row["path"]
        # Like every path in the manifest: relative to the manifest's own folder.
        source_relative = Path(os.path.relpath(source, out)).as_posix()
        image: np.ndarray | None = None
        for copy in range(cfg.copies):
            relative = f"images/{row['class']}/{Path(row['path']).stem}_{copy}.png"
            target = out / relative
            if target.exists():
                reused += 1
            else:
                if image is None:
                    image = _load_rgb(source)
                augmented = _augmented_copy(cfg, image, row["path"], copy)
                with atomic_path(target) as tmp:
                    Image.fromarray(augmented).save(tmp, format="PNG")
                written += 1
            manifest.append(
                {
                    "path": relative,
                    "class": row["class"],
                    "group": row["group"],
                    "source": source_relative,
                    "copy": copy,
                }
            )
    write_csv(out / "manifest.csv", manifest, MANIFEST_FIELDS)
    originals = [
        {
            "path": Path(os.path.relpath(split_dir / r["path"], out)).as_posix(),
            "class": r["class"],
            "group": r["group"],
        }
        for r in rows
    ]
    # The originals plus their copies: a drop-in train.csv for training on the offline set.
    write_csv(out / "train.csv", originals + manifest, SPLIT_FIELDS)
    return written, reused


def augment(cfg: AugmentConfig, split_dir: Path, out: Path, preview: Path) -> AugmentSummary:
    """Write the augmentation preview and, in offline mode, augmented copies of train images.

    Reads only ``train.csv`` of ``split_dir``: validation and test images are never augmented.
    Returns an AugmentSummary. Raises StageError when train.csv is missing or empty or an image
    in it cannot be read. A killed offline run resumes: copies already on disk are kept.
    """
    split_dir, out = Path(split_dir), Path(out)
    rows = _read_train(split_dir)
    write_preview(cfg, split_dir, rows, Path(preview))
    written = reused = 0
    if cfg.mode == "offline":
        written, reused = _write_offline(cfg, split_dir, rows, out)
    else:
        # Leftovers of an earlier offline run must not look current; the empty manifest says
        # "nothing materialised" and keeps DVC's declared output present.
        if (out / "images").exists():
            shutil.rmtree(out / "images")
        for stale in ("train.csv", "params.json"):
            (out / stale).unlink(missing_ok=True)
        write_csv(out / "manifest.csv", [], MANIFEST_FIELDS)
    return AugmentSummary(cfg.mode, len(rows), written, reused, Path(preview))
