"""Pass 1: near duplicates by perceptual hash, found with a multi-index Hamming search.

Consumes each image's pHash and mirrored pHash (hex strings, computed by the decode workers).
Produces the pairs (i < j) of images whose pHashes are within ``near_dup_max_distance`` bits,
each with a ``Match`` (method phash or phash_mirror, and the distance). The search itself
(``hashes_to_bits``, ``hamming_pairs``) works on any packed bit strings.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from pipeline.clean.records import ImageRecord, Match

Pair = tuple[int, int, Match]


def phash_pairs(
    records: Sequence[ImageRecord], max_distance: int, mirrored: bool
) -> tuple[list[Pair], dict[str, int]]:
    """Pairs within ``max_distance`` bits (phash first, then phash_mirror), and their counts.

    With ``mirrored``, each image's mirrored pHash is also searched against the others', so
    horizontal flips are found.
    """
    found: list[Pair] = []
    bits = hashes_to_bits([r.image.phash for r in records])
    i, j, distance = hamming_pairs(bits, max_distance)
    for a, b, d in zip(i.tolist(), j.tolist(), distance.tolist(), strict=True):
        found.append((a, b, Match("phash", distance=d)))
    counts = {"phash_pairs": len(i)}
    if mirrored:
        mirrors = hashes_to_bits([r.image.phash_mirror for r in records])
        i, j, distance = hamming_pairs(bits, max_distance, queries=mirrors)
        keep = i != j
        for a, b, d in zip(
            i[keep].tolist(), j[keep].tolist(), distance[keep].tolist(), strict=True
        ):
            found.append((a, b, Match("phash_mirror", distance=d)))
        counts["phash_mirror_pairs"] = int(keep.sum())
    return found, counts


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
