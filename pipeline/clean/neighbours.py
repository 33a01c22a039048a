"""Pass 2's candidate proposal: each image's nearest neighbours, view by view, in a faiss index.

Consumes every image's view embeddings and its mirror's (``embed.py``: (n, views, dims)
unit vectors). Produces candidate pairs (i < j): for each view, each image's ``k`` nearest
neighbours by cosine similarity and its mirror's ``MIRROR_NEIGHBOURS`` nearest (flipped
copies), unioned over the views. Nothing here decides that two images are the same picture;
verify.py does.

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
# first neighbour of the other's mirror, 405 within the first two. So a mirror's search
# proposes only its nearest: with as many as each image's own (10), it proposed 22k of the
# throughput bench's photos' 38k pairs, compared 12,843 mirrored first (771 mirrors described)
# and confirmed none mirrored; the 22 it confirmed as they are, 12 nearest neighbours per view
# instead of 10 also find (with about 1,400 more pairs in groups there, 600 fewer, and the
# same recall).
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
    whether a mirror's search found it (bool, m): rounds.py compares only those mirrored."""
    n = len(views)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=bool)
    searches = ((False, min(k, n - 1)), (True, min(MIRROR_NEIGHBOURS, n - 1)))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # determinism (HNSW) and clean.workers owns the cores
    try:
        found, by_mirror = [], []
        for view in range(views.shape[1]):
            index = _index(np.ascontiguousarray(views[:, view], dtype=np.float32))
            for mirrored, count in searches:
                queries = (mirror_views if mirrored else views)[:, view]
                similarity, ids = index.search(np.ascontiguousarray(queries, np.float32), count + 1)
                rows = np.repeat(np.arange(n), count + 1).reshape(n, count + 1)
                chosen = (ids >= 0) & (ids != rows) & (similarity >= min_similarity)
                # Its own mirror may be an image's nearest: the first `count` others are kept.
                chosen &= np.cumsum(chosen, axis=1) <= count
                found.append(np.stack([rows[chosen], ids[chosen]], axis=1))
                by_mirror.append(np.full(int(chosen.sum()), mirrored))
    finally:
        faiss.omp_set_num_threads(threads)
    pairs = np.sort(np.concatenate(found).astype(np.int64), axis=1)
    unique, which = np.unique(pairs, axis=0, return_inverse=True)
    mirrored_pairs = np.zeros(len(unique), dtype=bool)
    np.logical_or.at(mirrored_pairs, which.ravel(), np.concatenate(by_mirror))
    return unique, mirrored_pairs


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
