"""The clean stage from end to end: ``clean(cfg, raw, out, report) -> CleanSummary``.

Consumes ``data/raw/manifest.jsonl`` and the files it names; produces everything listed in
``pipeline/clean/__init__.py``. Reads top to bottom: read the raw manifest → analyse every
file (analysis.py, on the worker pool) → per-image verdicts → quality flags (quality.py) →
duplicate pairs: exact pixels, pHash (phash.py), ORB (verify.py) → groups and who stays
(grouping.py) → files and report (report.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.clean.analysis import analyse_all, compact_log
from pipeline.clean.decode import DecodeSettings
from pipeline.clean.grouping import GroupPolicy, MatchedPairs, resolve_groups
from pipeline.clean.phash import phash_pairs
from pipeline.clean.quality import FlagThresholds, flag_all
from pipeline.clean.records import Analysis, ImageRecord, RawImage, Removal
from pipeline.clean.report import (
    DUPLICATE_SHEET,
    MANIFEST,
    REMOVED,
    Outcome,
    prune,
    report_json,
    write_duplicate_sheet,
    write_outputs,
)
from pipeline.clean.workers import WorkerPool, worker_count
from pipeline.config import CleanConfig, StageError
from pipeline.files import atomic_write_json, read_jsonl


@dataclass(frozen=True)
class CleanSummary:
    """What the clean stage did; ``str()`` is the one-line summary the CLI prints."""

    raw: int = 0
    kept: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # reason → count
    groups: int = 0
    classes: int = 0
    reused: int = 0
    flagged: int = 0

    def __str__(self) -> str:
        removed = Counter(self.removed)
        reasons = ", ".join(f"{n} {reason}" for reason, n in removed.most_common())
        return (
            f"kept {self.kept} of {self.raw} images in {self.classes} classes; "
            f"removed {sum(removed.values())}"
            + (f" ({reasons})" if reasons else "")
            + f"; {self.groups} duplicate groups; {self.flagged} flagged in issues.csv"
            + (f"; reused {self.reused} analyses from a previous run" if self.reused else "")
        )


def clean(cfg: CleanConfig, raw: Path, out: Path, report: Path) -> CleanSummary:
    """Validate, normalise, flag and dedupe ``raw`` into ``out``; write the report.

    Returns a CleanSummary. Raises StageError when the raw manifest is missing or malformed,
    or when no image survives or a class keeps fewer than ``min_images_per_class`` (after
    writing every output: removed.jsonl says why each file went).
    Safe to kill: every file is written atomically and per-image results are logged as they
    finish, so a rerun only analyses what is new.
    """
    raw, out, report = Path(raw), Path(out), Path(report)
    rows = read_raw_manifest(raw)
    settings = DecodeSettings.from_config(cfg)
    with WorkerPool(worker_count(cfg), cfg.dask_address) as pool:
        analyses, reused = analyse_all(settings, raw, out, rows, pool)
        outcome = decide(cfg, rows, analyses, out, pool)
    # The lists first, then delete what they do not name (a kill in between leaves only
    # extra files, which the rerun deletes).
    write_outputs(out, outcome)
    compact_log(settings, out, rows, analyses)
    prune(out, {record.image.clean_path for record, _ in outcome.kept})
    atomic_write_json(report, report_json(outcome))
    write_duplicate_sheet(report.parent / DUPLICATE_SHEET, raw, outcome.groups)
    summary = CleanSummary(
        raw=len(rows),
        kept=len(outcome.kept),
        removed=dict(Counter(r.reason for r in outcome.removed)),
        groups=len(outcome.groups),
        classes=len({record.class_name for record, _ in outcome.kept}),
        reused=reused,
        flagged=sum(1 for record, _ in outcome.issues if record.flags),
    )
    if summary.kept == 0:
        # Everything is written first, so removed.jsonl explains why; the next stage would
        # only fail less clearly.
        raise StageError(
            f"{raw / MANIFEST}: no image survived cleaning ({summary}); "
            f"see {out / REMOVED} for each file's reason"
        )
    short = too_few_kept(cfg.min_images_per_class, outcome)
    if short:
        raise StageError(
            f"{short}. Every output is written ({out / REMOVED} says why each file went); crawl "
            "more images for the class, loosen the clean params or lower "
            "clean.min_images_per_class, then rerun (finished analyses are reused)"
        )
    return summary


def too_few_kept(minimum: int, outcome: Outcome) -> str | None:
    """Say which classes of the raw manifest keep fewer than ``minimum`` (0: no minimum)
    images, with their top removal reasons; None when every class keeps enough."""
    raw = Counter(row.class_name for row in outcome.rows)
    kept = Counter(record.class_name for record, _ in outcome.kept)
    short = [name for name in raw if kept[name] < minimum]
    if not short:
        return None
    described = []
    for name in short:
        removed = Counter(r.reason for r in outcome.removed if r.class_name == name)
        reasons = ", ".join(f"{reason} {n}" for reason, n in removed.most_common(3))
        described.append(f"{name}: kept {kept[name]} of {raw[name]} (removed: {reasons})")
    return f"clean.min_images_per_class is {minimum}, but " + "; ".join(described)


def read_raw_manifest(raw: Path) -> list[RawImage]:
    """The raw manifest's rows. Raises StageError naming the file (and row) when it is
    missing, not JSON lines, or a row lacks class/path or points outside ``raw``."""
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
    return [RawImage.from_row(row, raw) for row in rows]


def decide(
    cfg: CleanConfig,
    rows: list[RawImage],
    analyses: dict[str, Analysis],
    out: Path,
    pool: WorkerPool,
) -> Outcome:
    """Verdicts, quality flags and duplicate groups, from the per-image analyses."""
    records, removed = _decoded(rows, analyses)
    records = flag_all(records, FlagThresholds.from_config(cfg))
    candidates: list[ImageRecord] = []
    for record in records:
        dropping = tuple(sorted(set(record.flags) & set(cfg.drop_flags)))
        if dropping:
            detail = f"flagged {', '.join(dropping)}"
            removed.append(
                Removal(record.path, record.class_name, "quality", detail=detail, flags=dropping)
            )
        else:
            candidates.append(record)

    pairs, pass_counts = _matched_pairs(cfg, candidates, out, pool)
    grouping = resolve_groups(
        candidates,
        pairs,
        GroupPolicy(cfg.label_conflicts, cfg.near_duplicates, cfg.duplicate_groups),
    )
    removed += grouping.removals
    kept = [(candidates[i], grouping.group_of[i]) for i in grouping.kept]
    kept_keys = {record.raw.key for record, _ in kept}

    class_order = {name: n for n, name in enumerate(dict.fromkeys(r.class_name for r in rows))}
    kept.sort(key=lambda pair: (class_order[pair[0].class_name], pair[0].image.clean_path))
    removed.sort(key=lambda r: (class_order[r.class_name], r.path))
    return Outcome(
        rows=rows,
        kept=kept,
        removed=removed,
        issues=[(record, record.raw.key in kept_keys) for record in records],
        groups=sorted(grouping.groups, key=lambda g: g.group),
        pass_counts=pass_counts,
    )


def _decoded(
    rows: list[RawImage], analyses: dict[str, Analysis]
) -> tuple[list[ImageRecord], list[Removal]]:
    """Rows whose file decoded, and a Removal for each other row (the same raw file listed
    twice is analysed once, kept at most once)."""
    records: list[ImageRecord] = []
    removed: list[Removal] = []
    seen: set[str] = set()
    for row in rows:
        analysis = analyses[row.key]
        if row.key in seen:
            detail = "the raw manifest lists this file twice"
            removed.append(Removal(row.path, row.class_name, "exact_duplicate", detail=detail))
            continue
        seen.add(row.key)
        if analysis.image is None:
            removed.append(
                Removal(row.path, row.class_name, analysis.status, detail=analysis.detail)
            )
            continue
        records.append(ImageRecord(row, analysis.image))
    return records, removed


def _matched_pairs(
    cfg: CleanConfig, candidates: list[ImageRecord], out: Path, pool: WorkerPool
) -> tuple[MatchedPairs, dict[str, int]]:
    """Pairs (i < j) of candidates that show the same picture, and how many each pass found:
    exact pixels, then pHash, then (``second_pass``) ORB on pairs pHash left apart."""
    pairs = MatchedPairs()
    counts = {"exact_pairs": pairs.add_exact(candidates)}
    found, phash_counts = phash_pairs(candidates, cfg.near_dup_max_distance, cfg.near_dup_mirrored)
    for i, j, match in found:
        pairs.add(i, j, match)
    counts.update(phash_counts)
    if cfg.second_pass and len(candidates) > 1:
        # Imported here: pass 2's modules (faiss, SciPy's clustering) cost a run without it
        # a tenth of a second.
        from pipeline.clean.rounds import orb_pairs

        confirmed, orb_counts = orb_pairs(cfg, candidates, set(pairs.edges), out, pool)
        for i, j, match in confirmed:
            pairs.add(i, j, match)
        counts.update(orb_counts)
    return pairs, counts
