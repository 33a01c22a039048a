"""Pass 2: crops and rotations that pHash misses, proposed by neighbours and proven by ORB.

Consumes the normalised images in data/clean, their grey-thumbnail embeddings (from the
decode workers) and the groups pass 1 already found. Produces the confirmed pairs (i < j),
each with a ``Match`` (method orb: RANSAC inliers, aligned correlation, mirrored).

1. ``embedding_neighbours``: each image's k nearest neighbours by cosine similarity of the
   thumbnails (mirrored thumbnails queried too); pairs already joined by pass 1 are skipped.
2. ``describe_images`` (workers): ORB keypoints of every image a pair needs, computed once.
3. ``verify_pairs`` (workers): ratio-test matches, a RANSAC similarity transform with enough
   inliers, then correlation of fine detail once aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.clean.decode import decode_vector
from pipeline.clean.records import ImageRecord, Match
from pipeline.clean.workers import WorkerPool
from pipeline.config import CleanConfig

# ORB needs ~31 px patches around each keypoint; tiny images are upscaled to this side first.
ORB_SIDE = 256
DESCRIBE_BATCH = 32  # images per describe task
VERIFY_BATCH = 256  # pairs per verify task

Features = tuple[np.ndarray, np.ndarray | None]  # keypoint coordinates (n, 2), descriptors


@dataclass(frozen=True)
class VerifySettings:
    """What a verification worker needs from CleanConfig."""

    orb_features: int
    orb_ratio: float
    min_inliers: int
    min_correlation: float

    @classmethod
    def from_config(cls, cfg: CleanConfig) -> VerifySettings:
        return cls(
            orb_features=cfg.orb_features,
            orb_ratio=cfg.orb_ratio,
            min_inliers=cfg.orb_min_inliers,
            min_correlation=cfg.orb_min_correlation,
        )


@dataclass(frozen=True)
class DescribeTask:
    images: tuple[tuple[int, str], ...]  # (index, normalised file)
    orb_features: int


@dataclass(frozen=True)
class VerifyTask:
    pairs: tuple[tuple[int, int], ...]
    features: dict[int, tuple[Features, Features]]  # index → (plain, mirrored)
    files: dict[int, str]
    settings: VerifySettings


def orb_pairs(
    cfg: CleanConfig,
    records: Sequence[ImageRecord],
    first_pass: np.ndarray,
    out: Path,
    pool: WorkerPool,
) -> tuple[list[tuple[int, int, Match]], dict[str, int]]:
    """Confirmed pairs among neighbours not already in one pass-1 group (``first_pass`` holds
    each image's group label), sorted, and the candidate/confirmed counts."""
    embeddings = np.stack([decode_vector(r.image.embedding) for r in records])
    mirrors = np.stack([decode_vector(r.image.mirror_embedding) for r in records])
    pairs = embedding_neighbours(
        embeddings, mirrors, cfg.second_pass_neighbours, cfg.second_pass_min_similarity
    )
    # Pairs already joined by the cheap pass need no geometric proof.
    pairs = pairs[first_pass[pairs[:, 0]] != first_pass[pairs[:, 1]]]
    files = {int(i): str(out / records[int(i)].image.clean_path) for i in np.unique(pairs)}
    tasks = _verify_tasks(VerifySettings.from_config(cfg), pairs, files, pool)
    confirmed = []
    for found in pool.map(verify_pairs, tasks, "clean: verify", unit="batch"):
        for a, b, inliers, correlation, flipped in found:
            match = Match("orb", inliers=inliers, correlation=correlation, mirrored=flipped)
            confirmed.append((a, b, match))
    confirmed.sort(key=lambda pair: pair[:2])
    return confirmed, {"orb_candidates": len(pairs), "orb_confirmed": len(confirmed)}


def _verify_tasks(
    settings: VerifySettings, pairs: np.ndarray, files: dict[int, str], pool: WorkerPool
) -> list[VerifyTask]:
    """Batches of candidate pairs, each with the ORB features of the images it needs."""
    needed = sorted(files)
    describe = [
        DescribeTask(
            images=tuple((i, files[i]) for i in needed[start : start + DESCRIBE_BATCH]),
            orb_features=settings.orb_features,
        )
        for start in range(0, len(needed), DESCRIBE_BATCH)
    ]
    features: dict[int, tuple[Features, Features]] = {}
    for described in pool.map(describe_images, describe, "clean: describe", unit="batch"):
        for index, plain, mirrored in described:
            features[index] = (plain, mirrored)
    tasks = []
    for start in range(0, len(pairs), VERIFY_BATCH):
        chunk = tuple((int(i), int(j)) for i, j in pairs[start : start + VERIFY_BATCH])
        indices = {i for pair in chunk for i in pair}
        tasks.append(
            VerifyTask(
                pairs=chunk,
                features={i: features[i] for i in indices},
                files={i: files[i] for i in indices},
                settings=settings,
            )
        )
    return tasks


def embedding_neighbours(
    embeddings: np.ndarray, mirror_embeddings: np.ndarray, k: int, min_similarity: float
) -> np.ndarray:
    """Candidate pairs (i < j): each image's k nearest neighbours by cosine similarity.

    The mirrored image's embedding is queried too, so flipped copies are proposed. Cost is one
    BLAS matrix product per block of rows; the expensive verification then runs on n·k pairs.
    """
    n = len(embeddings)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    k = min(k, n - 1)
    pairs = []
    block = 1024
    for queries in (embeddings, mirror_embeddings):
        for start in range(0, n, block):
            similarity = queries[start : start + block] @ embeddings.T
            rows = np.arange(similarity.shape[0])
            similarity[rows, rows + start] = -np.inf
            nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
            chosen = similarity[rows[:, None], nearest] >= min_similarity
            i = np.repeat(rows + start, k).reshape(-1, k)[chosen]
            pairs.append(np.stack([i, nearest[chosen]], axis=1))
    found = np.concatenate(pairs)
    found = np.sort(found, axis=1)
    return np.unique(found, axis=0)


def _orb_grey(path: Path, mirrored: bool = False) -> np.ndarray:
    """The normalised image in grey as ORB sees it: tiny images upscaled to ORB_SIDE."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        return np.zeros((1, 1), np.uint8)
    scale = ORB_SIDE / max(grey.shape)
    if scale > 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey


def describe_images(task: DescribeTask) -> list[tuple[int, Features, Features]]:
    """ORB keypoints of each image and of its mirror: [(index, plain, mirrored)].

    Computed once per image and shipped to the matching workers as arrays, because pairs from
    nearest neighbours scatter over all images and per-batch recomputation cost 16x more.
    """
    orb = cv2.ORB_create(nfeatures=task.orb_features)
    described = []
    for index, path in task.images:
        views = []
        for mirrored in (False, True):
            keypoints, descriptors = orb.detectAndCompute(_orb_grey(Path(path), mirrored), None)
            points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
            views.append((points, descriptors))
        described.append((index, views[0], views[1]))
    return described


def verify_pairs(task: VerifyTask) -> list[tuple[int, int, int, float, bool]]:
    """Geometric, then photometric, verification of candidate pairs (second image also mirrored).

    Returns (i, j, inliers, correlation, mirrored) for every confirmed pair: at least
    ``min_inliers`` RANSAC inliers, and at least ``min_correlation`` once aligned.
    """
    settings = task.settings
    greys: dict[tuple[int, bool], np.ndarray] = {}

    def grey(index: int, mirrored: bool) -> np.ndarray:
        if (index, mirrored) not in greys:
            greys[(index, mirrored)] = _orb_grey(Path(task.files[index]), mirrored)
        return greys[(index, mirrored)]

    confirmed = []
    for i, j in task.pairs:
        for mirrored in (False, True):
            inliers, transform = _ransac(
                task.features[i][0], task.features[j][int(mirrored)], settings
            )
            if inliers < settings.min_inliers or transform is None:
                continue
            correlation = _aligned_correlation(grey(i, False), grey(j, mirrored), transform)
            if correlation >= settings.min_correlation:
                confirmed.append((int(i), int(j), inliers, round(correlation, 4), mirrored))
                break
    return confirmed


def _ransac(a: Features, b: Features, settings: VerifySettings) -> tuple[int, np.ndarray | None]:
    """(inliers, transform) of a similarity transform a→b fitted to ratio-test ORB matches."""
    (points_a, descriptors_a), (points_b, descriptors_b) = a, b
    if descriptors_a is None or descriptors_b is None or len(points_a) < 2 or len(points_b) < 2:
        return 0, None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors_a, descriptors_b, k=2)
    good = [
        pair[0]
        for pair in pairs
        if len(pair) == 2 and pair[0].distance < settings.orb_ratio * pair[1].distance
    ]
    if len(good) < settings.min_inliers:
        return 0, None
    src = points_a[[m.queryIdx for m in good]]
    dst = points_b[[m.trainIdx for m in good]]
    transform, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=5.0, maxIters=500
    )
    if transform is None or mask is None:
        return 0, None
    scale = float(np.hypot(transform[0, 0], transform[1, 0]))
    # Both sides are normalised to a similar size, so a true copy maps at a scale near 1; wild
    # scales are RANSAC fitting noise between two different objects.
    if not 0.5 <= scale <= 2.0:
        return 0, None
    return int(mask.sum()), transform


def _aligned_correlation(a: np.ndarray, b: np.ndarray, transform: np.ndarray) -> float:
    """Correlation of fine detail where a, warped by ``transform``, overlaps b (0 if little)."""
    height, width = b.shape
    warped = cv2.warpAffine(_high_pass(a), transform, (width, height), flags=cv2.INTER_LINEAR)
    coverage = cv2.warpAffine(
        np.ones_like(a), transform, (width, height), flags=cv2.INTER_NEAREST
    ).astype(bool)
    # A 10% crop keeps ~80% of the area; a sliver of overlap proves nothing.
    if coverage.mean() < 0.5:
        return 0.0
    x = warped[coverage].astype(np.float64)
    y = _high_pass(b)[coverage].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _high_pass(grey: np.ndarray) -> np.ndarray:
    # Correlating detail, not shading: two different plain shirts aligned by RANSAC correlate
    # above 0.95 in raw grey levels (measured on Fashion-MNIST), but below 0.8 once the
    # silhouette's smooth shading is subtracted; true copies stay above 0.8.
    grey = grey.astype(np.float32)
    return grey - cv2.GaussianBlur(grey, (0, 0), 4)
