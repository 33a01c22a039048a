"""Clean stage: turn a raw crawl into images a user can trust, with nothing silently lost.

Consumes ``data/raw/manifest.jsonl`` (one row per crawled file: class, path relative to
data/raw, url, page_url, source, license, attribution, fetched_at, ...) and the files it names.

Produces, under ``data/clean/``:

- ``<class>/<sha256>.png`` — every kept image fully decoded, EXIF-rotated, first frame only,
  converted to RGB (transparency onto white, 16-bit scaled down) and shrunk to ``max_side``;
  ``sha256`` is the hash of the decoded pixels, so re-encoded copies share a name.
- ``manifest.jsonl`` — one row per kept image: path (relative to data/clean), class, sha256,
  phash, width, height, group, quality flags and the raw row's provenance.
- ``removed.jsonl`` — one row per dropped raw file with its ``reason`` (missing, corrupt,
  not_an_image, decompression_bomb, too_small, bad_aspect_ratio, quality, exact_duplicate,
  near_duplicate, label_conflict) and the evidence (dup_of, distance, method, inliers...).
- ``groups.jsonl`` — every group of two or more raw files found to be the same picture
  (exact pixels, pHash within ``near_dup_max_distance``, the mirrored image's pHash, or
  ORB + RANSAC geometric verification of embedding neighbours), so split keeps each group on
  one side.
- ``issues.csv`` — the per-image quality table (brightness, entropy, sharpness, flags).
- ``.analysis.jsonl`` — per-image results keyed by file and params, so a killed or re-tuned
  run reuses decoding and hashing instead of redoing it.

and ``reports/clean_report.json`` (a DVC metric): counts per class and reason.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import imagehash
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components
from tqdm import tqdm

from pipeline.config import CleanConfig, StageError
from pipeline.files import (
    append_jsonl,
    atomic_path,
    atomic_write_json,
    read_jsonl,
    write_csv,
    write_jsonl,
)

MANIFEST = "manifest.jsonl"
REMOVED = "removed.jsonl"
GROUPS = "groups.jsonl"
ISSUES = "issues.csv"
ANALYSIS = ".analysis.jsonl"
DUPLICATE_SHEET = "clean_duplicates.png"  # beside the report: a DVC plot

PROVENANCE = ("url", "page_url", "source", "license", "attribution", "fetched_at")
QUALITY_FLAGS = ("blurry", "dark", "bright", "low_information", "odd_aspect_ratio", "odd_size")
ISSUE_COLUMNS = [
    "raw_path",
    "class",
    "sha256",
    "width",
    "height",
    "brightness_p99",
    "brightness_p05",
    "entropy",
    "sharpness",
    "aspect_ratio",
    "flags",
    "kept",
]
# Side of the grey thumbnail used as the cheap embedding for the second pass: small enough
# that a 10% crop or a 10° rotation barely moves it, large enough to tell objects apart.
EMBEDDING_SIDE = 16
# ORB needs ~31 px patches around each keypoint; tiny images are upscaled to this side first.
ORB_SIDE = 256


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class CleanSummary:
    """What the clean stage did; ``str()`` is the one-line summary the CLI prints."""

    raw: int = 0
    kept: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    groups: int = 0
    classes: int = 0
    reused: int = 0
    flagged: int = 0

    def __str__(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.removed.most_common())
        return (
            f"kept {self.kept} of {self.raw} images in {self.classes} classes; "
            f"removed {sum(self.removed.values())}"
            + (f" ({reasons})" if reasons else "")
            + f"; {self.groups} duplicate groups; {self.flagged} flagged in issues.csv"
            + (f"; reused {self.reused} analyses from a previous run" if self.reused else "")
        )


# --------------------------------------------------------------------------------------------
# Per-image analysis (runs in worker processes)


def _analysis_fingerprint(cfg: CleanConfig) -> str:
    """Params that change a per-image result; a cached result with another value is stale."""
    keys = (
        "min_width",
        "min_height",
        "max_aspect_ratio",
        "max_image_pixels",
        "max_side",
        "output_format",
        "jpeg_quality",
        "near_dup_hash_size",
    )
    blob = json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True) + f"|{EMBEDDING_SIDE}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # Pillow's own I→L conversion clips at 255, turning a 16-bit photo white; scale instead.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    if image.mode != "RGB":
        # CMYK, YCbCr, LAB, L, 1: Pillow's converters are right for these.
        image = image.convert("RGB")
    return image


def _embedding(grey: np.ndarray) -> np.ndarray:
    thumb = cv2.resize(grey, (EMBEDDING_SIDE, EMBEDDING_SIDE), interpolation=cv2.INTER_AREA)
    vector = thumb.astype(np.float32).ravel()
    vector -= vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype(np.float16).tobytes()).decode("ascii")


def _decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float16).astype(np.float32)


def _quality(grey: np.ndarray) -> dict[str, float]:
    """Scores behind the quality flags, computed on the normalised output image."""
    histogram = np.bincount(grey.ravel(), minlength=256).astype(np.float64)
    probabilities = histogram[histogram > 0] / grey.size
    return {
        # Percentiles, as cleanvision does: an image is dark when even its bright pixels are.
        "brightness_p99": round(float(np.percentile(grey, 99)) / 255.0, 4),
        "brightness_p05": round(float(np.percentile(grey, 5)) / 255.0, 4),
        "entropy": round(float(-(probabilities * np.log2(probabilities)).sum()), 4),
        "sharpness": round(float(cv2.Laplacian(grey, cv2.CV_64F).var()), 2),
    }


def analyse_image(task: dict[str, Any]) -> dict[str, Any]:
    """Validate, normalise and describe one raw image; write its normalised copy.

    Returns a result dict: ``status`` is "ok" or a removal reason with ``detail``. Never
    raises for a bad image: bad input is a result, not an error.
    """
    raw_file = Path(task["raw_file"])
    result: dict[str, Any] = {"key": task["key"]}
    if not raw_file.is_file():
        return {**result, "status": "missing", "detail": f"{raw_file} does not exist"}
    if raw_file.stat().st_size == 0:
        return {**result, "status": "corrupt", "detail": "empty file (0 bytes)"}
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = task["max_image_pixels"]
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; past our limit is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(raw_file) as opened:
                frames = getattr(opened, "n_frames", 1)
                opened.seek(0)
                opened.load()  # full decode: truncated data raises here, not at open()
                image = ImageOps.exif_transpose(opened)
                original_size = image.size
                image = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return {**result, "status": "decompression_bomb", "detail": str(exc)}
    except UnidentifiedImageError:
        return {**result, "status": "not_an_image", "detail": "Pillow cannot identify the file"}
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return {**result, "status": "corrupt", "detail": f"{type(exc).__name__}: {exc}"}

    width, height = original_size
    if width < task["min_width"] or height < task["min_height"]:
        return {
            **result,
            "status": "too_small",
            "detail": f"{width}x{height} is under {task['min_width']}x{task['min_height']}",
            "width": width,
            "height": height,
        }
    aspect = max(width, height) / min(width, height)
    if aspect > task["max_aspect_ratio"]:
        return {
            **result,
            "status": "bad_aspect_ratio",
            "detail": f"{width}x{height}: aspect ratio {aspect:.1f} > {task['max_aspect_ratio']}",
            "width": width,
            "height": height,
        }

    pixels = np.asarray(image)
    sha256 = hashlib.sha256(f"{width}x{height}:".encode() + pixels.tobytes()).hexdigest()
    hash_size = task["hash_size"]
    phash = imagehash.phash(image, hash_size=hash_size)
    phash_mirror = imagehash.phash(ImageOps.mirror(image), hash_size=hash_size)
    grey_full = np.asarray(image.convert("L"))
    embedding = _embedding(grey_full)
    mirror_embedding = _embedding(np.ascontiguousarray(grey_full[:, ::-1]))

    output = image.copy()
    output.thumbnail((task["max_side"], task["max_side"]), Image.Resampling.LANCZOS)
    suffix = ".png" if task["output_format"] == "png" else ".jpg"
    clean_rel = f"{task['class']}/{sha256}{suffix}"
    target = Path(task["out"]) / clean_rel
    if not target.exists():
        with atomic_path(target) as tmp:
            if task["output_format"] == "png":
                output.save(tmp, format="PNG")
            else:
                output.save(tmp, format="JPEG", quality=task["jpeg_quality"])
    return {
        **result,
        "status": "ok",
        "sha256": sha256,
        "phash": str(phash),
        "phash_mirror": str(phash_mirror),
        "original_width": width,
        "original_height": height,
        "width": output.width,
        "height": output.height,
        "frames": frames,
        "clean_path": clean_rel,
        "embedding": _encode_vector(embedding),
        "mirror_embedding": _encode_vector(mirror_embedding),
        **_quality(np.asarray(output.convert("L"))),
    }


def _worker_init() -> None:
    # One thread per process: the pool already uses every core, and OpenCV's and BLAS's own
    # thread pools on top of it made ORB matching 3x slower when measured on 2 cores.
    cv2.setNumThreads(1)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _orb_grey(path: Path, mirrored: bool = False) -> np.ndarray:
    """The normalised image in grey as ORB sees it: tiny images upscaled to ORB_SIDE."""
    grey = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        return np.zeros((1, 1), np.uint8)
    scale = ORB_SIDE / max(grey.shape)
    if scale > 1:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey


Features = tuple[np.ndarray, np.ndarray | None]  # keypoint coordinates (n, 2), descriptors


def describe_images(task: dict[str, Any]) -> list[tuple[int, Features, Features]]:
    """ORB keypoints of each image and of its mirror: [(index, plain, mirrored)].

    Computed once per image and shipped to the matching workers as arrays, because pairs from
    nearest neighbours scatter over all images and per-batch recomputation cost 16x more.
    """
    orb = cv2.ORB_create(nfeatures=task["orb_features"])
    described = []
    for index, path in task["images"]:
        views = []
        for mirrored in (False, True):
            keypoints, descriptors = orb.detectAndCompute(_orb_grey(Path(path), mirrored), None)
            points = np.float32([k.pt for k in keypoints]).reshape(-1, 2)
            views.append((points, descriptors))
        described.append((index, views[0], views[1]))
    return described


def _ransac(a: Features, b: Features, task: dict[str, Any]) -> tuple[int, np.ndarray | None]:
    """(inliers, transform) of a similarity transform a→b fitted to ratio-test ORB matches."""
    (points_a, descriptors_a), (points_b, descriptors_b) = a, b
    if descriptors_a is None or descriptors_b is None or len(points_a) < 2 or len(points_b) < 2:
        return 0, None
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors_a, descriptors_b, k=2)
    good = [
        pair[0]
        for pair in pairs
        if len(pair) == 2 and pair[0].distance < task["orb_ratio"] * pair[1].distance
    ]
    if len(good) < task["min_inliers"]:
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


def verify_pairs(task: dict[str, Any]) -> list[tuple[int, int, int, float, bool]]:
    """Geometric, then photometric, verification of candidate pairs (second image also mirrored).

    Returns (i, j, inliers, correlation, mirrored) for every confirmed pair: at least
    ``min_inliers`` RANSAC inliers, and at least ``min_correlation`` once aligned.
    """
    features: dict[int, tuple[Features, Features]] = task["features"]
    greys: dict[tuple[int, bool], np.ndarray] = {}

    def grey(index: int, mirrored: bool) -> np.ndarray:
        if (index, mirrored) not in greys:
            greys[(index, mirrored)] = _orb_grey(Path(task["files"][index]), mirrored)
        return greys[(index, mirrored)]

    confirmed = []
    for i, j in task["pairs"]:
        for mirrored in (False, True):
            inliers, transform = _ransac(features[i][0], features[j][int(mirrored)], task)
            if inliers < task["min_inliers"] or transform is None:
                continue
            correlation = _aligned_correlation(grey(i, False), grey(j, mirrored), transform)
            if correlation >= task["min_correlation"]:
                confirmed.append((int(i), int(j), inliers, round(correlation, 4), mirrored))
                break
    return confirmed


# --------------------------------------------------------------------------------------------
# Near-duplicate search over hashes


def hashes_to_bits(hex_hashes: Sequence[str]) -> np.ndarray:
    """Hex pHash strings → packed uint8 array, one row per hash."""
    if not hex_hashes:
        return np.zeros((0, 1), dtype=np.uint8)
    return np.frombuffer(bytes.fromhex("".join(hex_hashes)), dtype=np.uint8).reshape(
        len(hex_hashes), -1
    )


def _chunk_keys(bits: np.ndarray, n_chunks: int) -> list[np.ndarray]:
    """Split every hash into ``n_chunks`` contiguous bit ranges; each range as an int key."""
    unpacked = np.unpackbits(bits, axis=1)
    bounds = np.linspace(0, unpacked.shape[1], n_chunks + 1).astype(int)
    keys = []
    for start, stop in itertools.pairwise(bounds):
        packed = np.packbits(unpacked[:, start:stop], axis=1)
        rows = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
        keys.append(np.unique(rows, return_inverse=True)[1].ravel())
    return keys


def hamming_pairs(
    index: np.ndarray, max_distance: int, queries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (query, index) pairs within ``max_distance`` bits, by multi-index hashing.

    Each hash is cut into ``max_distance + 1`` chunks: two hashes within ``max_distance`` bits
    agree exactly on at least one chunk (pigeonhole), so candidates come from exact chunk
    matches found by sorting, and only those are compared bit by bit. Cost grows with n plus
    the number of candidates, not n². With ``queries=None`` the index is searched against
    itself and each unordered pair is returned once (i < j).

    Returns arrays (i, j, distance), i indexing the queries (or index), j the index.
    """
    self_search = queries is None
    queries = index if queries is None else queries
    empty = np.zeros(0, dtype=np.int64)
    if len(index) == 0 or len(queries) == 0:
        return empty, empty, empty
    n_bits = index.shape[1] * 8
    n_chunks = max_distance + 1
    if n_bits // n_chunks < 4:
        # Chunks of a few bits match almost everything; a blocked full comparison is cheaper.
        return _blocked_pairs(index, max_distance, queries, self_search)
    keys = _chunk_keys(np.concatenate([queries, index]), n_chunks)
    found_i, found_j = [], []
    for key in keys:
        query_keys, index_keys = key[: len(queries)], key[len(queries) :]
        order = np.argsort(index_keys, kind="stable")
        sorted_keys = index_keys[order]
        lo = np.searchsorted(sorted_keys, query_keys, side="left")
        hi = np.searchsorted(sorted_keys, query_keys, side="right")
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            continue
        query_rep = np.repeat(np.arange(len(queries)), counts)
        starts = np.repeat(lo - (np.cumsum(counts) - counts), counts)
        index_rep = order[np.arange(total) + starts]
        keep = query_rep < index_rep if self_search else np.ones(total, dtype=bool)
        found_i.append(query_rep[keep])
        found_j.append(index_rep[keep])
    if not found_i:
        return empty, empty, empty
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    # Compare first, dedupe after: a pair sharing several chunks is found several times, but
    # most candidates fail the comparison, and sorting the survivors is far cheaper.
    close = np.bitwise_count(queries[i] ^ index[j]).sum(axis=1, dtype=np.int64) <= max_distance
    pair_codes = np.unique(i[close].astype(np.int64) * len(index) + j[close])
    i, j = np.divmod(pair_codes, len(index))
    distance = np.bitwise_count(queries[i] ^ index[j]).sum(axis=1, dtype=np.int64)
    return i, j, distance


