"""Pass 2: crops, rotations, perspective and watermarks that pHash misses, proposed by
neighbours and proven by ORB.

Consumes the normalised images in data/clean, their view embeddings (embed.py, from the
decode workers) and the pairs the earlier passes already matched. Produces the confirmed pairs
(i < j), each with a ``Match`` (method orb: RANSAC inliers, aligned correlation, mirrored).

1. ``view_neighbours`` (neighbours.py): each image's k nearest neighbours per view (mirrored
   views queried too); pairs already matched directly are skipped.
2. ``describe_images`` (workers): ORB keypoints of every image a pair needs (and of its
   mirror), computed once from one read of the file.
3. ``verify_pairs`` (workers): ratio-test matches, a RANSAC similarity transform (a
   homography when the similarity does not line the pictures up: perspective) with enough
   inliers; then the two must overlap on at least ``orb_min_overlap`` of each one's content
   (so overlapping crops of one photograph stay apart), and their fine detail, once aligned,
   must correlate by at least ``orb_min_correlation`` over the overlap, or halfway from there
   to 1 in the median of 4 × 4 tiles (so a watermark over a strip does not hide a copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.clean.embed import decode_views, trim_borders
from pipeline.clean.neighbours import view_neighbours
from pipeline.clean.records import ImageRecord, Match
from pipeline.clean.workers import WorkerPool
from pipeline.config import CleanConfig

# ORB needs ~31 px patches around each keypoint; tiny images are upscaled to this side first.
ORB_SIDE = 256
DESCRIBE_BATCH = 32  # images per describe task
VERIFY_BATCH = 256  # pairs per verify task
TILES = 4  # the aligned correlation is the median over a TILES × TILES grid
MIN_TILES = 4  # tiles with enough overlap and detail needed for a verdict
MIN_SPREAD = 0.2  # inliers must span this fraction of the image's width and of its height

Features = tuple[np.ndarray, np.ndarray | None]  # keypoint coordinates (n, 2), descriptors
Edge = tuple[int, int]


@dataclass(frozen=True)
class VerifySettings:
    """What a verification worker needs from CleanConfig."""

    orb_features: int
    orb_ratio: float
    min_inliers: int
    min_correlation: float
    min_overlap: float

    @classmethod
    def from_config(cls, cfg: CleanConfig) -> VerifySettings:
        return cls(
            orb_features=cfg.orb_features,
            orb_ratio=cfg.orb_ratio,
            min_inliers=cfg.orb_min_inliers,
            min_correlation=cfg.orb_min_correlation,
            min_overlap=cfg.orb_min_overlap,
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
    matched: set[Edge],
    out: Path,
    pool: WorkerPool,
) -> tuple[list[tuple[int, int, Match]], dict[str, int]]:
    """Confirmed pairs among neighbours not already ``matched`` directly, sorted, and the
    candidate/confirmed counts."""
    views = np.stack([decode_views(r.image.embedding) for r in records])
    mirrors = np.stack([decode_views(r.image.mirror_embedding) for r in records])
    pairs = view_neighbours(
        views, mirrors, cfg.second_pass_neighbours, cfg.second_pass_min_similarity
    )
    # Pairs the cheap passes already joined need no geometric proof.
    keep = [(int(i), int(j)) not in matched for i, j in pairs]
    pairs = pairs[np.array(keep, dtype=bool)] if len(pairs) else pairs
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


def _orb_grey(path: Path) -> np.ndarray:
    """The normalised image in grey as ORB sees it: tiny images upscaled to ORB_SIDE."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        return np.zeros((1, 1), np.uint8)
    scale = ORB_SIDE / max(grey.shape)
    if scale > 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return grey


