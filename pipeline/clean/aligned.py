"""Pass 2's precision guard and its dense fallback: are two images, once aligned, one picture?

Consumes two grey images and a transform mapping the first onto the second (from ORB + RANSAC
in verify.py, or from ``dense_transform`` here). Produces the evidence verify.py decides on:
how much of each one's content the other covers, and how well their fine detail correlates
over the overlap (whole overlap and median of ``TILES`` × ``TILES`` tiles).

``dense_transform`` aligns pictures ORB cannot: low-texture photos (sky, cells, a smooth
clock face) give ORB no keypoints at all. It maximises OpenCV's enhanced correlation
coefficient (``cv2.findTransformECC``) over the whole picture: an affine warp on a 64 px
thumbnail, started from the map between the two pictures' content boxes (so letterboxing and
size changes start aligned), then a homography at ``DENSE_SIDE``. The same correlation test
as ORB's then decides, on detail a little coarser than ORB's (``DENSE_FINE_SIGMA``): a dense
warp of a rotated or perspective copy resamples it and softens its finest grain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.clean.embed import TRIM_MIN_AREA, content_box

TILES = 4  # the aligned correlation is the median over a TILES × TILES grid
MIN_TILES = 4  # tiles with enough overlap and detail needed for a verdict
MIN_SPREAD = 0.2  # inliers must span this fraction of the image's width and of its height
DETAIL_SIGMA = 4.0  # detail is what a Gaussian blur of this sigma (pixels) removes
DENSE_SIDE = 128  # long side (pixels) of the images the dense fallback aligns and compares
DENSE_COARSE_SIDE = 64  # long side of the first, affine, alignment
DENSE_FINE_SIGMA = 1.5  # dense: detail finer than this blur is resampling noise, not picture
DENSE_ITERATIONS = 20  # at most, for the coarse affine alignment
DENSE_FINE_ITERATIONS = 20  # at most, for the homography that refines it
# The refinement is the costly step, so only pairs whose coarse alignment already agrees this
# well (ECC's correlation coefficient) get it: on bench/clean_recall.py 0.99 of the copies the
# dense check confirmed agree this well, and about 0.85 of look-alike low-texture pairs do not.
DENSE_MIN_COARSE_AGREEMENT = 0.5
# And only pairs whose coarse alignment already overlaps nearly enough (within this much of
# ``orb_min_overlap``) and whose detail already correlates this well: overlapping crops of one
# sky or cell photo align coarsely but never pass. On bench/clean_recall.py and the
# throughput photos every copy the dense check confirmed clears both (coarse overlap ≥ 0.63,
# correlation ≥ 0.44), while half (photos) to three quarters (recall set) of the refinements
# are skipped: the dense check costs 0.5x as much.
DENSE_COARSE_OVERLAP_SLACK = 0.1
DENSE_MIN_COARSE_CORRELATION = 0.3
FILL_TOLERANCE = 2  # grey levels: a rotated copy's corners and a bar are one exact colour
DENSE_EPS = 1e-4


def spread(points: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether inliers span at least MIN_SPREAD of the image in both directions. The same
    watermark on two different photos matched along its strip alone (bench/clean_recall.py:
    every false merge there was text-on-text), while a copy's inliers cover the picture."""
    span = np.ptp(points, axis=0) / np.array([shape[1], shape[0]], dtype=np.float64)
    return bool(span.min() >= MIN_SPREAD)


@dataclass(frozen=True)
class Picture:
    """A grey image as ``picture_correlation`` compares it: its ``content_box`` and a
    function giving its ``high_pass`` detail, asked for only when the overlap test passes.
    verify.py passes cached ones: recomputing both for every pair was 0.4 of the correlation
    step's time on bench/clean_throughput.py's photos."""

    grey: np.ndarray
    box: tuple[int, int, int, int]
    detail: Callable[[], np.ndarray]

    @classmethod
    def of(cls, grey: np.ndarray) -> Picture:
        return cls(grey, content_box(grey), lambda: high_pass(grey))


