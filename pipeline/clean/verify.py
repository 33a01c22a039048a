"""Pass 2's verification, on the workers: are two images, proposed by rounds.py, one picture?

Consumes a ``VerifyTask``: candidate pairs, where the run's ``describe.DescribedStore`` put each
image's ORB keypoints, and the normalised images in data/clean. Produces the confirmed pairs
(i < j), each with a ``Match`` (method orb: RANSAC inliers, aligned correlation, mirrored;
method ecc: aligned correlation, mirrored).

``verify_pairs``: ratio-test matches (after a quick look at the strongest
``PREFILTER_KEYPOINTS`` of each image), a RANSAC similarity transform (a homography when the
similarity does not line the pictures up: perspective) with enough inliers; then the two must
overlap on at least ``orb_min_overlap`` of each one's content (so overlapping crops of one
photograph stay apart), and their fine detail, once aligned, must correlate by at least
``orb_min_correlation`` over the overlap, or halfway from there to 1 in the median of 4 × 4
tiles (so a watermark over a strip does not hide a copy). When ORB could not line the two up
and either is sparse (under ``describe.SPARSE_KEYPOINTS`` keypoints at ORB's default
threshold: sky, cells, a smooth clock face; with ``dense_fallback: false`` only when either has
under that many even at the sparse threshold), the embeddings are at least
``DENSE_MIN_SIMILARITY`` alike and both images suit it (``describe.dense_suitable``),
``aligned.dense_transform`` aligns the two by ECC instead; the same overlap test and a stricter
correlation bar (halfway from ``orb_min_correlation`` to 1) decide, on detail with the fill of
rotated corners and letterbox bars left out (aligned.py).

A worker imports this module (and not rounds.py's SciPy, pydantic and log code: 0.5 CPU-s per
worker process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import faiss
import numpy as np

from pipeline.clean.aligned import (
    Picture,
    aligned_correlation,
    dense_picture,
    dense_transform,
    high_pass,
    overlap_bound,
    picture_correlation,
    spread,
)
from pipeline.clean.describe import (
    SPARSE_KEYPOINTS,
    Described,
    DescribedCache,
    Features,
    Located,
    dense_suitable,
    for_orb,
    greys,
    mirror,
    orb_upscales,
    stored_grey,
)
from pipeline.clean.embed import content_box
from pipeline.clean.kept import Kept, enter_run, run_scoped
from pipeline.clean.records import Match

if TYPE_CHECKING:
    from pipeline.config import CleanConfig

# The dense fallback runs only on pairs whose thumbnails are this alike (cosine): it is the
# costlier check (3 ms a pair); on bench/clean_recall.py 0.95 of the copies it confirmed are
# above 0.85.
DENSE_MIN_SIMILARITY = 0.8
# And on pairs ORB had keypoints for but did not line up, this alike: with sparse pictures'
# keypoints found at the sensitive FAST threshold, what ORB leaves is mostly look-alikes (at
# 0.8 on the throughput bench's photos 2,908 dense checks confirmed 6 pairs; at 0.9, 498
# confirmed 5 with the same groups), for a third less pass 2.
DENSE_SPARSE_MIN_SIMILARITY = 0.9
# A quick look first: the strongest PREFILTER_KEYPOINTS of each image must give this many
# ratio-test matches before all of them are matched. At 100 (a quarter of the search at 200,
# which is what every pair pays) it keeps every pair ORB confirmed on the throughput bench's
# photos and 0.99 on bench/clean_recall.py (the rest joined by other pairs: same recall), and
# cut pass 2 by 0.14 there.
PREFILTER_KEYPOINTS = 100
PREFILTER_MATCHES = 3
# A perspective copy's similarity fit already covers nearly as much as its homography: on
# bench/clean_throughput.py's photos and bench/clean_recall.py every pair the homography
# confirmed overlapped ≥ 0.71 under its similarity (overlap_bound), while 0.63 (photos) of the
# homographies fitted were for pairs whose similarity overlapped under 0.6, which it did not
# confirm. So no homography is fitted when the similarity overlaps less than this below
# orb_min_overlap.
HOMOGRAPHY_OVERLAP_SLACK = 0.1
# What _aligned says of a pair it lined up (a RANSAC transform with enough inliers, spread
# over the picture, at a sane scale) that then failed the overlap or the correlation test.
LINED_UP = "lined up"
# What a verify worker keeps between tasks besides describe.py's greys: the detail of the most
# recently correlated ones.
DETAIL_CACHE_BYTES = 16 * 2**20
DESCRIBED_CACHE_BYTES = 256 * 2**20  # and the describe store's entries it read

# i, j, which is compared mirrored first (PLAIN: neither), similarity that way, similarity the
# other way
Candidate = tuple[int, int, int, float, float]
PLAIN, MIRROR_J, MIRROR_I = 0, 1, 2


@dataclass(frozen=True)
class VerifySettings:
    """What a verification worker needs from CleanConfig."""

    orb_features: int
    orb_ratio: float
    min_inliers: int
    min_correlation: float
    min_overlap: float
    dense_fallback: bool

    @classmethod
    def from_config(cls, cfg: CleanConfig) -> VerifySettings:
        return cls(
            orb_features=cfg.orb_features,
            orb_ratio=cfg.orb_ratio,
            min_inliers=cfg.orb_min_inliers,
            min_correlation=cfg.orb_min_correlation,
            min_overlap=cfg.orb_min_overlap,
            dense_fallback=cfg.dense_fallback,
        )


@dataclass(frozen=True)
class VerifyTask:
    pairs: tuple[Candidate, ...]
    files: dict[int, str]
    settings: VerifySettings
    store: dict[tuple[int, bool], Located]  # (image, mirrored) -> where DescribedStore put it
    run: str  # this run's DescribedStore folder (kept.enter_run)


# The details (float32, 4x a grey) have a store of their own: in one with the greys they pushed
# greys out, and reading those again cost more than the detail saved (recall set: 3,311 reads
# of greys; 1,308 with the details apart).
_details = Kept(lambda: DETAIL_CACHE_BYTES)
_described = DescribedCache(DESCRIBED_CACHE_BYTES)
run_scoped(_details.clear)
run_scoped(_described.clear)


def _picture(path: str, mirrored: bool) -> Picture:
    """The normalised image at ``path`` in grey as ORB sees it (tiny images upscaled to
    ORB_SIDE; mirrored if asked) with its content box, kept in this worker, and its detail,
    kept once asked for. Recomputing box and detail for every pair was 0.4 of the aligned
    correlation's time (throughput photos); a mirror is made afresh (a copy is cheap), so it
    takes no room from the greys."""
    grey = _orb_grey(path)
    if mirrored:
        grey = mirror(grey)
    box = greys.get((path, "box", mirrored), lambda: np.array(content_box(grey)))
    left, top, right, bottom = (int(v) for v in box)
    return Picture(
        grey,
        (left, top, right, bottom),
        lambda: _details.get((path, "detail", mirrored), lambda: high_pass(grey)),
    )


def _orb_grey(path: str) -> np.ndarray:
    """``describe.for_orb`` of the stored grey, kept apart only when it is an upscale."""
    stored = stored_grey(path)
    if not orb_upscales(stored):
        return stored
    return greys.get((path, "grey", False), lambda: for_orb(stored))


def _dense_picture(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """What the dense fallback aligns of the image at ``path`` (``aligned.dense_picture``:
    small grey, picture mask), or None when it may not judge it (``describe.dense_suitable``);
    made when a pair first needs it and kept in this worker (most images never do)."""

    def make() -> np.ndarray:
        if not dense_suitable(stored_grey(path)):
            return np.zeros(0, np.uint8)
        return np.stack(dense_picture(_orb_grey(path)))

    both = greys.get((path, "dense", False), make)
    return None if not both.size else (both[0], both[1])


def verify_pairs(task: VerifyTask) -> list[tuple[int, int, Match]]:
    """Geometric, then photometric, verification of candidate pairs (one image mirrored
    first when the pair says so: ``mirrored_image``); the confirmed ones with their evidence.

    Confirmed: at least ``min_inliers`` RANSAC inliers, ``min_overlap`` of each image's
    content in common and at least ``min_correlation`` once aligned; or, for a pair ORB
    cannot judge, the same overlap and correlation once densely aligned.
    """
    confirmed = []
    enter_run(task.run)
    # One thread: the searches are small (faiss's OpenMP threads made them 4x slower on 2
    # busy cores) and the pool already uses every core. Restored for an inline run's caller.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        for i, j, flip, similarity, other in task.pairs:
            match = None
            if flip != PLAIN:
                plain = _mirrored_onto(i, j, flip)
                match = _verify_pair(task, plain, mirrored_image(i, j, flip), True, similarity)
            if match is None:
                # Thumbnails say little about which way round two crops of one photo are
                # (plain 0.0 vs mirrored 0.5 for ORB-confirmed crops of
                # bench/clean_throughput.py's photos), so a pair is always compared as it is;
                # mirrored only when its mirror's thumbnails are the closer (a flipped copy's
                # are, by far).
                match = _verify_pair(task, i, j, False, other if flip != PLAIN else similarity)
            if match is not None:
                confirmed.append((i, j, match))
    finally:
        faiss.omp_set_num_threads(threads)
    return confirmed


def mirrored_image(i: int, j: int, flip: int) -> int:
    """The image of pair (i, j) compared mirrored first."""
    return i if flip == MIRROR_I else j


def _mirrored_onto(i: int, j: int, flip: int) -> int:
    """The image the mirrored one is compared with."""
    return j if flip == MIRROR_I else i


def _verify_pair(task: VerifyTask, i: int, j: int, flip: bool, similarity: float) -> Match | None:
    """The evidence that i and j (j mirrored if ``flip``) are one picture, or None."""
    settings = task.settings
    first: Described = _described.get(task.store[i, False])
    second: Described = _described.get(task.store[j, False])
    features: Features = _described.get(task.store[j, True]) if flip else second.plain
    matches = _ratio_matches(first.plain, features, settings)
    lined_up = False
    if matches is not None:
        picture_i, picture_j = _picture(task.files[i], False), _picture(task.files[j], flip)
        verdict = _aligned(picture_i, picture_j, matches, settings)
        if isinstance(verdict, tuple):
            inliers, correlation = verdict
            return Match("orb", inliers=inliers, correlation=round(correlation, 4), mirrored=flip)
        lined_up = verdict == LINED_UP
    # Blank: too few keypoints even at the sensitive threshold, so ORB could not judge at all.
    # Sparse (either picture; describe.py): ORB had keypoints, but unsteady ones, so with
    # dense_fallback the dense check also judges what they did not line up, when the
    # thumbnails are more alike.
    blank = min(len(first.plain[0]), len(features[0])) < SPARSE_KEYPOINTS
    if blank:
        bar = DENSE_MIN_SIMILARITY
    elif settings.dense_fallback and (first.sparse or second.sparse) and not lined_up:
        bar = DENSE_SPARSE_MIN_SIMILARITY
    else:
        return None
    if similarity < bar:
        return None
    dense_i, dense_j = _dense_picture(task.files[i]), _dense_picture(task.files[j])
    if dense_i is not None and dense_j is not None:
        dense = (mirror(dense_j[0]), mirror(dense_j[1])) if flip else dense_j
        correlation = _dense(dense_i, dense, settings)
        if correlation is not None:
            return Match("ecc", correlation=round(correlation, 4), mirrored=flip)
    return None


def _dense(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], settings: VerifySettings
) -> float | None:
    """The aligned correlation when ECC lines picture ``a`` up with ``b`` (each a grey and its
    picture mask) and it passes the same overlap and correlation bars as ORB's; else None."""
    (grey_a, mask_a), (grey_b, mask_b) = a, b
    transform = dense_transform(grey_a, grey_b, mask_a, mask_b, settings.min_overlap)
    if transform is None:
        return None
    whole, tiles = aligned_correlation(
        grey_a, grey_b, transform, settings.min_overlap, masks=(mask_a, mask_b)
    )
    # A dense warp can line up a periodic texture a period off: two different rotated crops
    # of a brick wall correlated 0.82 (bench/clean_recall.py). So the bar is ORB's tile bar,
    # halfway from orb_min_correlation to 1, for the whole overlap or the median tile.
    bar = (1 + settings.min_correlation) / 2
    best = max(whole, tiles)
    return best if best >= bar else None