def _mirror(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(grey[:, ::-1])


def describe_images(task: DescribeTask) -> list[tuple[int, Features, Features]]:
    """ORB keypoints of each image and of its mirror: [(index, plain, mirrored)].

    Computed once per image and shipped to the matching workers as arrays, because pairs from
    nearest neighbours scatter over all images and per-batch recomputation cost 16x more.
    """
    orb = cv2.ORB_create(nfeatures=task.orb_features)
    described = []
    for index, path in task.images:
        grey = _orb_grey(Path(path))
        views = []
        for view in (grey, _mirror(grey)):
            keypoints, descriptors = orb.detectAndCompute(view, None)
            points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
            views.append((points, descriptors))
        described.append((index, views[0], views[1]))
    return described


def verify_pairs(task: VerifyTask) -> list[tuple[int, int, int, float, bool]]:
    """Geometric, then photometric, verification of candidate pairs (second image also mirrored).

    Returns (i, j, inliers, correlation, mirrored) for every confirmed pair: at least
    ``min_inliers`` RANSAC inliers, ``min_overlap`` of each image's content in common and
    at least ``min_correlation`` once aligned.
    """
    settings = task.settings
    greys: dict[int, np.ndarray] = {}

    def grey(index: int, mirrored: bool) -> np.ndarray:
        if index not in greys:
            greys[index] = _orb_grey(Path(task.files[index]))
        return _mirror(greys[index]) if mirrored else greys[index]

    confirmed = []
    for i, j in task.pairs:
        for mirrored in (False, True):
            matches = _ratio_matches(task.features[i][0], task.features[j][int(mirrored)], settings)
            if matches is None:
                continue
            verdict = _aligned(grey(i, False), grey(j, mirrored), matches, settings)
            if verdict is not None:
                inliers, correlation = verdict
                confirmed.append((int(i), int(j), inliers, round(correlation, 4), mirrored))
                break
    return confirmed


def _ratio_matches(
    a: Features, b: Features, settings: VerifySettings
) -> tuple[np.ndarray, np.ndarray] | None:
    """(points in a, points in b) of ORB matches passing Lowe's ratio test; None if too few."""
    (points_a, descriptors_a), (points_b, descriptors_b) = a, b
    if descriptors_a is None or descriptors_b is None or len(points_a) < 2 or len(points_b) < 2:
        return None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors_a, descriptors_b, k=2)
    good = [
        (pair[0].queryIdx, pair[0].trainIdx)
        for pair in pairs
        if len(pair) == 2 and pair[0].distance < settings.orb_ratio * pair[1].distance
    ]
    if len(good) < settings.min_inliers:
        return None
    query, train = np.array(good).T
    return points_a[query], points_b[train]


def _aligned(
    a: np.ndarray,
    b: np.ndarray,
    matches: tuple[np.ndarray, np.ndarray],
    settings: VerifySettings,
) -> tuple[int, float] | None:
    """(inliers, correlation) when a similarity transform, or failing that a homography,
    maps a onto b with enough inliers, overlap and aligned correlation; else None."""
    src, dst = matches
    similarity, mask = cv2.estimateAffinePartial2D(
        src, dst, method=cv2.RANSAC, ransacReprojThreshold=5.0, maxIters=500
    )
    if similarity is None or mask is None or int(mask.sum()) < settings.min_inliers:
        return None
    scale = float(np.hypot(similarity[0, 0], similarity[1, 0]))
    # Both sides are normalised to a similar size, so a true copy maps at a scale near 1; wild
    # scales are RANSAC fitting noise between two different objects.
    if not 0.5 <= scale <= 2.0:
        return None
    if not _spread(src[mask.ravel().astype(bool)], a.shape):
        return None
    transforms = [(np.vstack([similarity, [0, 0, 1]]), int(mask.sum()))]
    homography, hmask = cv2.findHomography(src, dst, cv2.RANSAC, 5.0, maxIters=500)
    if homography is not None and hmask is not None and int(hmask.sum()) >= settings.min_inliers:
        transforms.append((homography, int(hmask.sum())))
    # A watermark over a strip lowers the whole-overlap correlation of a true copy (0.46 of
    # text copies reach 0.8), so most tiles agreeing closely also counts; the median tile alone
    # at 0.8 merged two different Fashion-MNIST sneakers (whole overlap 0.70, median tile 0.82).
    tile_bar = (1 + settings.min_correlation) / 2
    for transform, inliers in transforms:
        whole, tiles = _aligned_correlation(a, b, transform, settings.min_overlap)
        if whole >= settings.min_correlation:
            return inliers, whole
        if tiles >= tile_bar:
            return inliers, tiles
    return None


