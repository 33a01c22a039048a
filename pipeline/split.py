"""Split stage: grouped, stratified, seeded train/val/test lists that stay put as data grows.

Consumes ``data/clean/manifest.jsonl`` (one row per kept image: path relative to data/clean,
class, group, ...) and the ``split`` section of params.yaml. Produces, in ``data/split/``:

- ``train.csv``, ``val.csv``, ``test.csv``: columns path, class, group; ``path`` is relative to
  the CSV's own folder (``../clean/<class>/<sha>.<jpg|png>``). No images are copied.
- ``assignment.csv``: every clean image with its split (``unused`` when count targets are full),
  paths relative to data/clean: the persisted assignment the next run starts from.
- ``split_params.json``: the fingerprint of the seed and sizes that assignment was made with
  (``pipeline.resume``), and the seed and sizes themselves for a reader.

and ``reports/split_report.json`` (counts per split and class, a DVC metric).

Why a persisted assignment rather than hashing each image into a split: a hash keeps old images
in place too, but its per-class counts drift binomially from the requested sizes (±√n), while
here every class lands within one image of its target (for singleton groups) and a re-crawl's new
images go where the targets are short. An image keeps its split for as long as the seed and sizes
stay the same; change either and the split is redrawn from scratch. The one exception: when a
re-clean merges near-duplicate groups that had been placed in different splits, the merged group
moves as a whole (to the split holding most of it; ties favour test, then val), so no group ever
straddles splits. Moves are counted in the report.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import SplitConfig, StageError
from pipeline.files import atomic_write_json, read_csv, read_jsonl, write_csv
from pipeline.resume import Resume, fingerprint, record, recorded_fingerprint, reuse_or_wipe

SPLITS = ("train", "val", "test")
UNUSED = "unused"
# When a merged group's members disagree, the split that loses least by keeping it wins.
_PROTECTED_ORDER = {"test": 0, "val": 1, "train": 2, UNUSED: 3}
REQUIRED_KEYS = ("path", "class", "group")
SPLIT_FIELDS = ["path", "class", "group"]
ASSIGNMENT_FIELDS = ["path", "class", "group", "split"]
PARAMS_MARKER = "split_params.json"


@dataclass(frozen=True)
class Image:
    path: str  # relative to the clean folder
    label: str
    group: str


@dataclass
class SplitSummary:
    counts: dict[str, int]
    kept: int
    new: int
    moved: int
    unused: int
    classes: int
    report: Path
    redrawn: bool = False
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        sizes = ", ".join(f"{name} {self.counts[name]}" for name in SPLITS)
        extra = f", {self.unused} unused" if self.unused else ""
        if self.redrawn:
            extra += "; seed or sizes changed, so the split was redrawn"
        return (
            f"{sizes} images over {self.classes} classes ({self.kept} kept in place, "
            f"{self.new} newly assigned, {self.moved} moved with a merged group{extra}); "
            f"report {self.report}"
        )


def _group_order(seed: int, group: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()


def _read_manifest(clean: Path) -> list[Image]:
    manifest = clean / "manifest.jsonl"
    if not manifest.exists():
        raise StageError(f"{manifest}: clean manifest not found; run the clean stage first")
    try:
        rows = read_jsonl(manifest)
    except ValueError as exc:
        raise StageError(str(exc)) from None
    images = []
    for number, row in enumerate(rows, start=1):
        missing = [key for key in REQUIRED_KEYS if not row.get(key)]
        if missing:
            raise StageError(f"{manifest}: row {number} lacks {', '.join(missing)}")
        images.append(Image(str(row["path"]), str(row["class"]), str(row["group"])))
    if not images:
        raise StageError(f"{manifest}: no images to split")
    return images


def _params_record(cfg: SplitConfig) -> dict[str, Any]:
    return {"seed": cfg.seed, "train": cfg.train, "val": cfg.val, "test": cfg.test}


def _previous_assignment(cfg: SplitConfig, out: Path) -> tuple[dict[str, str], bool]:
    """Return (path → split from the last run, whether that assignment exists but is unreadable).

    The mapping is empty when there is no last run or it used another seed or other sizes: the
    fingerprint ``split_params.json`` records differs (see ``_record_params``). Only reads: a
    run that fails its checks must leave the last assignment in place.
    """
    assignment = out / "assignment.csv"
    if _recorded(cfg, out) != _params_fingerprint(cfg):
        return {}, False
    try:
        rows = read_csv(assignment) if assignment.exists() else []
    except (OSError, ValueError):
        return {}, True
    valid = (*SPLITS, UNUSED)
    return {row["path"]: row["split"] for row in rows if row.get("split") in valid}, False


def _params_fingerprint(cfg: SplitConfig) -> str:
    return fingerprint(_params_record(cfg))


def _recorded(cfg: SplitConfig, out: Path) -> str | None:
    """The fingerprint ``split_params.json`` records. A marker from before pipeline.resume (the
    bare seed and sizes) counts as this run's fingerprint when it records the same seed and
    sizes, so upgrading does not redraw a split grown over several crawls."""
    marker = out / PARAMS_MARKER
    recorded = recorded_fingerprint(marker)
    if recorded is None and marker.is_file():
        try:
            legacy = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if legacy == _params_record(cfg):
            return _params_fingerprint(cfg)
    return recorded


def _record_params(cfg: SplitConfig, out: Path) -> Resume:
    """Wipe an assignment made with another seed or sizes and record this run's.

    Returns ``Resume.WIPED`` when a last run's split is being redrawn.
    """
    assignment = out / "assignment.csv"
    if recorded_fingerprint(out / PARAMS_MARKER) is None and _recorded(cfg, out) is not None:
        record(out / PARAMS_MARKER, _params_fingerprint(cfg), _params_record(cfg))  # upgrade
    return reuse_or_wipe(
        out / PARAMS_MARKER,
        _params_fingerprint(cfg),
        lambda: assignment.unlink(missing_ok=True),
        _params_record(cfg),
    )


def _targets(cfg: SplitConfig, label: str, images: int, groups: int) -> dict[str, float]:
    requested = {name: float(getattr(cfg, name)) for name in SPLITS}
    needed = [name for name in SPLITS if requested[name] > 0]
    if cfg.as_counts:
        total = sum(requested.values())
        if images < total:
            sizes = " + ".join(f"{name} {int(requested[name])}" for name in SPLITS)
            raise StageError(
                f"class {label!r} has {images} images but split needs {sizes} = {int(total)}; "
                "lower the split counts in params.yaml or crawl more images"
            )
        return requested
    targets = {name: requested[name] * images for name in SPLITS}
    short = [name for name in needed if targets[name] < 1]
    if groups < len(needed) or short:
        sizes = ", ".join(f"{name} {targets[name]:.1f}" for name in SPLITS)
        raise StageError(
            f"class {label!r} has {images} images in {groups} near-duplicate groups, too few for "
            f"split fractions train {cfg.train:g} / val {cfg.val:g} / test {cfg.test:g} "
            f"(would give {sizes}); every split needs at least one group — crawl more images "
            "or change the split fractions in params.yaml"
        )
    return targets


def _assign_class(
    cfg: SplitConfig, label: str, groups: dict[str, list[Image]], previous: dict[str, str]
) -> tuple[dict[str, str], int, int]:
    """Return (group → split, images newly assigned, images moved) for one class."""
    images = sum(len(members) for members in groups.values())
    targets = _targets(cfg, label, images, len(groups))
    placed: dict[str, str] = {}
    sizes: Counter[str] = Counter()
    moved = 0
    fresh: list[str] = []
    for group, members in groups.items():
        # Images left unused by a full count target compete again like new ones.
        before = Counter(previous[m.path] for m in members if previous.get(m.path) in SPLITS)
        if not before:
            fresh.append(group)
            continue
        # Majority wins; ties go to the split that must stay most stable.
        split = min(before, key=lambda s: (-before[s], _PROTECTED_ORDER[s]))
        placed[group] = split
        sizes[split] += len(members)
        moved += sum(n for s, n in before.items() if s != split)
    # Big groups first so they still fit; then a seeded order, independent of manifest order.
    fresh.sort(key=lambda g: (-len(groups[g]), _group_order(cfg.seed, g)))
    new = 0
    for group in fresh:
        size = len(groups[group])
        room = {s: targets[s] - sizes[s] for s in SPLITS if targets[s] > 0}
        if cfg.as_counts:
            room = {s: r for s, r in room.items() if r >= size}
        if not room:
            placed[group] = UNUSED
            continue
        split = max(room, key=lambda s: (room[s], -SPLITS.index(s)))
        placed[group] = split
        sizes[split] += size
        new += size
    return placed, new, moved


def _write_split(
    ordered: list[Image], assignment: dict[str, str], clean: Path, out: Path
) -> dict[str, dict[str, int]]:
    """Write assignment.csv and the split CSVs; return images per split and class."""
    # The assignment is the state a rerun trusts, so it is written first; the CSVs derive from it.
    write_csv(
        out / "assignment.csv",
        (
            {"path": i.path, "class": i.label, "group": i.group, "split": assignment[i.path]}
            for i in ordered
        ),
        ASSIGNMENT_FIELDS,
    )
    prefix = Path(os.path.relpath(clean, out))
    for name in SPLITS:
        rows = [
            {"path": (prefix / i.path).as_posix(), "class": i.label, "group": i.group}
            for i in ordered
            if assignment[i.path] == name
        ]
        write_csv(out / f"{name}.csv", rows, SPLIT_FIELDS)
    per_class: dict[str, dict[str, int]] = {name: {} for name in (*SPLITS, UNUSED)}
    for i in ordered:
        split_name = assignment[i.path]
        per_class[split_name][i.label] = per_class[split_name].get(i.label, 0) + 1
    return per_class


def split(cfg: SplitConfig, clean: Path, out: Path, report: Path) -> SplitSummary:
    """Assign each clean image to train, val or test and write the split CSVs and report.

    Returns a SplitSummary. Raises StageError when the clean manifest is missing or malformed,
    or a class has too few images (or near-duplicate groups) for the requested sizes — the
    message names the class and the counts. Nothing is written before all checks pass.
    """
    clean, out = Path(clean), Path(out)
    images = _read_manifest(clean)
    previous, unreadable = _previous_assignment(cfg, out)
    by_class: dict[str, dict[str, list[Image]]] = defaultdict(lambda: defaultdict(list))
    for image in images:
        by_class[image.label][image.group].append(image)
    # A group id shared by two classes would let one group straddle; key groups per class.
    assignment: dict[str, str] = {}
    new = moved = 0
    for label in sorted(by_class):
        placed, class_new, class_moved = _assign_class(cfg, label, by_class[label], previous)
        new += class_new
        moved += class_moved
        for group, members in by_class[label].items():
            for member in members:
                assignment[member.path] = placed[group]

    ordered = sorted(images, key=lambda i: (i.label, i.path))
    redrawn = _record_params(cfg, out) is Resume.WIPED or unreadable
    per_class = _write_split(ordered, assignment, clean, out)
    counts = {name: sum(per_class[name].values()) for name in (*SPLITS, UNUSED)}
    kept = sum(1 for i in images if previous.get(i.path) == assignment[i.path])
    atomic_write_json(
        report,
        {
            "mode": "counts" if cfg.as_counts else "fractions",
            "requested": {name: getattr(cfg, name) for name in SPLITS},
            "seed": cfg.seed,
            "images": len(images),
            "groups": sum(len(groups) for groups in by_class.values()),
            "counts": counts,
            "per_class": per_class,
            "kept_in_place": kept,
            "newly_assigned": new,
            "moved_with_merged_group": moved,
            "redrawn": redrawn,
        },
    )
    return SplitSummary(
        counts={name: counts[name] for name in SPLITS},
        kept=kept,
        new=new,
        moved=moved,
        unused=counts[UNUSED],
        classes=len(by_class),
        report=Path(report),
        redrawn=redrawn,
        per_class=per_class,
    )