def _blocked_pairs(
    index: np.ndarray, max_distance: int, queries: np.ndarray, self_search: bool, block: int = 512
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    found_i, found_j, found_d = [], [], []
    for start in range(0, len(queries), block):
        chunk = queries[start : start + block]
        distance = np.bitwise_count(chunk[:, None, :] ^ index[None, :, :]).sum(
            axis=2, dtype=np.int64
        )
        rows, cols = np.nonzero(distance <= max_distance)
        rows = rows + start
        keep = rows < cols if self_search else np.ones(len(rows), dtype=bool)
        found_i.append(rows[keep])
        found_j.append(cols[keep])
        found_d.append(distance[rows[keep] - start, cols[keep]])
    return np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_d)


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


# --------------------------------------------------------------------------------------------
# The stage


def _read_raw_manifest(raw: Path) -> list[dict[str, Any]]:
    manifest = raw / MANIFEST
    if not manifest.is_file():
        raise StageError(
            f"{manifest}: raw manifest not found; run `python -m pipeline crawl` first"
        )
    try:
        rows = read_jsonl(manifest)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    for number, row in enumerate(rows, start=1):
        for key in ("class", "path"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise StageError(f"{manifest}: row {number} has no {key!r}")
        path = Path(row["path"])
        if path.is_absolute() or ".." in path.parts:
            raise StageError(f"{manifest}: row {number} path {row['path']!r} leaves {raw}")
    return rows


class _Runner:
    """Runs a phase's tasks inline or on one process pool shared by every phase of a run."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def map(
        self, function: Callable[[dict[str, Any]], Any], tasks: list[dict[str, Any]], desc: str
    ) -> Iterator[Any]:
        """Results of ``function`` over ``tasks`` in completion order, with a tqdm bar."""
        unit = "img" if "decode" in desc else "batch"
        with tqdm(total=len(tasks), desc=desc, unit=unit) as bar:
            if self.workers <= 1 or len(tasks) < 2:
                for task in tasks:
                    yield function(task)
                    bar.update()
                return
            if self._pool is None:
                # spawn, not fork: a child forked while the parent's OpenCV threads run hangs
                # (seen in this test suite). Like any multiprocessing code, a calling script
                # needs an `if __name__ == "__main__":` guard.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_init,
                )
            futures = [self._pool.submit(function, task) for task in tasks]
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
                bar.update()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None


def _workers(cfg: CleanConfig) -> int:
    return cfg.workers or (os.cpu_count() or 1)


def _analyse_all(
    cfg: CleanConfig, raw: Path, out: Path, rows: list[dict[str, Any]], runner: _Runner
) -> tuple[dict[str, dict[str, Any]], int]:
    """Analyse every raw row, reusing results of a previous (possibly killed) run.

    Returns ({row key: result}, number reused).
    """
    fingerprint = _analysis_fingerprint(cfg)
    log = out / ANALYSIS
    cached: dict[str, dict[str, Any]] = {}
    if log.is_file():
        for entry in read_jsonl(log):
            if entry.get("fingerprint") == fingerprint:
                cached[entry["key"]] = entry
    results: dict[str, dict[str, Any]] = {}
    tasks = []
    for row in rows:
        raw_file = raw / row["path"]
        try:
            stat = raw_file.stat()
            key = f"{row['class']}|{row['path']}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            key = f"{row['class']}|{row['path']}|missing"
        row["_key"] = key
        previous = cached.get(key)
        if previous is not None and (
            previous["status"] != "ok" or (out / previous["clean_path"]).is_file()
        ):
            results[key] = previous
            continue
        tasks.append(
            {
                "key": key,
                "raw_file": str(raw_file),
                "class": row["class"],
                "out": str(out),
                "min_width": cfg.min_width,
                "min_height": cfg.min_height,
                "max_aspect_ratio": cfg.max_aspect_ratio,
                "max_image_pixels": cfg.max_image_pixels,
                "max_side": cfg.max_side,
                "output_format": cfg.output_format,
                "jpeg_quality": cfg.jpeg_quality,
                "hash_size": cfg.near_dup_hash_size,
            }
        )
    reused = len(results)
    # Two rows can name the same file (a crawl listing it twice); analyse it once.
    unique_tasks = list({task["key"]: task for task in tasks}.values())
    out.mkdir(parents=True, exist_ok=True)
    for result in runner.map(analyse_image, unique_tasks, "clean: decode"):
        result["fingerprint"] = fingerprint
        # Appended as each image finishes so a killed run resumes from here.
        append_jsonl(log, result)
        results[result["key"]] = result
    return results, reused


def _graph_groups(n: int, edges: list[tuple[int, int]]) -> np.ndarray:
    if not edges:
        return np.arange(n)
    i, j = np.array(edges).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def clean(cfg: CleanConfig, raw: Path, out: Path, report: Path) -> CleanSummary:
    """Validate, normalise, flag and dedupe ``raw`` into ``out``; write the report.

    Returns a CleanSummary. Raises StageError when the raw manifest is missing or malformed,
    or when no image survives (after writing removed.jsonl, which says why).
    Safe to kill: every file is written atomically and per-image results are logged as they
    finish, so a rerun only analyses what is new.
    """
    raw, out, report = Path(raw), Path(out), Path(report)
    rows = _read_raw_manifest(raw)
    runner = _Runner(_workers(cfg))
    try:
        results, reused = _analyse_all(cfg, raw, out, rows, runner)
        summary, group_rows = _finish(cfg, rows, results, reused, out, report, runner)
    finally:
        runner.close()
    write_duplicate_sheet(report.parent / DUPLICATE_SHEET, raw, group_rows)
    if summary.kept == 0:
        # Everything is written first, so removed.jsonl explains why; the next stage would
        # only fail less clearly.
        raise StageError(
            f"{raw / MANIFEST}: no image survived cleaning ({summary}); "
            f"see {out / REMOVED} for each file's reason"
        )
    return summary


def _finish(
    cfg: CleanConfig,
    rows: list[dict[str, Any]],
    results: dict[str, dict[str, Any]],
    reused: int,
    out: Path,
    report: Path,
    runner: _Runner,
) -> tuple[CleanSummary, list[dict[str, Any]]]:
    """Verdicts, duplicate groups and every output file, from the per-image results."""
    removed: list[dict[str, Any]] = []
    issues: list[dict[str, Any]] = []

    def remove(row: dict[str, Any], reason: str, **evidence: Any) -> None:
        removed.append({"path": row["path"], "class": row["class"], "reason": reason, **evidence})

    # 1. Per-image verdicts; the same raw file listed twice is analysed once, kept once.
    valid: list[dict[str, Any]] = []
    seen_keys: set[str] = set()
    for row in rows:
        result = results[row["_key"]]
        if row["_key"] in seen_keys:
            remove(row, "exact_duplicate", detail="the raw manifest lists this file twice")
            continue
        seen_keys.add(row["_key"])
        if result["status"] != "ok":
            remove(row, result["status"], detail=result.get("detail", ""))
            continue
        valid.append({**row, **{k: v for k, v in result.items() if k != "key"}})

    # 2. Quality flags; odd_size is relative to this data set's median area, like cleanvision.
    areas = [r["original_width"] * r["original_height"] for r in valid]
    median_area = float(np.median(areas)) if areas else 0.0
    candidates: list[dict[str, Any]] = []
    for item in valid:
        flags = _flags(cfg, item, median_area)
        item["flags"] = flags
        issues.append(item)
        dropping = sorted(set(flags) & set(cfg.drop_flags))
        if dropping:
            remove(item, "quality", flags=dropping, detail=f"flagged {', '.join(dropping)}")
            item["kept"] = False
        else:
            candidates.append(item)

    # 3. Duplicate graph over every remaining image of every class.
    edges, evidence, pass_counts = _duplicate_edges(cfg, candidates, out, runner)
    labels = _graph_groups(len(candidates), edges)
    members: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        members[int(label)].append(index)
    edges_by_group: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for a, b in edges:
        edges_by_group[int(labels[a])].append((a, b))

    kept_rows: list[dict[str, Any]] = []
    group_rows: list[dict[str, Any]] = []
    for label, indices in members.items():
        kept_rows.extend(
            _resolve_group(
                cfg, candidates, indices, edges_by_group[label], evidence, remove, group_rows
            )
        )

    # 4. Files: the lists first, then delete what they do not name (a kill in between leaves
    # only extra files, which the rerun deletes).
    for item in valid:
        item.setdefault("kept", False)
    for item in kept_rows:
        item["kept"] = True

    class_order = {name: n for n, name in enumerate(dict.fromkeys(r["class"] for r in rows))}
    kept_rows.sort(key=lambda r: (class_order[r["class"]], r["clean_path"]))
    manifest_rows = [_manifest_row(r) for r in kept_rows]
    removed.sort(key=lambda r: (class_order[r["class"]], r["path"]))
    write_jsonl(out / MANIFEST, manifest_rows)
    write_jsonl(out / REMOVED, removed)
    write_jsonl(out / GROUPS, sorted(group_rows, key=lambda g: g["group"]))
    write_csv(out / ISSUES, [_issue_row(r) for r in issues], ISSUE_COLUMNS)
    # Compact the resume log to this run's entries (drops results for files no longer crawled).
    write_jsonl(out / ANALYSIS, (results[k] for k in dict.fromkeys(r["_key"] for r in rows)))
    _prune(out, {r["clean_path"] for r in kept_rows})

    summary = CleanSummary(
        raw=len(rows),
        kept=len(manifest_rows),
        removed=Counter(r["reason"] for r in removed),
        groups=len(group_rows),
        classes=len({r["class"] for r in manifest_rows}),
        reused=reused,
        flagged=sum(1 for r in issues if r["flags"]),
    )
    atomic_write_json(
        report, _report(rows, manifest_rows, removed, issues, group_rows, pass_counts)
    )
    return summary, group_rows


def _flags(cfg: CleanConfig, item: dict[str, Any], median_area: float) -> list[str]:
    width, height = item["original_width"], item["original_height"]
    area = width * height
    checks = {
        "blurry": item["sharpness"] < cfg.blurry_below,
        "dark": item["brightness_p99"] < cfg.dark_below,
        "bright": item["brightness_p05"] > cfg.bright_above,
        "low_information": item["entropy"] < cfg.low_information_below,
        "odd_aspect_ratio": max(width, height) / min(width, height) > cfg.odd_aspect_ratio_above,
        "odd_size": median_area > 0
        and not 1 / cfg.odd_size_factor <= area / median_area <= cfg.odd_size_factor,
    }
    return [flag for flag in QUALITY_FLAGS if checks[flag]]


def _duplicate_edges(
    cfg: CleanConfig, items: list[dict[str, Any]], out: Path, runner: _Runner
) -> tuple[list[tuple[int, int]], dict[tuple[int, int], dict[str, Any]], dict[str, int]]:
    """Edges (i < j) between images that show the same picture, with the evidence for each."""
    evidence: dict[tuple[int, int], dict[str, Any]] = {}

    def add(i: int, j: int, info: dict[str, Any]) -> None:
        key = (min(i, j), max(i, j))
        if key not in evidence:
            evidence[key] = info

    by_sha: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        by_sha[item["sha256"]].append(index)
    for indices in by_sha.values():
        for a, b in itertools.pairwise(indices):
            add(a, b, {"method": "exact", "distance": 0})
    counts = {"exact_pairs": len(evidence)}

    bits = hashes_to_bits([item["phash"] for item in items])
    i, j, distance = hamming_pairs(bits, cfg.near_dup_max_distance)
    for a, b, d in zip(i.tolist(), j.tolist(), distance.tolist(), strict=True):
        add(a, b, {"method": "phash", "distance": d})
    counts["phash_pairs"] = len(i)
    if cfg.near_dup_mirrored:
        mirrored = hashes_to_bits([item["phash_mirror"] for item in items])
        i, j, distance = hamming_pairs(bits, cfg.near_dup_max_distance, queries=mirrored)
        keep = i != j
        for a, b, d in zip(
            i[keep].tolist(), j[keep].tolist(), distance[keep].tolist(), strict=True
        ):
            add(a, b, {"method": "phash_mirror", "distance": d})
        counts["phash_mirror_pairs"] = int(keep.sum())

    if cfg.second_pass and len(items) > 1:
        first_pass = _graph_groups(len(items), list(evidence))
        embeddings = np.stack([_decode_vector(item["embedding"]) for item in items])
        mirrors = np.stack([_decode_vector(item["mirror_embedding"]) for item in items])
        pairs = embedding_neighbours(
            embeddings, mirrors, cfg.second_pass_neighbours, cfg.second_pass_min_similarity
        )
        # Pairs already joined by the cheap pass need no geometric proof.
        pairs = pairs[first_pass[pairs[:, 0]] != first_pass[pairs[:, 1]]]
        counts["orb_candidates"] = len(pairs)
        confirmed = 0
        tasks = _pair_tasks(cfg, items, pairs, out, runner)
        for found in runner.map(verify_pairs, tasks, "clean: verify"):
            for a, b, inliers, correlation, flipped in found:
                add(
                    a,
                    b,
                    {
                        "method": "orb",
                        "inliers": inliers,
                        "correlation": correlation,
                        "mirrored": flipped,
                    },
                )
                confirmed += 1
        counts["orb_confirmed"] = confirmed
    return list(evidence), evidence, counts


def _pair_tasks(
    cfg: CleanConfig, items: list[dict[str, Any]], pairs: np.ndarray, out: Path, runner: _Runner
) -> list[dict[str, Any]]:
    """Batches of candidate pairs, each with the ORB features of the images it needs."""
    needed = sorted({int(i) for i in pairs.ravel()})
    files = {i: str(out / items[i]["clean_path"]) for i in needed}
    describe = [
        {
            "images": [(i, files[i]) for i in needed[start : start + 32]],
            "orb_features": cfg.orb_features,
        }
        for start in range(0, len(needed), 32)
    ]
    features: dict[int, tuple[Features, Features]] = {}
    for described in runner.map(describe_images, describe, "clean: describe"):
        for index, plain, mirrored in described:
            features[index] = (plain, mirrored)
    tasks = []
    for start in range(0, len(pairs), 256):
        chunk = pairs[start : start + 256].tolist()
        indices = {i for pair in chunk for i in pair}
        tasks.append(
            {
                "pairs": chunk,
                "features": {i: features[i] for i in indices},
                "files": {i: files[i] for i in indices},
                "orb_ratio": cfg.orb_ratio,
                "min_inliers": cfg.orb_min_inliers,
                "min_correlation": cfg.orb_min_correlation,
            }
        )
    return tasks


def _resolve_group(
    cfg: CleanConfig,
    items: list[dict[str, Any]],
    indices: list[int],
    group_edges: list[tuple[int, int]],
    evidence: dict[tuple[int, int], dict[str, Any]],
    remove: Callable[..., None],
    group_rows: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """Decide which members of one duplicate group stay; return the kept items."""
    if len(indices) == 1:
        item = items[indices[0]]
        item["group"] = item["sha256"][:16]
        return [item]
    indices = sorted(indices)
    # Manifest order decides "first"; within a class the largest original is the one kept.
    classes = list(dict.fromkeys(items[i]["class"] for i in indices))
    kept_class = classes[0]
    conflict = len(classes) > 1
    representative = max(
        (i for i in indices if items[i]["class"] == kept_class),
        key=lambda i: (items[i]["original_width"] * items[i]["original_height"], -i),
    )
    group_id = items[representative]["sha256"][:16]
    parents = _spanning_parents(representative, indices, group_edges)

    kept: dict[str, int] = {items[representative]["sha256"]: representative}
    for index in indices:
        item = items[index]
        item["group"] = group_id
        if conflict and (cfg.label_conflicts == "drop" or item["class"] != kept_class):
            remove(
                item,
                "label_conflict",
                classes=classes,
                group=group_id,
                detail=f"the same picture was crawled for {', '.join(classes)}",
            )
            continue
        if index == representative:
            continue
        twin = kept.get(item["sha256"])
        if twin is not None:
            remove(
                item,
                "exact_duplicate",
                dup_of=items[twin]["path"],
                kept=items[twin]["clean_path"],
                group=group_id,
                method="exact",
                distance=0,
            )
            continue
        if cfg.near_duplicates == "group":
            kept[item["sha256"]] = index
            continue
        parent = parents[index]
        remove(
            item,
            "near_duplicate",
            dup_of=items[parent]["path"],
            kept=items[representative]["clean_path"],
            group=group_id,
            **evidence[(min(index, parent), max(index, parent))],
        )
    kept_indices = set() if conflict and cfg.label_conflicts == "drop" else set(kept.values())
    group_rows.append(
        {
            "group": group_id,
            "classes": classes,
            "label_conflict": conflict,
            "kept": sorted(items[i]["clean_path"] for i in kept_indices),
            "members": [
                {
                    "path": items[i]["path"],
                    "class": items[i]["class"],
                    "sha256": items[i]["sha256"],
                    "phash": items[i]["phash"],
                    "kept": i in kept_indices,
                }
                for i in indices
            ],
            "edges": [
                {"a": items[a]["path"], "b": items[b]["path"], **evidence[(a, b)]}
                for a, b in sorted(group_edges)
            ],
        }
    )
    return [items[i] for i in sorted(kept_indices)]


def _spanning_parents(
    root: int, indices: list[int], edges: list[tuple[int, int]]
) -> dict[int, int]:
    """Each member's neighbour on the way to ``root``: the link that explains its removal."""
    position = {index: n for n, index in enumerate(indices)}
    rows = [position[a] for a, _ in edges] + [position[b] for _, b in edges]
    cols = [position[b] for _, b in edges] + [position[a] for a, _ in edges]
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(indices), len(indices)))
    _, predecessors = breadth_first_order(
        graph.tocsr(), position[root], directed=False, return_predecessors=True
    )
    return {
        index: indices[predecessors[position[index]]]
        for index in indices
        if index != root and predecessors[position[index]] >= 0
    }


