"""What the audit reads: the split CSVs joined to the clean manifest, and a person's review file.

Consumes ``data/split/{train,val,test}.csv`` (path relative to the CSV's folder, class, group),
``data/clean/manifest.jsonl`` (each kept image's path relative to data/clean and its sha256, the
hash of its decoded pixels) and the review CSV (``path, sha256, decision``). Produces, in memory,
one ``AuditImage`` per split row and one ``ReviewDecision`` per reviewed image, keyed by sha256 so
a decision survives a re-crawl that finds the same picture under another name or class.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import StageError
from pipeline.files import read_jsonl

SPLITS = ("train", "val", "test")
REVIEW_COLUMNS = ("path", "sha256", "decision")
REVIEW_DECISIONS = ("keep", "drop", "relabel:<class>")


@dataclass(frozen=True)
class SplitTable:
    """One split CSV exactly as written: its header and rows, rewritten by the audit."""

    name: str
    csv_path: Path
    fieldnames: tuple[str, ...]
    rows: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class AuditImage:
    """One row of a split CSV, joined to the clean manifest."""

    split: str
    index: int  # row number in its split CSV (0-based, header excluded)
    csv_path: str  # as written in the split CSV: relative to the CSV's own folder
    clean_path: str  # relative to data/clean, as in its manifest: <class>/<sha256>.<jpg|png>
    file: Path  # the image on disk
    sha256: str
    label: str
    group: str


@dataclass(frozen=True)
class ReviewDecision:
    """A person's decision on one image: keep it, drop it, or move it to ``new_class``."""

    sha256: str
    decision: str  # keep | drop | relabel
    new_class: str | None
    line: int  # where it is in the review file, for messages


def _clean_relative(path: Path, clean_dir: Path) -> str:
    return Path(os.path.relpath(os.path.normpath(path), os.path.normpath(clean_dir))).as_posix()


def read_split_tables(split_dir: Path) -> list[SplitTable]:
    """The three split CSVs. Raises StageError naming a missing CSV or one without path/class."""
    tables = []
    for name in SPLITS:
        csv_path = split_dir / f"{name}.csv"
        if not csv_path.is_file():
            raise StageError(f"{csv_path}: split file not found (run the split stage first)")
        with open(csv_path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fieldnames = tuple(reader.fieldnames or ())
            rows = tuple(reader)
        missing = [c for c in ("path", "class") if c not in fieldnames]
        if missing:
            raise StageError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        tables.append(SplitTable(name, csv_path, fieldnames, rows))
    return tables


def read_images(tables: list[SplitTable], clean_dir: Path) -> list[AuditImage]:
    """Every split row with its sha256 from ``clean_dir/manifest.jsonl``.

    Raises StageError naming the manifest when it is missing, and the CSV and line of a row whose
    image the manifest does not list.
    """
    manifest = clean_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise StageError(f"{manifest}: clean manifest not found (run the clean stage first)")
    try:
        sha_of = {str(r["path"]): str(r["sha256"]) for r in read_jsonl(manifest)}
    except (ValueError, KeyError) as exc:
        raise StageError(f"{manifest}: unreadable: {exc}") from None
    images = []
    for table in tables:
        for index, row in enumerate(table.rows):
            file = table.csv_path.parent / row["path"]
            clean_path = _clean_relative(file, clean_dir)
            if clean_path not in sha_of:
                raise StageError(
                    f"{table.csv_path}:{index + 2}: {row['path']} is not in {manifest}"
                )
            images.append(
                AuditImage(
                    split=table.name,
                    index=index,
                    csv_path=row["path"],
                    clean_path=clean_path,
                    file=file,
                    sha256=sha_of[clean_path],
                    label=row["class"],
                    group=row.get("group", "") or "",
                )
            )
    return images


def _parse_decision(text: str, classes: set[str], where: str) -> tuple[str, str | None]:
    decision = text.strip()
    if decision in ("keep", "drop"):
        return decision, None
    if decision.startswith("relabel:"):
        new_class = decision.removeprefix("relabel:").strip()
        if new_class not in classes:
            raise StageError(
                f"{where}: unknown class {new_class!r} in {decision!r} "
                f"(classes: {', '.join(sorted(classes))})"
            )
        return "relabel", new_class
    raise StageError(f"{where}: bad decision {decision!r} (use {', '.join(REVIEW_DECISIONS)})")


def _identify(
    row: dict[str, str],
    by_path: dict[str, str],
    known: set[str],
    folders: tuple[Path, Path],
    where: str,
) -> str:
    """The sha256 a review row names: its sha256 when known (the path may be stale after a
    re-crawl), else, when it gives no sha256, its path (relative to data/clean or to the audit
    folder, as in label_issues.csv)."""
    sha = (row.get("sha256") or "").strip().lower()
    if sha in known:
        return sha
    path = (row.get("path") or "").strip()
    audit_dir, clean_dir = folders
    for candidate in (path, _clean_relative(audit_dir / path, clean_dir)):
        if path and not sha and candidate in by_path:
            return by_path[candidate]
    named = f"sha256 {sha!r}" if sha else f"path {path!r}"
    raise StageError(f"{where}: unknown image: {named} is in none of the split CSVs")


def read_review(
    review: Path,
    images: list[AuditImage],
    class_names: list[str],
    audit_dir: Path,
    clean_dir: Path,
) -> dict[str, ReviewDecision]:
    """A person's decisions by sha256; a missing file means none.

    Raises StageError naming the file and line of a row with an unknown image, an unknown class,
    a bad decision, or a decision contradicting an earlier row for the same image.
    """
    if not review.is_file():
        return {}
    with open(review, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REVIEW_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise StageError(f"{review}:1: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    decisions: dict[str, ReviewDecision] = {}
    classes = set(class_names)
    by_path = {image.clean_path: image.sha256 for image in images}
    known = set(by_path.values())
    for line, row in enumerate(rows, start=2):
        where = f"{review}:{line}"
        sha = _identify(row, by_path, known, (audit_dir, clean_dir), where)
        decision, new_class = _parse_decision(row.get("decision") or "", classes, where)
        earlier = decisions.get(sha)
        if earlier and (earlier.decision, earlier.new_class) != (decision, new_class):
            raise StageError(
                f"{where}: contradicts line {earlier.line} for the same image (sha256 {sha})"
            )
        decisions[sha] = ReviewDecision(sha, decision, new_class, line)
    return decisions