_FARTHEST = np.iinfo(np.int32).max  # what _two_nearest puts in place of a row's nearest


def _two_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hamming distances to each row of ``a``'s nearest and second-nearest rows of ``b`` (ORB
    descriptors, 32 bytes each), and the nearest's index. All distances from faiss's
    ``hammings``, then the two smallest per row: 0.55x the time of faiss's ``knn_hamming``
    heap search for 500 descriptors (bench/clean_matching.py), which was 3x faster than
    OpenCV's ``batchDistance``; the same distances, and the same nearest wherever the ratio
    test can pass (no tie)."""
    rows, columns = len(a), len(b)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    distances = np.empty((rows, columns), np.int32)
    faiss.hammings(
        faiss.swig_ptr(a), faiss.swig_ptr(b), rows, columns, a.shape[1], faiss.swig_ptr(distances)
    )
    nearest = distances.argmin(axis=1)
    every = np.arange(rows)
    first = distances[every, nearest]
    distances[every, nearest] = _FARTHEST
    return first, distances.min(axis=1), nearest


def _ratio_matches(
    a: Features, b: Features, settings: VerifySettings
) -> tuple[np.ndarray, np.ndarray] | None:
    """(points in a, points in b) of ORB matches passing Lowe's ratio test; None if too few."""
    (points_a, descriptors_a), (points_b, descriptors_b) = a, b
    if descriptors_a is None or descriptors_b is None or len(points_a) < 2 or len(points_b) < 2:
        return None
    if min(len(points_a), len(points_b)) > PREFILTER_KEYPOINTS:
        first, second, _ = _two_nearest(
            descriptors_a[:PREFILTER_KEYPOINTS], descriptors_b[:PREFILTER_KEYPOINTS]
        )
        if int((first < settings.orb_ratio * second).sum()) < PREFILTER_MATCHES:
            return None
    first, second, nearest = _two_nearest(descriptors_a, descriptors_b)
    good = first < settings.orb_ratio * second
    if int(good.sum()) < settings.min_inliers:
        return None
    return points_a[good], points_b[nearest[good]]


