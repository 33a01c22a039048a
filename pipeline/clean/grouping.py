"""Grouping: pairs of same-picture images → duplicate groups, who stays, and label conflicts.

Consumes the candidate ``ImageRecord`` list and the matched pairs of every pass (exact
pixels, pHash, ORB). Produces a ``Grouping``: each image's group id (its representative's
sha256 prefix), the images kept, a ``Removal`` for each dropped one (exact_duplicate,
near_duplicate, label_conflict, naming the image it duplicates and the evidence) and a
``DuplicateGroup`` (a row of groups.jsonl) for every group of two or more.

What a group is (``clean.duplicate_groups``): ``connected`` (default) — any chain of matches,
the transitive closure; ``star`` — every member was matched directly to the group's
representative (or has its exact pixels). Closure chained 76 overlapping crops of one
photograph into one group on bench/clean_recall.py (pair precision 0.48) until pass 2 required
0.7 of each picture to overlap; with that guard, before the dense fallback, closure scored
precision 1.000, recall 0.785 and stars 1.000, 0.731 (a copy of a copy that only matches the copy
still joins the group); ``bench/clean_recall.py --groups-both`` measures both.

Within a group the first class in manifest order wins; in it the largest original is the
representative. A group spanning classes is a label conflict: dropped from every class
(``label_conflicts: drop``) or kept only in the first (``keep_first``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import breadth_first_order, connected_components

from pipeline.clean.records import EXACT, ImageRecord, Match, Removal

Edge = tuple[int, int]  # (i, j), i < j, indices into the candidate list


class MatchedPairs:
    """Pairs of images found to show the same picture; the first evidence found for a pair
    is the one reported."""

    def __init__(self) -> None:
        self.evidence: dict[Edge, Match] = {}

    def add(self, i: int, j: int, match: Match) -> None:
        self.evidence.setdefault((min(i, j), max(i, j)), match)

    def add_exact(self, records: Sequence[ImageRecord]) -> int:
        """Join images with identical pixels (chained in order); returns the pairs added."""
        by_sha: dict[str, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            by_sha[record.image.sha256].append(index)
        before = len(self.evidence)
        for indices in by_sha.values():
            for a, b in itertools.pairwise(indices):
                self.add(a, b, EXACT)
        return len(self.evidence) - before

    @property
    def edges(self) -> list[Edge]:
        return list(self.evidence)


def graph_groups(n: int, edges: Sequence[Edge]) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes."""
    if not edges:
        return np.arange(n)
    i, j = np.array(edges).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


@dataclass(frozen=True)
class GroupMember:
    path: str  # raw path
    class_name: str
    sha256: str
    phash: str
    kept: bool


@dataclass(frozen=True)
class GroupEdge:
    a: str  # raw paths
    b: str
    match: Match


@dataclass(frozen=True)
class DuplicateGroup:
    """One row of groups.jsonl."""

    group: str
    classes: tuple[str, ...]
    label_conflict: bool
    kept: tuple[str, ...]  # clean paths
    members: tuple[GroupMember, ...]
    edges: tuple[GroupEdge, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "classes": list(self.classes),
            "label_conflict": self.label_conflict,
            "kept": list(self.kept),
            "members": [
                {
                    "path": m.path,
                    "class": m.class_name,
                    "sha256": m.sha256,
                    "phash": m.phash,
                    "kept": m.kept,
                }
                for m in self.members
            ],
            "edges": [{"a": e.a, "b": e.b, **e.match.to_json()} for e in self.edges],
        }


@dataclass
class Grouping:
    """What dedupe decided, index by index into the candidate list."""

    group_of: dict[int, str] = field(default_factory=dict)
    kept: list[int] = field(default_factory=list)  # group by group, ascending in each
    removals: list[Removal] = field(default_factory=list)
    groups: list[DuplicateGroup] = field(default_factory=list)


@dataclass(frozen=True)
class GroupPolicy:
    """``clean.label_conflicts``, ``clean.near_duplicates`` and ``clean.duplicate_groups``."""

    label_conflicts: Literal["drop", "keep_first"]
    near_duplicates: Literal["drop", "group"]
    duplicate_groups: Literal["connected", "star"] = "connected"


def star_labels(n: int, edges: Sequence[Edge], order: Sequence[int]) -> np.ndarray:
    """Each node's star: walking ``order`` (best first), a node not yet in a star becomes a
    centre and takes every unassigned neighbour. Returns the centre of each node's star."""
    neighbours: dict[int, list[int]] = defaultdict(list)
    for a, b in edges:
        neighbours[a].append(b)
        neighbours[b].append(a)
    labels = np.full(n, -1, dtype=np.int64)
    for node in order:
        if labels[node] >= 0:
            continue
        labels[node] = node
        for other in neighbours[node]:
            if labels[other] < 0:
                labels[other] = node
    return labels


def _star_groups(records: Sequence[ImageRecord], edges: Sequence[Edge]) -> np.ndarray:
    """Stars over the records, exact twins always in one star: twins are one node, and the
    best candidates (first class in manifest order, then the largest) are centres first."""
    first_of: dict[str, int] = {}
    twin = np.array([first_of.setdefault(r.image.sha256, i) for i, r in enumerate(records)])
    class_rank: dict[str, int] = {}
    for record in records:
        class_rank.setdefault(record.class_name, len(class_rank))
    node_edges = sorted(
        {
            (int(min(twin[a], twin[b])), int(max(twin[a], twin[b])))
            for a, b in edges
            if twin[a] != twin[b]
        }
    )
    nodes = sorted(set(twin.tolist()))
    order = sorted(nodes, key=lambda i: (class_rank[records[i].class_name], -records[i].area, i))
    return star_labels(len(records), node_edges, order)[twin]


