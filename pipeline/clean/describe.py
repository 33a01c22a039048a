"""Pass 2's per-image half: what the verify workers need of each image, computed once.

Consumes the normalised images in data/clean that some candidate pair needs (verify.py says
which, and whether a pair compares it mirrored). Produces a ``Described`` per image: its ORB
keypoints and descriptors (strongest first; a sparse, low-texture picture's found with FAST's
threshold lowered to ``SPARSE_FAST_THRESHOLD``) and whether it is sparse; and its mirror's
keypoints when a pair needs them (the dense fallback's picture is made by the verify worker
that first needs it, with ``dense_suitable``: most images never do). Computed on the
workers in tasks of ``DESCRIBE_BATCH`` images from one read of each file, written to the run's
``DescribedStore`` and read from there by the verify workers (``DescribedCache``).
"""

from __future__ import annotations

import pickle
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from pipeline.clean.aligned import DENSE_SIDE, picture_mask
from pipeline.clean.kept import Kept, enter_run, nbytes, run_scoped
from pipeline.clean.workers import WorkerPool

# ORB needs ~31 px patches around each keypoint; tiny images are upscaled to this side first.
ORB_SIDE = 256
# Below this many ORB keypoints (bench: 0–100 on sky, cells, the clock; 500, the cap, on
# textured photos) an image is sparse: the default detector has too little to go on, so it is
# described with FAST's threshold at SPARSE_FAST_THRESHOLD instead of 20 (faint cloud and
# cell texture gives keypoints that match: on bench/clean_recall.py ORB then confirmed 0.90 of
# the pairs the dense fallback had, at a twentieth of its cost), and the dense fallback judges
# what those keypoints do not line up (verify.py).
SPARSE_KEYPOINTS = 150
SPARSE_FAST_THRESHOLD = 4
OPEN_STORE_FILES = 64  # store files a verify worker keeps open
DESCRIBE_BATCH = 32  # images per describe task
STORE = ".pass2"  # DescribedStore's directory under the clean output
DENSE_MIN_PICTURE = 0.6  # see dense_suitable
# What a worker keeps of the normalised greys (and verify.py's content boxes, upscales and
# dense pictures of them) between tasks.
GREY_CACHE_BYTES = 112 * 2**20

Features = tuple[np.ndarray, np.ndarray | None]  # keypoint coordinates (n, 2), descriptors
Located = tuple[str, int, int]  # DescribedStore: file, offset, length of one entry


@dataclass(frozen=True)
class Described:
    """One image as the verify workers need it (its mirror's keypoints are stored apart)."""

    plain: Features
    sparse: bool  # the default detector found under SPARSE_KEYPOINTS keypoints


@dataclass(frozen=True)
class DescribeTask:
    # (index, normalised file, the image needed, its mirror needed)
    images: tuple[tuple[int, str, bool, bool], ...]
    orb_features: int
    path: str  # the store file this task writes
    # (index, mirrored) -> what an earlier round stored of an image, for a mirror-only task
    known: dict[int, Located]
    run: str  # this run's DescribedStore folder (kept.enter_run)


class DescribedStore:
    """Where the describe workers leave each image's ``Described`` and its mirror's
    ``Features`` for the verify workers: one file per describe task in ``STORE`` under the
    clean output, for the length of one run (Dask workers see it as they see the images), and
    where each entry lies in it (``located``).

    Files, not task arguments: shipping each verify task the arrays of the images its pairs
    need pickled 2.0 GB through the pool's pipes for the throughput bench's 1,500 photos
    (every image went out about 15 times), against 126 MB written once; pass 2 with 2 workers
    cost 0.83x the CPU and 0.81x the wall time. One file per task, not per image: a file
    created or opened cost 0.3 ms here, 2 CPU-s over the 1,500 photos."""

    def __init__(self, out: Path) -> None:
        self.top = out / STORE
        # A folder of its own per run: long-lived (Dask) workers key what they keep by it.
        self.root = self.top / uuid.uuid4().hex[:12]
        self.located: dict[tuple[int, bool], Located] = {}
        self._files = 0

    def reset(self) -> None:
        """Empty (a killed run may have left files behind)."""
        shutil.rmtree(self.top, ignore_errors=True)
        self.root.mkdir(parents=True)
        self.located.clear()

    def remove(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)
        self.located.clear()

    def new_path(self) -> str:
        self._files += 1
        return str(self.root / f"{self._files}.pkl")


class DescribedCache:
    """What one worker read from a run's store, up to ``limit`` bytes (``kept.Kept``), with
    the store files it read kept open (a worker's tasks share images)."""

    def __init__(self, limit: int) -> None:
        # An entry counts its pickled bytes and its arrays.
        self.kept = Kept(lambda: limit, lambda where, value: where[2] + _entry_bytes(value))
        self.files: OrderedDict[str, BinaryIO] = OrderedDict()

    def get(self, where: Located) -> Any:
        return self.kept.get(where, lambda: _load(self._file(where[0]), where))

    def _file(self, path: str) -> BinaryIO:
        file = self.files.get(path)
        if file is None:
            file = self.files[path] = open(path, "rb")  # noqa: SIM115 (closed in clear)
            while len(self.files) > OPEN_STORE_FILES:
                self.files.popitem(last=False)[1].close()
        else:
            self.files.move_to_end(path)
        return file

    def clear(self) -> None:
        self.kept.clear()
        for file in self.files.values():
            file.close()
        self.files.clear()


# A verify task's pairs share images with the tasks before it: reading the greys again was a
# quarter of pass 2's time. And a describe task's reads are kept for the verify tasks the same
# worker runs next: on bench/clean_throughput.py's photos verifying read 1,485 greys again
# after describing had read them.
greys = Kept(lambda: GREY_CACHE_BYTES)
run_scoped(greys.clear)