def _aligned(
    a: Picture,
    b: Picture,
    matches: tuple[np.ndarray, np.ndarray],
    settings: VerifySettings,
) -> tuple[int, float] | str | None:
    """(inliers, correlation) when a similarity transform, or failing that a homography,
    maps a onto b with enough inliers, overlap and aligned correlation; ``LINED_UP`` when one
    did but failed the overlap or the correlation; else None."""
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
    if not spread(src[mask.ravel().astype(bool)], a.grey.shape):
        return None
    # A watermark over a strip lowers the whole-overlap correlation of a true copy (0.46 of
    # text copies reach 0.8), so most tiles agreeing closely also counts; the median tile alone
    # at 0.8 merged two different Fashion-MNIST sneakers (whole overlap 0.70, median tile 0.82).
    tile_bar = (1 + settings.min_correlation) / 2

    def verdict(transform: np.ndarray, inliers: int) -> tuple[int, float] | None:
        whole, tiles = picture_correlation(
            a, b, transform, settings.min_overlap, enough=settings.min_correlation
        )
        if whole >= settings.min_correlation:
            return inliers, whole
        if tiles >= tile_bar:
            return inliers, tiles
        return None

    transform = np.vstack([similarity, [0, 0, 1]])
    found = verdict(transform, int(mask.sum()))
    if found is not None:
        return found
    # The homography only when the similarity fails (perspective): computing it for every
    # RANSAC-passing pair was 3% of pass 2 on bench/clean_throughput.py's photos. OpenCV's
    # RANSAC seeds its generator afresh on every call, so skipping one changes no other result.
    # And not when the similarity's overlap is far short (``HOMOGRAPHY_OVERLAP_SLACK``):
    # overlapping crops of one photograph, which a homography does not make overlap more.
    if overlap_bound(a, b, transform) < settings.min_overlap - HOMOGRAPHY_OVERLAP_SLACK:
        return LINED_UP
    homography, hmask = cv2.findHomography(src, dst, cv2.RANSAC, 5.0, maxIters=500)
    if homography is None or hmask is None or int(hmask.sum()) < settings.min_inliers:
        return LINED_UP
    return verdict(homography, int(hmask.sum())) or LINED_UP
