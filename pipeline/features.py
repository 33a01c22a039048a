"""The transfer stages' feature cache: the frozen backbone run once over a split ("fast" mode).

Consumes a split's rows (``pipeline.dataset.SplitRows``: the split CSV and its images) and the
feature extractor (pixels → the backbone's preprocessing → frozen base,
``models.feature_extractor``). Produces, in the stage's features folder (``data/features/`` for
train-transfer, ``data/features_compare/`` for train-compare), per split:
``<split>_features.npy`` (one feature map per image), ``<split>_labels.npy`` (class indices),
``<split>.csv`` (the image and class behind each row) and ``<split>_features.json``, the resume
marker (``pipeline.resume``): the cache is reused only while the split CSV and everything the
features depend on (seed, image size, batch size, dtype policy, backbone, weights) stay the same.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.config import TrainConfig
from pipeline.dataset import EpochBatches, SplitRows, label_indices, make_dataset
from pipeline.files import atomic_path, write_csv
from pipeline.resume import fingerprint, record, reuse_or_wipe


def _cache_files(features_dir: Path, split: str) -> tuple[Path, Path, Path]:
    return (
        features_dir / f"{split}_features.npy",
        features_dir / f"{split}_labels.npy",
        features_dir / f"{split}.csv",
    )


def cached_features(
    extractor: keras.Model,
    rows: SplitRows,
    class_names: list[str],
    cfg: TrainConfig,
    features_dir: Path,
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of ``rows``: from the cache when still valid, else extracted now.

    Returns ``(features, labels)``.
    """
    feats_path, labels_path, rows_csv = _cache_files(features_dir, split)
    # The seed matters for weights "none" (a randomly initialised base).
    depends_on = {
        "seed": cfg.seed,
        "fit": cfg.fit.model_dump(mode="json", include={"image_size", "batch_size"}),
        "mixed_precision": cfg.fit.mixed_precision,
        "backbone": cfg.transfer.backbone,
        "weights": cfg.transfer.weights,
    }
    described = {
        **depends_on,
        "split_csv": str(rows.csv_path),
        "images": len(rows),
        "class_names": class_names,
    }
    marker = features_dir / f"{split}_features.json"
    fp = fingerprint(depends_on, files=[rows.csv_path])

    def wipe() -> None:
        for path in (feats_path, labels_path, rows_csv):
            path.unlink(missing_ok=True)

    reused = reuse_or_wipe(marker, fp, wipe, described).reused
    if reused and feats_path.is_file() and labels_path.is_file():
        print(f"using cached {split} features from {feats_path}")
        return np.load(feats_path), np.load(labels_path)
    features, labels = _extract(extractor, rows, class_names, cfg, split)
    for path, array in ((feats_path, features), (labels_path, labels)):
        with atomic_path(path) as tmp:
            np.save(tmp, array)
    write_csv(
        rows_csv,
        (
            {"row": i, "path": str(p), "class": c, "label": int(y)}
            for i, (p, c, y) in enumerate(zip(rows.paths, rows.labels, labels, strict=True))
        ),
        ["row", "path", "class", "label"],
    )
    record(marker, fp, {**described, "shape": list(features.shape)})
    return features, labels


def _extract(
    extractor: keras.Model, rows: SplitRows, class_names: list[str], cfg: TrainConfig, split: str
) -> tuple[np.ndarray, np.ndarray]:
    ds = make_dataset(rows, class_names, cfg.fit.image_size, cfg.fit.batch_size, cache=False)
    print(f"extracting {cfg.transfer.backbone} features for {len(rows)} {split} images")
    return extractor.predict(ds, verbose=cfg.verbose), label_indices(rows, class_names)


def feature_std(features: np.ndarray) -> float:
    """The spread of ``features`` (1.0 for constant ones): the head's input scale."""
    std = float(np.std(features.astype(np.float32)))
    return std if std > 0 else 1.0


def features_dataset(
    features: np.ndarray, labels: np.ndarray, cfg: TrainConfig
) -> tf.data.Dataset:
    """Batches of cached features and labels, in order (validation)."""
    ds = tf.data.Dataset.from_tensor_slices((features, labels))
    return ds.batch(cfg.fit.batch_size).prefetch(tf.data.AUTOTUNE)


def feature_batches(features: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> EpochBatches:
    """Training batches of cached features, shuffled with a seed of each epoch's own."""
    examples = tf.data.Dataset.from_tensor_slices((features, labels))
    return EpochBatches(examples, len(labels), cfg.fit.batch_size, cfg.seed, as_float=False)