def resolve_groups(
    records: Sequence[ImageRecord], pairs: MatchedPairs, policy: GroupPolicy
) -> Grouping:
    """Group the records along ``pairs`` and decide, group by group, which members stay."""
    if policy.duplicate_groups == "star":
        labels = _star_groups(records, pairs.edges)
    else:
        labels = graph_groups(len(records), pairs.edges)
    # A star keeps only the links inside it; the others joined pictures it kept apart.
    edges = [(a, b) for a, b in pairs.edges if labels[a] == labels[b]]
    members: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        members[int(label)].append(index)
    edges_by_group: dict[int, list[Edge]] = defaultdict(list)
    for a, b in edges:
        edges_by_group[int(labels[a])].append((a, b))

    grouping = Grouping()
    for label, indices in members.items():
        if len(indices) == 1:
            grouping.group_of[indices[0]] = records[indices[0]].image.sha256[:16]
            grouping.kept.append(indices[0])
        else:
            group = _Group.of(records, sorted(indices), edges_by_group[label])
            _resolve_group(records, group, pairs.evidence, policy, grouping)
    return grouping


@dataclass(frozen=True)
class _Group:
    """One group of two or more, before its verdicts."""

    indices: list[int]  # ascending
    edges: list[Edge]
    classes: tuple[str, ...]  # in manifest order; the first one wins a conflict
    representative: int
    group_id: str  # the representative's sha256 prefix
    parents: dict[int, int]  # member → its neighbour on the way to the representative

    @classmethod
    def of(cls, records: Sequence[ImageRecord], indices: list[int], edges: list[Edge]) -> _Group:
        classes = tuple(dict.fromkeys(records[i].class_name for i in indices))
        # Manifest order decides "first"; within a class the largest original is the one kept.
        representative = max(
            (i for i in indices if records[i].class_name == classes[0]),
            key=lambda i: (records[i].area, -i),
        )
        group_id = records[representative].image.sha256[:16]
        parents = _spanning_parents(representative, indices, edges)
        return cls(indices, edges, classes, representative, group_id, parents)

    @property
    def conflict(self) -> bool:
        return len(self.classes) > 1


def _resolve_group(
    records: Sequence[ImageRecord],
    group: _Group,
    evidence: dict[Edge, Match],
    policy: GroupPolicy,
    grouping: Grouping,
) -> None:
    """Decide which members of one duplicate group stay; record it all in ``grouping``."""
    kept: dict[str, int] = {records[group.representative].image.sha256: group.representative}
    for index in group.indices:
        grouping.group_of[index] = group.group_id
        removal = _removal(records, group, index, kept, evidence, policy)
        if removal is not None:
            grouping.removals.append(removal)
    dropped_all = group.conflict and policy.label_conflicts == "drop"
    kept_indices = set() if dropped_all else set(kept.values())
    grouping.kept.extend(sorted(kept_indices))
    grouping.groups.append(_group_row(records, group, kept_indices, evidence))


def _removal(
    records: Sequence[ImageRecord],
    group: _Group,
    index: int,
    kept: dict[str, int],
    evidence: dict[Edge, Match],
    policy: GroupPolicy,
) -> Removal | None:
    """Why member ``index`` goes, or None when it stays (under ``near_duplicates: group`` it
    is then added to ``kept``, by sha256, so its exact twins still go)."""
    record = records[index]
    if group.conflict and (
        policy.label_conflicts == "drop" or record.class_name != group.classes[0]
    ):
        detail = f"the same picture was crawled for {', '.join(group.classes)}"
        return Removal(
            record.path,
            record.class_name,
            "label_conflict",
            detail=detail,
            classes=group.classes,
            group=group.group_id,
        )
    if index == group.representative:
        return None
    twin = kept.get(record.image.sha256)
    if twin is not None:
        return Removal(
            record.path,
            record.class_name,
            "exact_duplicate",
            group=group.group_id,
            dup_of=records[twin].path,
            kept=records[twin].image.clean_path,
            match=EXACT,
        )
    if policy.near_duplicates == "group":
        kept[record.image.sha256] = index
        return None
    parent = group.parents[index]
    return Removal(
        record.path,
        record.class_name,
        "near_duplicate",
        group=group.group_id,
        dup_of=records[parent].path,
        kept=records[group.representative].image.clean_path,
        match=evidence[(min(index, parent), max(index, parent))],
    )


def _group_row(
    records: Sequence[ImageRecord],
    group: _Group,
    kept: set[int],
    evidence: dict[Edge, Match],
) -> DuplicateGroup:
    members = []
    for i in group.indices:
        record = records[i]
        members.append(
            GroupMember(
                record.path, record.class_name, record.image.sha256, record.image.phash, i in kept
            )
        )
    return DuplicateGroup(
        group=group.group_id,
        classes=group.classes,
        label_conflict=group.conflict,
        kept=tuple(sorted(records[i].image.clean_path for i in kept)),
        members=tuple(members),
        edges=tuple(
            GroupEdge(records[a].path, records[b].path, evidence[(a, b)])
            for a, b in sorted(group.edges)
        ),
    )


def _spanning_parents(root: int, indices: list[int], edges: list[Edge]) -> dict[int, int]:
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
