"""Pass 2's rounds, in the stage's process: which pairs the workers verify, and when.

Consumes the candidate records (their view embeddings, from the decode workers; embed.py),
the pairs the earlier passes already matched and the verdict log of earlier runs
(verdicts.py). Produces the confirmed pairs (i < j) with their ``Match`` and the pass's counts;
the verifying itself is verify.py's, on the workers.

1. ``view_neighbours`` (neighbours.py): each image's k nearest neighbours per view and its
   mirror's nearest, with the cosine similarity of the pair as is and mirrored; pairs
   already matched directly are skipped. A pair is compared as it is, and first mirrored
   when a mirror's search proposed it (one image is the other's mirror's nearest neighbour in
   some view) and its mirror's thumbnails are the closer and at least
   ``MIRROR_MIN_SIMILARITY`` alike; which of its two images is mirrored is chosen so that few
   mirrors need describing (``_mirror_sides``).
2. With ``duplicate_groups: connected``, pairs are verified most similar first, in rounds
   of ``FIRST_ROUND`` pairs doubling up to ``ROUND``, and a pair whose images an earlier round
   (or pass 1) already put in one group is not verified at all: it could not change any
   group. The rounds do not depend on the number of workers, so the output does not either.
   A pair an earlier run judged with the same settings takes its verdict from the log.
3. ``describe.describe_images`` (workers): ORB keypoints of every image a round's pairs need
   (and of the mirrors they need), computed once from one read of the file; left in the
   run's ``describe.DescribedStore``.
4. ``verify.verify_pairs`` (workers), in tasks of ``VERIFY_BATCH`` pairs.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import DisjointSet

from pipeline.clean.analysis import analysis_fingerprint
from pipeline.clean.decode import DecodeSettings
from pipeline.clean.describe import DescribedStore, describe_all
from pipeline.clean.embed import decode_views
from pipeline.clean.kept import forget_run
from pipeline.clean.neighbours import pair_similarities, view_neighbours
from pipeline.clean.records import ImageRecord, Match
from pipeline.clean.verdicts import Key, VerdictLog, verdict_fingerprint
from pipeline.clean.verify import (
    MIRROR_I,
    MIRROR_J,
    PLAIN,
    Candidate,
    VerifySettings,
    VerifyTask,
    mirrored_image,
    verify_pairs,
)
from pipeline.clean.workers import WorkerPool
from pipeline.config import CleanConfig

VERIFY_BATCH = 128  # pairs per verify task
# A pair is compared mirrored first only when its mirror's thumbnails are at least this alike:
# on the throughput bench's photos 14k of 21k mirrored comparisons were of pairs below 0.7 and
# none confirmed; on bench/clean_recall.py those below 0.6 confirmed nothing the plain way or
# another pair did not (same recall), for 5-9 % less pass 2.
MIRROR_MIN_SIMILARITY = 0.6
# Pairs verified between two transitivity checks (connected groups): FIRST_ROUND, doubling up
# to ROUND. The most alike pairs come first and most of them are copies: on the throughput
# bench's photos the first 2,048 confirmed 1,185 pairs (of 1,978 in all), many of them joining
# images that others of those pairs had already joined.
FIRST_ROUND = 256
ROUND = 2048

Edge = tuple[int, int]


def orb_pairs(
    cfg: CleanConfig,
    records: Sequence[ImageRecord],
    matched: set[Edge],
    out: Path,
    pool: WorkerPool,
) -> tuple[list[tuple[int, int, Match]], dict[str, int]]:
    """Confirmed pairs among neighbours not already ``matched``, sorted, and the counts of
    candidates, pairs verified and pairs confirmed (by ORB and by dense alignment)."""
    views = np.stack([decode_views(r.image.embedding) for r in records])
    mirrors = np.stack([decode_views(r.image.mirror_embedding) for r in records])
    pairs, by_mirror = view_neighbours(
        views, mirrors, cfg.second_pass_neighbours, cfg.second_pass_min_similarity
    )
    # Pairs the cheap passes already joined need no geometric proof.
    keep = np.array([(int(i), int(j)) not in matched for i, j in pairs], dtype=bool)
    if len(pairs):
        pairs, by_mirror = pairs[keep], by_mirror[keep]
    plain, mirrored = pair_similarities(views, mirrors, pairs)
    flip = by_mirror & (mirrored > plain) & (mirrored >= MIRROR_MIN_SIMILARITY)
    similarity, other = np.where(flip, mirrored, plain), np.where(flip, plain, mirrored)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -similarity)) if len(pairs) else []
    candidates: list[Candidate] = [
        (
            int(pairs[n, 0]),
            int(pairs[n, 1]),
            MIRROR_J if flip[n] else PLAIN,
            float(similarity[n]),
            float(other[n]),
        )
        for n in order
    ]
    settings = VerifySettings.from_config(cfg)
    verdicts = VerdictLog(
        out,
        verdict_fingerprint(
            analysis_fingerprint(DecodeSettings.from_config(cfg)), asdict(settings)
        ),
    )
    shas = [record.image.sha256 for record in records]

    def key(pair: Candidate) -> Key:
        return shas[pair[0]], shas[pair[1]], pair[2] != PLAIN

    store = DescribedStore(out)
    store.reset()
    files = {i: str(out / record.image.clean_path) for i, record in enumerate(records)}
    transitive = cfg.duplicate_groups == "connected"
    joined = DisjointSet(range(len(records)))
    for i, j in matched:
        joined.merge(i, j)
    confirmed: list[tuple[int, int, Match]] = []
    verified = reused = 0
    start, size = 0, FIRST_ROUND
    while start < len(candidates):
        chunk = candidates[start : start + size]
        start, size = start + size, min(2 * size, ROUND)
        if transitive:
            chunk = [pair for pair in chunk if not joined.connected(pair[0], pair[1])]
        found, todo = [], []
        for pair in chunk:
            known, match = verdicts.get(key(pair))
            if not known:
                todo.append(pair)
            elif match is not None:
                found.append((pair[0], pair[1], match))
        verified, reused = verified + len(todo), reused + len(chunk) - len(todo)
        todo.sort()  # pairs of one image in one task: its grey is read once
        todo = _mirror_sides(todo, {i for i, mirrored in store.located if mirrored})
        # Described as a round first needs them: a rerun describes only new pairs' images.
        describe_all(settings.orb_features, _needed(todo), files, pool, store)
        tasks = [
            _verify_task(settings, todo[at : at + VERIFY_BATCH], files, store)
            for at in range(0, len(todo), VERIFY_BATCH)
        ]
        new = [
            f for batch in pool.map(verify_pairs, tasks, "clean: verify", "batch") for f in batch
        ]
        matches = {(a, b): match for a, b, match in new}
        verdicts.add((key(pair), matches.get((pair[0], pair[1]))) for pair in todo)
        for a, b, match in sorted(found + new, key=lambda item: item[:2]):
            joined.merge(a, b)
            confirmed.append((a, b, match))
    verdicts.compact()
    store.remove()
    forget_run()  # what an inline run (one worker) kept in this process
    confirmed.sort(key=lambda pair: pair[:2])
    counts = {
        "orb_candidates": len(candidates),
        "orb_verified": verified,
        "verdicts_reused": reused,
        "orb_confirmed": sum(1 for *_, m in confirmed if m.method == "orb"),
        "ecc_confirmed": sum(1 for *_, m in confirmed if m.method == "ecc"),
    }
    return confirmed, counts


def _mirror_sides(pairs: list[Candidate], mirrored: set[int]) -> list[Candidate]:
    """``pairs`` with each one compared mirrored first mirroring whichever of its two
    images (i mirrored onto j is j mirrored onto i) keeps the mirrors to describe few:
    one already described (``mirrored``), else a greedy vertex cover of the pairs left
    (most pairs first, then the lower index). On bench/clean_throughput.py's photos the
    1,099 mirrors that always mirroring j described became 771, for the same comparisons."""
    adjacent: dict[int, set[int]] = {}
    for i, j, flip, *_ in pairs:
        if flip != PLAIN and i not in mirrored and j not in mirrored:
            adjacent.setdefault(i, set()).add(j)
            adjacent.setdefault(j, set()).add(i)
    chosen = set(mirrored)
    heap = [(-len(others), image) for image, others in adjacent.items()]
    heapq.heapify(heap)
    while heap:
        degree, image = heapq.heappop(heap)
        others = adjacent[image]
        if -degree != len(others):  # stale: some of its pairs are covered already
            if others:
                heapq.heappush(heap, (-len(others), image))
            continue
        chosen.add(image)
        for other in others:
            adjacent[other].discard(image)
        others.clear()
    return [
        (i, j, MIRROR_I if flip != PLAIN and j not in chosen else flip, similarity, other)
        for i, j, flip, similarity, other in pairs
    ]


def _needed(pairs: list[Candidate]) -> dict[int, bool]:
    """Each image the pairs compare, and whether one compares it mirrored."""
    needed: dict[int, bool] = {}
    for i, j, flip, *_ in pairs:
        needed.setdefault(i, False)
        needed.setdefault(j, False)
        if flip != PLAIN:
            needed[mirrored_image(i, j, flip)] = True
    return needed


def _verify_task(
    settings: VerifySettings,
    pairs: list[Candidate],
    files: dict[int, str],
    store: DescribedStore,
) -> VerifyTask:
    images = _needed(pairs)
    needed = [(i, False) for i in images]
    needed += [(i, True) for i, mirrored in images.items() if mirrored]
    return VerifyTask(
        pairs=tuple(pairs),
        files={i: files[i] for i in images},
        settings=settings,
        store={key: store.located[key] for key in needed},
        run=str(store.root),
    )