def aligned_correlation(
    a: np.ndarray,
    b: np.ndarray,
    transform: np.ndarray,
    min_overlap: float,
    masks: tuple[np.ndarray, np.ndarray] | None = None,
    enough: float = np.inf,
) -> tuple[float, float]:
    """(whole-overlap, median tile) correlation of fine detail where a, warped by
    ``transform`` (3×3), overlaps b; 0s when the pictures share less than ``min_overlap`` of
    either one's content. Content is inside ``content_box`` unless ``masks`` (uint8, 1 =
    picture) are given: then detail is measured within them only and finer than
    ``DENSE_FINE_SIGMA`` is ignored (the dense fallback's images).

    When the whole-overlap correlation reaches ``enough`` the tile median is not computed and
    0 is returned for it, for callers whose verdict it then cannot change: it is half the
    cost of a correlation, and on bench/clean_throughput.py's photos 1,535 of the 1,749 ORB
    pairs correlated pass on the whole overlap."""
    if masks is None:
        return picture_correlation(Picture.of(a), Picture.of(b), transform, min_overlap, enough)
    mask_a, mask_b = masks
    covered_b = _covered(a, b, mask_a, mask_b, transform, min_overlap)
    if covered_b is None:
        return 0.0, 0.0
    # Pixels next to the warped edge of a's picture mix in what lies outside it.
    covered_b = cv2.erode(covered_b, np.ones((3, 3), np.uint8))
    detail_a, detail_b = masked_detail(a, mask_a), masked_detail(b, mask_b)
    return _detail_correlation(detail_a, detail_b, transform, covered_b & mask_b, enough)


def picture_correlation(
    a: Picture, b: Picture, transform: np.ndarray, min_overlap: float, enough: float = np.inf
) -> tuple[float, float]:
    """``aligned_correlation`` of two ``Picture``s (content inside their content boxes).

    A pair whose boxes, one warped onto the other, clearly overlap less than ``min_overlap``
    is rejected from the geometry alone (``overlap_bound``), without rasterising masks: on
    bench/clean_throughput.py's photos 2,671 of the 4,564 ORB pairs reaching this step (all
    but 144 of those the pixel test rejects), which cut pass 2's ORB checks by 0.1."""
    if overlap_bound(a, b, transform) < min_overlap:
        return 0.0, 0.0
    mask_a, mask_b = _box_mask(a.grey.shape, a.box), _box_mask(b.grey.shape, b.box)
    covered_b = _covered(a.grey, b.grey, mask_a, mask_b, transform, min_overlap)
    if covered_b is None:
        return 0.0, 0.0
    return _detail_correlation(a.detail(), b.detail(), transform, covered_b & mask_b, enough)


def _covered(
    a: np.ndarray,
    b: np.ndarray,
    mask_a: np.ndarray,
    mask_b: np.ndarray,
    transform: np.ndarray,
    min_overlap: float,
) -> np.ndarray | None:
    """``mask_a`` warped onto b, or None when a's and b's content overlap by less than
    ``min_overlap`` of either one's (or ``transform`` is singular)."""
    height, width = b.shape
    try:
        inverse = np.linalg.inv(transform)
    except np.linalg.LinAlgError:
        return None
    covered_b = cv2.warpPerspective(mask_a, transform, (width, height), flags=cv2.INTER_NEAREST)
    covered_a = cv2.warpPerspective(mask_b, inverse, a.shape[::-1], flags=cv2.INTER_NEAREST)
    # Masks hold 0 and 1: a count of the non-zero is their sum, and OpenCV's is 10x numpy's.
    overlap_b = cv2.countNonZero(covered_b & mask_b) / max(cv2.countNonZero(mask_b), 1)
    overlap_a = cv2.countNonZero(covered_a & mask_a) / max(cv2.countNonZero(mask_a), 1)
    # Neighbouring crops of one photograph share up to 60% (bench/clean_recall.py); a 10% crop
    # keeps 81% of the original and is wholly inside it.
    if min(overlap_a, overlap_b) < min_overlap:
        return None
    return covered_b


