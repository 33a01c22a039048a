"""The audit's feature cache: one pooled backbone feature vector per image, keyed by content hash.

Consumes image files with their sha256 (``inputs.AuditImage``) and the transfer model's backbone
(``train.transfer.backbone``, ``weights`` and input size through ``models.build_base`` and
``models.feature_extractor``: pixels → the backbone's preprocessing → frozen conv base → each
output in ``POOLED_LAYERS`` averaged over space). Produces ``data/audit/features/``:

- ``features.json``: the resume marker (``pipeline.resume``): backbone, weights, image size (and
  the seed for randomly initialised weights). Any change wipes the cache.
- ``part-<n>.npz``: ``sha256`` (str) and ``features`` (float32 ``[n, d]``) arrays, one file per
  extracted chunk, so a killed run keeps what it finished and a re-crawl computes only new images.

Where it runs: in this process, or with ``audit.dask_address`` on that Dask cluster's workers,
one ``CHUNK`` of images per task (``pipeline.fanout``); each worker process builds the extractor
once and reads the images by path, so workers must see the project folder at the same path (a
shared file system, as for clean and the crawl). This process writes each part as its chunk
comes back; the features are the same as in-process ones (same chunks, same batches).

Why not share ``data/features`` (train-transfer's cache): that folder is train-transfer's DVC
output, so reading or writing it here would tie the two stages' outputs together; and it stores
whole feature maps per split CSV, invalidated whenever a CSV changes, while the audit wants one
vector per image that outlives any split.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import AuditConfig, StageError
from pipeline.fanout import built_once, dask_map, weights_stamp, worker_weights
from pipeline.files import atomic_path
from pipeline.resume import fingerprint, reuse_or_wipe

if TYPE_CHECKING:
    import keras

CHUNK = 256  # images per saved part: what a killed run can lose at most
MAX_PARTS = 32  # more parts than this are merged into one on the next run
# Conv-base outputs averaged over space and concatenated into the audit's vector, per backbone;
# others use their last output. VGG16: block 4 separates look-alike classes best, block 5 foreign
# images; together they beat either (measured on bench/audit.py's classes, bench/RESULTS.md).
POOLED_LAYERS: dict[str, tuple[str, ...]] = {
    "vgg16": ("block3_pool", "block4_pool", "block5_pool"),
}


def _depends_on(cfg: AuditConfig) -> dict[str, object]:
    depends: dict[str, object] = {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "pooled": POOLED_LAYERS.get(cfg.backbone, "last"),
    }
    if cfg.weights == "none":  # random initialisation: the seed decides the weights
        depends["seed"] = cfg.seed
    return depends


def _read_parts(cache: Path) -> dict[str, np.ndarray]:
    vectors: dict[str, np.ndarray] = {}
    for part in sorted(cache.glob("part-*.npz")):
        try:
            with np.load(part) as data:
                for sha, row in zip(data["sha256"], data["features"], strict=True):
                    vectors[str(sha)] = row
        except (OSError, ValueError, KeyError):
            part.unlink()  # unreadable: recompute its images rather than fail
    return vectors


def _write_part(cache: Path, shas: Sequence[str], features: np.ndarray) -> None:
    taken = {int(p.stem.removeprefix("part-")) for p in cache.glob("part-*.npz")}
    number = max(taken, default=-1) + 1
    with atomic_path(cache / f"part-{number:05d}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, sha256=np.array(shas), features=features.astype(np.float32))


def _compact(cache: Path, vectors: dict[str, np.ndarray]) -> None:
    """Merge many parts into one: the merged file is written before the old ones go, so a kill
    in between leaves duplicates (harmless), never a loss."""
    parts = sorted(cache.glob("part-*.npz"))
    if len(parts) <= MAX_PARTS:
        return
    shas = sorted(vectors)
    _write_part(cache, shas, np.stack([vectors[s] for s in shas]))
    for part in parts:
        part.unlink()


def _extractor(cfg: AuditConfig) -> keras.Model:
    """Pixels → the transfer stage's frozen backbone → one pooled vector per image."""
    import keras

    from pipeline.models import build_base, feature_extractor

    if cfg.weights == "none":
        keras.utils.set_random_seed(cfg.seed)
    base = build_base(cfg.backbone, cfg.image_size, cfg.weights)
    names = POOLED_LAYERS.get(cfg.backbone)
    if names:  # same name: feature_extractor picks the preprocessing by it
        outputs = [base.get_layer(name).output for name in names]
        base = keras.Model(base.input, outputs, name=base.name)
    maps = feature_extractor(cfg.image_size, base)
    pooled = [keras.layers.GlobalAveragePooling2D()(m) for m in keras.tree.flatten(maps.output)]
    vector = keras.layers.Concatenate()(pooled) if len(pooled) > 1 else pooled[0]
    return keras.Model(maps.input, vector, name="audit_features")