def _spread(points: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether inliers span at least MIN_SPREAD of the image in both directions. The same
    watermark on two different photos matched along its strip alone (bench/clean_recall.py:
    every false merge there was text-on-text), while a copy's inliers cover the picture."""
    span = np.ptp(points, axis=0) / np.array([shape[1], shape[0]], dtype=np.float64)
    return bool(span.min() >= MIN_SPREAD)


def _content_mask(grey: np.ndarray) -> np.ndarray:
    """Ones over the picture, zeros over uniform borders (letterbox bars)."""
    trimmed = trim_borders(grey)
    mask = np.zeros(grey.shape, np.uint8)
    if trimmed.shape == grey.shape:
        mask[:] = 1
        return mask
    content = np.abs(grey.astype(np.int16) - int(grey[0, 0])) > 8
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1
    return mask


def _aligned_correlation(
    a: np.ndarray, b: np.ndarray, transform: np.ndarray, min_overlap: float
) -> tuple[float, float]:
    """(whole-overlap, median tile) correlation of fine detail where a, warped by
    ``transform`` (3×3), overlaps b; 0s when the pictures share less than ``min_overlap`` of
    either one's content."""
    height, width = b.shape
    mask_a, mask_b = _content_mask(a), _content_mask(b)
    try:
        inverse = np.linalg.inv(transform)
    except np.linalg.LinAlgError:
        return 0.0, 0.0
    covered_b = cv2.warpPerspective(mask_a, transform, (width, height), flags=cv2.INTER_NEAREST)
    covered_a = cv2.warpPerspective(mask_b, inverse, a.shape[::-1], flags=cv2.INTER_NEAREST)
    overlap_b = (covered_b & mask_b).sum() / max(int(mask_b.sum()), 1)
    overlap_a = (covered_a & mask_a).sum() / max(int(mask_a.sum()), 1)
    # Neighbouring crops of one photograph share up to 60% (bench/clean_recall.py); a 10% crop
    # keeps 81% of the original and is wholly inside it.
    if min(overlap_a, overlap_b) < min_overlap:
        return 0.0, 0.0
    warped, target = cv2.warpPerspective(_high_pass(a), transform, (width, height)), _high_pass(b)
    covered = (covered_b & mask_b).astype(bool)
    x, y = warped[covered].astype(np.float64), target[covered].astype(np.float64)
    whole = float(np.corrcoef(x, y)[0, 1]) if x.std() > 0 and y.std() > 0 else 0.0
    return whole, _median_tile_correlation(warped, target, covered)


def _median_tile_correlation(x: np.ndarray, y: np.ndarray, covered: np.ndarray) -> float:
    height, width = covered.shape
    correlations = []
    for row in range(TILES):
        for col in range(TILES):
            window = (
                slice(row * height // TILES, (row + 1) * height // TILES),
                slice(col * width // TILES, (col + 1) * width // TILES),
            )
            inside = covered[window]
            if inside.mean() < 0.5:
                continue
            tile_x, tile_y = x[window][inside], y[window][inside]
            if tile_x.std() < 1e-3 or tile_y.std() < 1e-3:
                continue  # a flat tile (background) says nothing
            correlations.append(float(np.corrcoef(tile_x, tile_y)[0, 1]))
    if len(correlations) < MIN_TILES:
        return 0.0
    return float(np.median(correlations))


def _high_pass(grey: np.ndarray) -> np.ndarray:
    # Correlating detail, not shading: two different plain shirts aligned by RANSAC correlate
    # above 0.95 in raw grey levels (measured on Fashion-MNIST), but below 0.8 once the
    # silhouette's smooth shading is subtracted; true copies stay above 0.8.
    grey = grey.astype(np.float32)
    return grey - cv2.GaussianBlur(grey, (0, 0), 4)
