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
) -> np.ndarray:
    """Candidate pairs (i < j), sorted and unique, as an (m, 2) int64 array."""
    n = len(views)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    k = min(k, n - 1)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # determinism (HNSW) and clean.workers owns the cores
    try:
        found = []
        for view in range(views.shape[1]):
            index = _index(np.ascontiguousarray(views[:, view], dtype=np.float32))
            for queries in (views[:, view], mirror_views[:, view]):
                similarity, ids = index.search(np.ascontiguousarray(queries, np.float32), k + 1)
                rows = np.repeat(np.arange(n), k + 1).reshape(n, k + 1)
                chosen = (ids >= 0) & (ids != rows) & (similarity >= min_similarity)
                found.append(np.stack([rows[chosen], ids[chosen]], axis=1))
    finally:
        faiss.omp_set_num_threads(threads)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    return np.unique(pairs, axis=0)


def pair_similarities(
    views: np.ndarray, mirror_views: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each pair (i, j): the best cosine similarity over the views of i and j as they are,
    and of i and j's mirror. Two float32 arrays of len(pairs)."""
    if not len(pairs):
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    first, second = pairs[:, 0], pairs[:, 1]
    plain = np.einsum("nvd,nvd->nv", views[first], views[second]).max(axis=1)
    mirrored = np.einsum("nvd,nvd->nv", views[first], mirror_views[second]).max(axis=1)
    return plain.astype(np.float32), mirrored.astype(np.float32)