def stored_grey(path: str) -> np.ndarray:
    """The normalised image at ``path`` in grey, as stored, kept in this worker."""
    return greys.get((path, "stored", False), lambda: read_grey(Path(path)))


def read_entry(where: Located) -> Any:
    """One entry of a store file, read on its own."""
    with open(where[0], "rb") as file:
        return _load(file, where)


def _load(file: BinaryIO, where: Located) -> Any:
    _, offset, length = where
    file.seek(offset)
    return pickle.loads(file.read(length))


def _entry_bytes(value: object) -> int:
    """A store entry's arrays (a Described's features, or a mirror's)."""
    return nbytes(value.plain if isinstance(value, Described) else value)


def describe_all(
    orb_features: int,
    needed: Mapping[int, bool],
    files: Mapping[int, str],
    pool: WorkerPool,
    store: DescribedStore,
) -> None:
    """Describe into ``store`` every image in ``needed`` that it lacks, and the mirror of
    every one ``needed`` says is compared mirrored that it lacks."""
    have = store.located
    todo = [
        (i, (i, False) not in have, mirrored and (i, True) not in have)
        for i, mirrored in sorted(needed.items())
        if (i, False) not in have or (mirrored and (i, True) not in have)
    ]
    tasks = []
    for start in range(0, len(todo), DESCRIBE_BATCH):
        chunk = todo[start : start + DESCRIBE_BATCH]
        tasks.append(
            DescribeTask(
                images=tuple((i, files[i], plain, mirrored) for i, plain, mirrored in chunk),
                orb_features=orb_features,
                path=store.new_path(),
                known={i: have[i, False] for i, plain, _ in chunk if not plain},
                run=str(store.root),
            )
        )
    for located in pool.map(describe_images, tasks, "clean: describe", unit="batch"):
        have.update(located)


def read_grey(path: Path) -> np.ndarray:
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return np.zeros((1, 1), np.uint8) if grey is None else grey


def for_orb(grey: np.ndarray) -> np.ndarray:
    """``grey`` as ORB sees it: upscaled to ORB_SIDE when smaller (``orb_upscales``), else
    itself."""
    if orb_upscales(grey):
        scale = ORB_SIDE / max(grey.shape)
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return grey


def orb_upscales(grey: np.ndarray) -> bool:
    return max(grey.shape) < ORB_SIDE


def mirror(grey: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(grey[:, ::-1])


def describe_images(task: DescribeTask) -> dict[tuple[int, bool], Located]:
    """ORB keypoints of each image (and of its mirror when asked), written to the task's
    store file; where each went.

    Computed once per image and read by the matching workers, because pairs from nearest
    neighbours scatter over all images and per-batch recomputation cost 16x more.
    """
    enter_run(task.run)
    orb = cv2.ORB_create(nfeatures=task.orb_features)
    sensitive = cv2.ORB_create(nfeatures=task.orb_features, fastThreshold=SPARSE_FAST_THRESHOLD)

    def features(grey: np.ndarray, sparse: bool | None, small: bool) -> tuple[Features, bool]:
        """(features, sparse); ``sparse`` None: the default detector decides, but a ``small``
        stored image (upscaled for ORB) is never sparse: what the sensitive threshold finds on
        it is interpolation, not texture (on 5,000 28/56 px demo images it doubled pass 2's
        cost and merged 8 more pairs)."""
        keypoints, descriptors = (sensitive if sparse else orb).detectAndCompute(grey, None)
        if sparse is None:
            sparse = not small and len(keypoints) < SPARSE_KEYPOINTS
            if sparse:
                keypoints, descriptors = sensitive.detectAndCompute(grey, None)
        # Strongest first, for _ratio_matches' quick look at the first PREFILTER_KEYPOINTS.
        order = np.argsort([-k.response for k in keypoints], kind="stable")
        points = np.float32(cv2.KeyPoint_convert(keypoints)).reshape(-1, 2)[order]
        return (points, None if descriptors is None else descriptors[order]), sparse

    located: dict[tuple[int, bool], Located] = {}
    # Written in place: the parent reads only what finished tasks returned, and a killed
    # run's store is emptied by the next.
    with open(task.path, "wb") as file:

        def put(key: tuple[int, bool], value: object) -> None:
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            located[key] = (task.path, file.tell(), len(data))
            file.write(data)

        for index, path, plain, mirrored in task.images:
            stored = stored_grey(path)
            grey = for_orb(stored)
            small = upscaled(stored)
            if plain:
                found, sparse = features(grey, None, small)
                put(
                    (index, False),
                    Described(plain=found, sparse=sparse),
                )
            else:  # described in an earlier round of this run
                sparse = read_entry(task.known[index]).sparse
            if mirrored:
                put((index, True), features(mirror(grey), sparse, small)[0])
    return located


def dense_suitable(grey: np.ndarray) -> bool:
    """Whether the dense fallback may judge this stored image: at least DENSE_SIDE
    pixels on its long side, and a picture (not a flat background) on at least
    DENSE_MIN_PICTURE of it. An upscaled thumbnail or an object on a plain background has no
    fine detail of its own, only its outline: the dense check merged 45 different plain
    Fashion-MNIST shirts of the demo (28 px) at correlations of 0.90-0.95."""
    return not upscaled(grey) and float(picture_mask(grey).mean()) >= DENSE_MIN_PICTURE


def upscaled(grey: np.ndarray) -> bool:
    """Whether this stored image is under DENSE_SIDE on its long side: upscaled, it has no
    fine detail of its own (neither the dense fallback nor the sparse threshold uses it)."""
    return max(grey.shape) < DENSE_SIDE