def _batches(files: Sequence[Path], cfg: AuditConfig) -> Iterator[np.ndarray]:
    import tensorflow as tf

    from pipeline.dataset import decode_and_resize

    def load(path: tf.Tensor) -> tf.Tensor:
        return tf.cast(decode_and_resize(tf.io.read_file(path), cfg.image_size), tf.float32)

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    try:
        for batch in ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE):
            yield batch.numpy()
    except tf.errors.InvalidArgumentError as exc:
        raise StageError(f"an image in {files[0].parent.parent} cannot be decoded: {exc}") from None


@dataclass(frozen=True)
class _Chunk:
    """One Dask task: the images of one part, by absolute path."""

    cfg: AuditConfig
    files: tuple[Path, ...]


def _cached_extractor(cfg: AuditConfig) -> keras.Model:
    """``_extractor``, built once in this process (a Dask worker's, or the caller's) per
    _depends_on and weights file."""
    key = ["audit", _depends_on(cfg), weights_stamp(cfg.weights)]
    return built_once(key, lambda: _extractor(cfg))


def _chunk_features(chunk: _Chunk) -> np.ndarray:
    """float32 ``[len(files), d]``: runs on a Dask worker."""
    return _features(_cached_extractor(chunk.cfg), chunk.files, chunk.cfg)


def _features(extractor: keras.Model, files: Sequence[Path], cfg: AuditConfig) -> np.ndarray:
    outputs = [extractor.predict_on_batch(b) for b in _batches(files, cfg)]
    return np.concatenate(outputs).astype(np.float32)


def _extracted(
    pending: list[tuple[str, Path]], cfg: AuditConfig
) -> Iterator[tuple[int, np.ndarray]]:
    """``(chunk start, features)`` for every ``CHUNK`` of ``pending``: in order in this process,
    as they finish with ``audit.dask_address``."""
    starts = range(0, len(pending), CHUNK)
    if cfg.dask_address:
        remote = cfg.model_copy(update={"weights": worker_weights(cfg.weights)})
        chunks = [
            _Chunk(remote, tuple(f.absolute() for _, f in pending[s : s + CHUNK])) for s in starts
        ]
        for n, features in dask_map(
            _chunk_features,
            chunks,
            address=cfg.dask_address,
            key="audit.dask_address",
            desc="audit features",
            unit="chunk",
        ):
            yield starts[n], features
        return
    extractor = _cached_extractor(cfg)
    for start in starts:
        yield start, _features(extractor, [f for _, f in pending[start : start + CHUNK]], cfg)


def image_features(
    files: Sequence[Path], shas: Sequence[str], cfg: AuditConfig, cache: Path
) -> tuple[np.ndarray, int]:
    """Feature vectors for ``files`` (rows in order), from the cache where it has their sha256.

    Returns ``(features [n, d] float32, how many were extracted now)``. Raises StageError
    naming the backbone key, an undecodable image or an unreachable ``audit.dask_address``.
    """
    depends = _depends_on(cfg)
    reuse_or_wipe(
        cache / "features.json",
        fingerprint(depends),
        lambda: shutil.rmtree(cache, ignore_errors=True),
        depends,
    )
    vectors = _read_parts(cache)
    todo = {sha: file for sha, file in zip(shas, files, strict=True) if sha not in vectors}
    if todo:
        pending = list(todo.items())
        print(f"audit: extracting features for {len(pending)} new images")
        for start, features in _extracted(pending, cfg):
            chunk_shas = [sha for sha, _ in pending[start : start + CHUNK]]
            _write_part(cache, chunk_shas, features)
            vectors.update(zip(chunk_shas, features, strict=True))
    _compact(cache, vectors)
    return np.stack([vectors[sha] for sha in shas]).astype(np.float32), len(todo)