def _detail_correlation(
    detail_a: np.ndarray,
    detail_b: np.ndarray,
    transform: np.ndarray,
    covered: np.ndarray,
    enough: float,
) -> tuple[float, float]:
    """(whole, median tile) correlation of ``detail_a`` warped onto ``detail_b`` within
    ``covered`` (uint8); the tiles' 0 when the whole reaches ``enough``."""
    height, width = detail_b.shape
    warped = cv2.warpPerspective(detail_a, transform, (width, height))
    if not cv2.countNonZero(covered):
        return 0.0, 0.0
    whole = _correlation(warped, detail_b, covered)[0]
    if whole >= enough:
        return whole, 0.0
    correlations = []
    for row in range(TILES):
        for col in range(TILES):
            rows = slice(row * height // TILES, (row + 1) * height // TILES)
            cols = slice(col * width // TILES, (col + 1) * width // TILES)
            inside = covered[rows, cols]
            if cv2.countNonZero(inside) < 0.5 * inside.size:
                continue
            correlation, spread_x, spread_y = _correlation(
                warped[rows, cols], detail_b[rows, cols], inside
            )
            if spread_x < 1e-3 or spread_y < 1e-3:
                continue  # a flat tile (background) says nothing
            correlations.append(correlation)
    if len(correlations) < MIN_TILES:
        return whole, 0.0
    return whole, float(np.median(correlations))


def _box_mask(shape: tuple[int, ...], box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    mask = np.zeros(shape, np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


def overlap_bound(a: Picture, b: Picture, transform: np.ndarray) -> float:
    """An upper bound on the overlap ``_covered`` measures (the lesser share of either box's
    pixels the other, warped, covers), from the boxes' corners alone; 1 when the warp does not
    keep a box a bounded convex quadrilateral. A warped box covers the pixels whose centres
    its corners' quadrilateral (each box grown by half a pixel) contains: at most its area
    plus half its perimeter plus 1 (convex sets), and a whole perimeter of margin is taken."""
    try:
        inverse = np.linalg.inv(transform)
    except np.linalg.LinAlgError:
        return 1.0
    bound = 1.0
    # Plain floats: numpy's per-call overhead on 4 corners was half of this function's time.
    for source, target, matrix in ((a, b, transform.tolist()), (b, a, inverse.tolist())):
        left, top, right, bottom = (v - 0.5 for v in source.box)
        (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = matrix
        quad = []
        for x, y in ((left, top), (right, top), (right, bottom), (left, bottom)):
            w = m20 * x + m21 * y + m22
            if w < 1e-6:  # at or behind the horizon: not a bounded quadrilateral
                return 1.0
            quad.append(((m00 * x + m01 * y + m02) / w, (m10 * x + m11 * y + m12) / w))
        if max(abs(v) for point in quad for v in point) > 1e6:
            return 1.0
        left, top, right, bottom = (v - 0.5 for v in target.box)
        frame = np.float32([[left, top], [right, top], [right, bottom], [left, bottom]])
        hull = cv2.convexHull(np.float32(quad))
        if len(hull) < 3:
            return 0.0  # degenerate: the warp flattens the box to a line
        area, common = cv2.intersectConvexConvex(hull, frame)
        perimeter = 0.0 if common is None else cv2.arcLength(common, True)
        pixels = (target.box[2] - target.box[0]) * (target.box[3] - target.box[1])
        bound = min(bound, (area + perimeter + 4) / max(pixels, 1))
    return bound


def _correlation(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> tuple[float, float, float]:
    """(Pearson correlation, standard deviation of x, of y) of two float32 images over
    ``mask`` (uint8, 0 or 1); the correlation 0 when either is flat. From five sums of the
    masked images and their products, accumulated by OpenCV in double precision: 2.3x faster
    on 256 px detail than OpenCV's masked mean and deviation (3 passes), 2.5x numpy's before
    that, and equal to within 1e-9 (detail has a mean near 0, so the sums do not cancel)."""
    count = cv2.countNonZero(mask)
    if not count:
        return 0.0, 0.0, 0.0
    x = cv2.multiply(x, mask, dtype=cv2.CV_32F)
    y = cv2.multiply(y, mask, dtype=cv2.CV_32F)
    mean_x, mean_y = cv2.sumElems(x)[0] / count, cv2.sumElems(y)[0] / count
    sx = max(cv2.sumElems(cv2.multiply(x, x))[0] / count - mean_x * mean_x, 0.0) ** 0.5
    sy = max(cv2.sumElems(cv2.multiply(y, y))[0] / count - mean_y * mean_y, 0.0) ** 0.5
    if sx * sy <= 1e-9:
        return 0.0, sx, sy
    mean_xy = cv2.sumElems(cv2.multiply(x, y))[0] / count
    return (mean_xy - mean_x * mean_y) / (sx * sy), sx, sy


def high_pass(grey: np.ndarray) -> np.ndarray:
    # Correlating detail, not shading: two different plain shirts aligned by RANSAC correlate
    # above 0.95 in raw grey levels (measured on Fashion-MNIST), but below 0.8 once the
    # silhouette's smooth shading is subtracted; true copies stay above 0.8.
    grey = grey.astype(np.float32)
    return grey - cv2.GaussianBlur(grey, (0, 0), DETAIL_SIGMA)


def masked_detail(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Detail between DENSE_FINE_SIGMA and DETAIL_SIGMA of the picture inside ``mask``, with
    the blurs normalised by the mask, so the edge of a rotated copy's black corners or of a
    letterbox bar is no detail (two different rotated sky photos once correlated 0.97 along
    their corners alone); 0 outside the mask."""
    weight = mask.astype(np.float32)
    grey = grey.astype(np.float32) * weight

    def blur(sigma: float) -> np.ndarray:
        total = cv2.GaussianBlur(weight, (0, 0), sigma)
        return cv2.GaussianBlur(grey, (0, 0), sigma) / np.maximum(total, 1e-3)

    return (blur(DENSE_FINE_SIGMA) - blur(DETAIL_SIGMA)) * weight


def picture_mask(grey: np.ndarray) -> np.ndarray:
    """uint8 mask, 1 over the picture and 0 over flat fill touching a corner: letterbox bars
    and a rotated copy's corners (``FILL_TOLERANCE`` grey levels from the corner's colour).
    (A plain picture may be all fill.)"""
    height, width = grey.shape
    flood = np.zeros((height + 2, width + 2), np.uint8)
    flags = 4 | cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    work = grey.copy()
    for x, y in ((0, 0), (width - 1, 0), (0, height - 1), (width - 1, height - 1)):
        if not flood[y + 1, x + 1]:
            cv2.floodFill(work, flood, (x, y), 0, FILL_TOLERANCE, FILL_TOLERANCE, flags)
    return 1 - flood[1:-1, 1:-1]


def dense_picture(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey at DENSE_SIDE with its fill set to the picture's mean grey, its picture mask):
    what the dense fallback aligns and compares. Without the fill's edges ECC aligns the
    picture, not the frame around it."""
    mask = picture_mask(grey)
    if mask.mean() < TRIM_MIN_AREA:
        mask = np.ones_like(grey)  # a plain picture: all of it
    small, small_mask = dense_grey(grey), dense_grey(mask * 255)
    picture = small_mask >= 250  # pixels wholly inside the picture
    if not picture.any():
        return small, np.ones_like(small)
    filled = small.copy()
    filled[~picture] = int(small[picture].mean())
    return filled, picture.astype(np.uint8)


def dense_grey(grey: np.ndarray) -> np.ndarray:
    """``grey`` with its long side at DENSE_SIDE: what the dense fallback works on."""
    scale = DENSE_SIDE / max(grey.shape)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=interpolation)


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def dense_transform(
    a: np.ndarray, b: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray, min_overlap: float
) -> np.ndarray | None:
    """A 3×3 transform mapping ``a`` onto ``b`` (both from ``dense_picture``, with their
    masks) that maximises their correlation, or None when ECC does not converge or the coarse
    alignment agrees less than DENSE_MIN_COARSE_AGREEMENT, overlaps less than
    ``min_overlap`` - DENSE_COARSE_OVERLAP_SLACK or correlates less than
    DENSE_MIN_COARSE_CORRELATION."""
    (la, ta, ra, ba), (lb, tb, rb, bb) = _box(mask_a), _box(mask_b)
    sx, sy = (rb - lb) / max(ra - la, 1), (bb - tb) / max(ba - ta, 1)
    coarse = DENSE_COARSE_SIDE / max(a.shape)
    start = np.array([[sx, 0, lb - sx * la], [0, sy, tb - sy * ta]], np.float32)
    start[:, 2] *= coarse
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, DENSE_ITERATIONS, DENSE_EPS)
    small_a = cv2.resize(a, None, fx=coarse, fy=coarse, interpolation=cv2.INTER_AREA)
    small_b = cv2.resize(b, None, fx=coarse, fy=coarse, interpolation=cv2.INTER_AREA)
    if min(small_a.shape + small_b.shape) < 8:
        return None
    try:
        # ECC finds W with b(W x) ≈ a(x): W maps a's coordinates onto b's.
        agreement, affine = cv2.findTransformECC(
            small_a.astype(np.float32),
            small_b.astype(np.float32),
            start,
            cv2.MOTION_AFFINE,
            criteria,
            None,
            3,
        )
        if agreement < DENSE_MIN_COARSE_AGREEMENT:
            return None
        affine[:, 2] /= coarse
        start_h = np.vstack([affine, [0, 0, 1]]).astype(np.float32)
        whole, tiles = aligned_correlation(
            a,
            b,
            start_h,
            min_overlap - DENSE_COARSE_OVERLAP_SLACK,
            masks=(mask_a, mask_b),
            enough=DENSE_MIN_COARSE_CORRELATION,
        )
        if max(whole, tiles) < DENSE_MIN_COARSE_CORRELATION:
            return None
        fine = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, DENSE_FINE_ITERATIONS, DENSE_EPS)
        _, homography = cv2.findTransformECC(
            a.astype(np.float32),
            b.astype(np.float32),
            start_h,
            cv2.MOTION_HOMOGRAPHY,
            fine,
            None,
            3,
        )
    except cv2.error:
        return None  # not converged, or a flat image
    return homography.astype(np.float64)
