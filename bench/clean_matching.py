"""Pass 2's descriptor matching: the stage's search against faiss's ``knn_hamming`` and
OpenCV's ``batchDistance``.

Pass 2's ratio test needs, for each ORB descriptor of one image, the Hamming distances to its
two nearest descriptors of the other (``verify._two_nearest``). This times both libraries on
the same pairs of real ORB descriptors, described exactly as the stage does
(``describe.describe_images``) from the throughput bench's photos (``clean_throughput.photo_set``),
at the two sizes the stage uses: the strongest ``PREFILTER_KEYPOINTS`` of each image (the
quick look every pair gets) and all of them (``clean.orb_features``, default 500). The stage's
search (``verify._two_nearest``: every distance from faiss's ``hammings``, then the two
smallest per row) against faiss's heap search ``knn_hamming`` (which the stage used before)
and OpenCV's ``batchDistance``. One thread each, as in a clean worker. All must give the same
distances; the ratios are printed.

    python bench/clean_matching.py               # 60 photos, 400 pairs
    python bench/clean_matching.py --photos 200 --pairs 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import faiss
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from pipeline.clean.describe import DescribeTask, describe_images, read_entry  # noqa: E402
from pipeline.clean.verify import PREFILTER_KEYPOINTS, _two_nearest  # noqa: E402
from pipeline.config import CleanConfig  # noqa: E402


def opencv_two_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return cv2.batchDistance(a, b, cv2.CV_32S, normType=cv2.NORM_HAMMING, K=2)


def faiss_two_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return faiss.knn_hamming(a, b, 2)


def stage_two_nearest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first, second, nearest = _two_nearest(a, b)
    return np.stack([first, second], axis=1), nearest


def timed(function, pairs: list[tuple[np.ndarray, np.ndarray]], repeats: int) -> float:
    """CPU seconds per pair, best of ``repeats`` passes over ``pairs``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for a, b in pairs:
            function(a, b)
        best = min(best, time.process_time() - start)
    return best / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from clean_throughput import photo_set

    cv2.setNumThreads(1)
    faiss.omp_set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        raw = photo_set(Path(work), args.photos)
        files = sorted((raw / "photos").glob("*.jpg"))
        task = DescribeTask(
            images=tuple((n, str(f), True, False) for n, f in enumerate(files)),
            orb_features=CleanConfig().orb_features,
            path=str(Path(work) / "described.pkl"),
            known={},
        )
        described = {key: read_entry(where) for key, where in describe_images(task).items()}
    # The stage matches only images with 2 keypoints or more (_ratio_matches).
    descriptors = [
        d.plain[1] for d in described.values() if d.plain[1] is not None and len(d.plain[1]) > 1
    ]
    rng = np.random.default_rng(0)
    chosen = [rng.choice(len(descriptors), 2, replace=False) for _ in range(args.pairs)]
    sizes = {"strongest": PREFILTER_KEYPOINTS, "all": None}
    median = int(np.median([len(d) for d in descriptors]))
    print(
        f"{len(descriptors)} photos described (median {median} keypoints), {args.pairs} "
        f"random pairs, one thread, CPU time per pair (best of {args.repeats})"
    )
    for name, size in sizes.items():
        pairs = [(descriptors[i][:size], descriptors[j][:size]) for i, j in chosen]
        for a, b in pairs:
            ours = stage_two_nearest(a, b)[0]
            for other in (faiss_two_nearest, opencv_two_nearest):
                if not np.array_equal(ours, other(a, b)[0]):
                    raise SystemExit(f"{other.__name__} disagrees on a pair's distances")
        opencv = timed(opencv_two_nearest, pairs, args.repeats)
        heap = timed(faiss_two_nearest, pairs, args.repeats)
        ours = timed(stage_two_nearest, pairs, args.repeats)
        print(
            f"{name:>9} descriptors: stage {ours * 1e3:.3f} ms, faiss knn_hamming "
            f"{heap * 1e3:.3f} ms ({heap / ours:.2f}x the stage's), OpenCV batchDistance "
            f"{opencv * 1e3:.3f} ms ({opencv / ours:.2f}x) (same distances)"
        )


if __name__ == "__main__":
    main()
