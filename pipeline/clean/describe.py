"""Pass 2's per-image half: what the verify workers need of each image, computed once.

Consumes the normalised images in data/clean that some candidate pair needs (verify.py says
which, and whether a pair compares it mirrored). Produces a ``Described`` per image: its ORB
keypoints and descriptors (strongest first; and its mirror's when a pair needs them), the small
grey picture and mask the dense fallback aligns (``aligned.dense_picture``), and whether the
dense fallback may judge it at all (``dense_suitable``). Computed on the workers in tasks of
``DESCRIBE_BATCH`` images from one read of each file, and shipped to the verify workers as
arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.clean.aligned import DENSE_SIDE, dense_picture, picture_mask
from pipeline.clean.records import ImageRecord
from pipeline.clean.workers import WorkerPool

# ORB needs ~31 px patches around each keypoint; tiny images are upscaled to this side first.
ORB_SIDE = 256
DESCRIBE_BATCH = 32  # images per describe task
DENSE_MIN_PICTURE = 0.6  # see dense_suitable

Features = tuple[np.ndarray, np.ndarray | None]  # keypoint coordinates (n, 2), descriptors


@dataclass(frozen=True)
class Described:
    """One image as the verify workers need it; ``mirrored`` only when a pair uses it."""

    plain: Features
    mirrored: Features | None
    dense: tuple[np.ndarray, np.ndarray]  # aligned.dense_picture: small grey, picture mask
    dense_ok: bool  # whether the dense fallback may judge it (see ``dense_suitable``)


@dataclass(frozen=True)
class DescribeTask:
    images: tuple[tuple[int, str, bool], ...]  # (index, normalised file, mirror needed)
    orb_features: int


def describe_all(
    orb_features: int,
    candidates: Sequence[tuple[int, int, bool, float, float]],
    records: Sequence[ImageRecord],
    out: Path,
    pool: WorkerPool,
    have: Mapping[int, Described],
) -> dict[int, Described]:
    """``Described`` of every image a candidate pair needs that ``have`` lacks (or has
    without the mirror a pair needs), computed on the workers."""
    needed: dict[int, bool] = {}
    for i, j, flip, *_ in candidates:
        needed.setdefault(i, False)
        needed[j] = needed.get(j, False) or flip
    indices = [
        i for i in sorted(needed) if i not in have or (needed[i] and have[i].mirrored is None)
    ]
    tasks = [
        DescribeTask(
            images=tuple(
                (i, str(out / records[i].image.clean_path), needed[i])
                for i in indices[start : start + DESCRIBE_BATCH]
            ),
            orb_features=orb_features,
        )
        for start in range(0, len(indices), DESCRIBE_BATCH)
    ]
    described: dict[int, Described] = {}
    for batch in pool.map(describe_images, tasks, "clean: describe", unit="batch"):
        described.update(batch)
    return described


def read_grey(path: Path) -> np.ndarray:
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return np.zeros((1, 1), np.uint8) if grey is None else grey


def for_orb(grey: np.ndarray) -> np.ndarray:
    scale = ORB_SIDE / max(grey.shape)
    if scale > 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return grey


def mirror(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(grey[:, ::-1])


def describe_images(task: DescribeTask) -> dict[int, Described]:
    """ORB keypoints of each image (and of its mirror when asked) and its dense grey.

    Computed once per image and shipped to the matching workers as arrays, because pairs from
    nearest neighbours scatter over all images and per-batch recomputation cost 16x more.
    """
    orb = cv2.ORB_create(nfeatures=task.orb_features)

    def features(grey: np.ndarray) -> Features:
        keypoints, descriptors = orb.detectAndCompute(grey, None)
        # Strongest first, for _ratio_matches' quick look at the first PREFILTER_KEYPOINTS.
        order = np.argsort([-k.response for k in keypoints], kind="stable")
        points = np.float32([keypoints[n].pt for n in order]).reshape(-1, 2)
        return points, None if descriptors is None else descriptors[order]

    described = {}
    for index, path, mirrored in task.images:
        stored = read_grey(Path(path))
        grey = for_orb(stored)
        dense = dense_picture(grey)
        described[index] = Described(
            plain=features(grey),
            mirrored=features(mirror(grey)) if mirrored else None,
            dense=dense,
            dense_ok=dense_suitable(stored),
        )
    return described


def dense_suitable(grey: np.ndarray) -> bool:
    """Whether the dense fallback may judge this stored image: at least DENSE_SIDE
    pixels on its long side, and a picture (not a flat background) on at least
    DENSE_MIN_PICTURE of it. An upscaled thumbnail or an object on a plain background has no
    fine detail of its own, only its outline: the dense check merged 45 different plain
    Fashion-MNIST shirts of the demo (28 px) at correlations of 0.90-0.95."""
    return max(grey.shape) >= DENSE_SIDE and float(picture_mask(grey).mean()) >= DENSE_MIN_PICTURE