def write_duplicate_sheet(
    path: Path, raw: Path, group_rows: list[dict[str, Any]], max_groups: int = 12
) -> None:
    """A PNG with one row per duplicate group (largest first): kept images framed green,
    dropped ones red, each captioned with how it was matched (a note when there are none:
    DVC expects every declared plot to exist).
    """
    from PIL import ImageDraw

    if not group_rows:
        sheet = Image.new("RGB", (320, 40), "white")
        ImageDraw.Draw(sheet).text((8, 14), "no duplicate groups found", fill=(0, 0, 0))
        with atomic_path(path) as tmp:
            sheet.save(tmp, format="PNG")
        return
    tile, columns = 96, 6
    groups = sorted(group_rows, key=lambda g: (-len(g["members"]), g["group"]))[:max_groups]
    sheet = Image.new("RGB", (columns * (tile + 8) + 8, len(groups) * (tile + 22) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for row, group in enumerate(groups):
        method = {}
        for edge in group["edges"]:
            method.setdefault(edge["b"], edge["method"])
            method.setdefault(edge["a"], edge["method"])
        for column, member in enumerate(group["members"][:columns]):
            x, y = 8 + column * (tile + 8), 8 + row * (tile + 22)
            try:
                with Image.open(raw / member["path"]) as image:
                    thumb = _to_rgb(ImageOps.exif_transpose(image))
            except (OSError, ValueError):
                continue
            thumb = ImageOps.contain(thumb, (tile, tile), Image.Resampling.NEAREST)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            colour = (0, 160, 0) if member["kept"] else (200, 0, 0)
            draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline=colour, width=2)
            caption = f"{member['class'][:9]}: {method.get(member['path'], '')}"
            draw.text((x, y + tile + 4), caption, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _prune(out: Path, kept_paths: set[str]) -> None:
    """Delete normalised images that are not in the manifest (dropped or from older runs)."""
    for class_dir in out.iterdir():
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        for path in class_dir.iterdir():
            if path.is_file() and f"{class_dir.name}/{path.name}" not in kept_paths:
                path.unlink()
        if not any(class_dir.iterdir()):
            class_dir.rmdir()


def _manifest_row(item: dict[str, Any]) -> dict[str, Any]:
    row = {
        "path": item["clean_path"],
        "class": item["class"],
        "sha256": item["sha256"],
        "phash": item["phash"],
        "width": item["width"],
        "height": item["height"],
        "group": item["group"],
        "raw_path": item["path"],
        "flags": item["flags"],
    }
    row.update({key: item.get(key) for key in PROVENANCE})
    return row


def _issue_row(item: dict[str, Any]) -> dict[str, Any]:
    width, height = item["original_width"], item["original_height"]
    return {
        "raw_path": item["path"],
        "class": item["class"],
        "sha256": item["sha256"],
        "width": width,
        "height": height,
        "brightness_p99": item["brightness_p99"],
        "brightness_p05": item["brightness_p05"],
        "entropy": item["entropy"],
        "sharpness": item["sharpness"],
        "aspect_ratio": round(max(width, height) / min(width, height), 3),
        "flags": ";".join(item["flags"]),
        "kept": item.get("kept", False),
    }


def _report(
    rows: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    removed: list[dict[str, Any]],
    issues: list[dict[str, Any]],
    groups: list[dict[str, Any]],
    pass_counts: dict[str, int],
) -> dict[str, Any]:
    per_class: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["class"] for r in rows):
        per_class[name] = {
            "raw": sum(1 for r in rows if r["class"] == name),
            "kept": sum(1 for r in kept if r["class"] == name),
            "removed": dict(Counter(r["reason"] for r in removed if r["class"] == name)),
            "flagged": dict(Counter(f for r in issues if r["class"] == name for f in r["flags"])),
        }
    return {
        "raw": len(rows),
        "kept": len(kept),
        "removed": len(removed),
        "removed_by_reason": dict(Counter(r["reason"] for r in removed)),
        "flagged": dict(Counter(f for r in issues for f in r["flags"])),
        "groups": len(groups),
        "label_conflict_groups": sum(1 for g in groups if g["label_conflict"]),
        "passes": pass_counts,
        "per_class": per_class,
    }
