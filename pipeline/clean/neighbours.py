"""Pass 2's candidate proposal: each image's nearest neighbours, view by view, in a faiss index.

Consumes every image's view embeddings and its mirror's (``embed.py``: (n, views, dims)
unit vectors). Produces candidate pairs (i < j): for each view, each image's (and its mirror's)
``k`` nearest neighbours by cosine similarity, unioned over the views. Nothing here decides
that two images are the same picture; verify.py does.

The index is exact (``IndexFlatIP``, blocked BLAS) up to ``EXACT_UP_TO`` images and a
single-threaded HNSW graph above (approximate, but the same answer on every run: a
multi-threaded build is not deterministic).
"""

from __future__ import annotations

import faiss
import numpy as np

EXACT_UP_TO = 20_000
HNSW_LINKS = 32
HNSW_SEARCH_DEPTH = 96
# A flipped copy's thumbnails are its original's nearest mirrored neighbour: on
# bench/clean_recall.py 404 of the 408 pairs pass 2 confirmed mirrored were an image and the
# first neighbour of the other's mirror, 405 within the first two. rounds.py compares a pair
# mirrored first only when it is this near (what costs is describing mirrors and comparing
# twice: on the throughput bench's photos 12,843 pairs were compared mirrored first, 771
# mirrors described, and none confirmed mirrored).
MIRROR_NEIGHBOURS = 1
SIMILARITY_BLOCK = 2048  # pairs whose similarities are computed at once


def _index(vectors: np.ndarray) -> faiss.Index:
    dims = vectors.shape[1]
    if len(vectors) <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(dims)
    else:
        index = faiss.IndexHNSWFlat(dims, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_SEARCH_DEPTH
    index.add(vectors)
    return index


def view_neighbours(
    views: np.ndarray, mirror_views: np.ndarray, k: int, min_similarity: float
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i < j), sorted and unique, as an (m, 2) int64 array; and for each,
    whether one image's mirror found the other among its ``MIRROR_NEIGHBOURS`` nearest in
    some view (bool, m)."""
    n = len(views)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    k = min(k, n - 1)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # determinism (HNSW) and clean.workers owns the cores
    try:
        found, near = [], []
        for view in range(views.shape[1]):
            index = _index(np.ascontiguousarray(views[:, view], dtype=np.float32))
            for mirrored, queries in ((False, views[:, view]), (True, mirror_views[:, view])):
                similarity, ids = index.search(np.ascontiguousarray(queries, np.float32), k + 1)
                rows = np.repeat(np.arange(n), k + 1).reshape(n, k + 1)
                chosen = (ids >= 0) & (ids != rows) & (similarity >= min_similarity)
                found.append(np.stack([rows[chosen], ids[chosen]], axis=1))
                # Rank among this query's neighbours (itself left out), 1 = nearest.
                rank = np.cumsum(chosen, axis=1)[chosen]
                near.append(rank <= MIRROR_NEIGHBOURS if mirrored else np.zeros(len(rank), bool))
    finally:
        faiss.omp_set_num_threads(threads)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    unique, which = np.unique(pairs, axis=0, return_inverse=True)
    mirror_near = np.zeros(len(unique), dtype=bool)
    np.logical_or.at(mirror_near, which.ravel(), np.concatenate(near))
    return unique, mirror_near


def pair_similarities(
    views: np.ndarray, mirror_views: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each pair (i, j): the best cosine similarity over the views of i and j as they are,
    and of i and j's mirror. Two float32 arrays of len(pairs).

    In blocks of ``SIMILARITY_BLOCK`` pairs: gathering every pair's views at once (38k pairs,
    2 views of 256 floats: 78 MB a copy) took 12x as long on the throughput bench's photos."""
    plain = np.zeros(len(pairs), np.float32)
    mirrored = np.zeros(len(pairs), np.float32)
    for start in range(0, len(pairs), SIMILARITY_BLOCK):
        block = slice(start, start + SIMILARITY_BLOCK)
        first, second = pairs[block, 0], pairs[block, 1]
        views_first = views[first]
        plain[block] = np.einsum("nvd,nvd->nv", views_first, views[second]).max(axis=1)
        mirrored[block] = np.einsum("nvd,nvd->nv", views_first, mirror_views[second]).max(axis=1)
    return plain, mirrored
