"""The review page's data: images the label audit flagged, and a person's decisions on them.

Consumes the audit stage's ``data/audit/label_issues.csv`` (columns path, class_given,
class_suggested, label_quality, ood_score, split, verdict; ``path`` relative to the CSV's folder
or to data/clean) and ``data/clean/manifest.jsonl`` (each clean image's sha256, the hash of its
decoded pixels that names the file). Produces the review CSV (``serve.review_csv``, default
``data/audit/review.csv``) with columns ``path, sha256, decision`` — decision ``keep``, ``drop``
or ``relabel:<class>`` — which the audit stage reads (``audit.review``). The sha256 is the clean
manifest's, so a decision survives a re-crawl that renames the file.

The review CSV is the only file written: one row per image (a new decision replaces the old),
rows for images no longer flagged kept as they were, every write atomic and serialised.
"""

from __future__ import annotations

import csv
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.files import read_jsonl, write_csv

ISSUE_COLUMNS = ("path", "class_given", "class_suggested", "label_quality", "ood_score", "split",
                 "verdict")  # fmt: skip
REVIEW_COLUMNS = ["path", "sha256", "decision"]


class ReviewError(ValueError):
    """A review request or file the app cannot use; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class FlaggedImage:
    """One row of label_issues.csv, with its file and sha256 resolved (None/"" if unknown)."""

    id: int  # row number in label_issues.csv (0-based)
    path: str  # as written in label_issues.csv: the key of the review CSV
    class_given: str
    class_suggested: str
    label_quality: str
    ood_score: str
    split: str
    verdict: str
    sha256: str
    file: Path | None


class ReviewStore:
    """Reads the flagged images and reads/writes the review CSV."""

    def __init__(self, audit_csv: Path, review_csv: Path, clean_dir: Path) -> None:
        self.audit_csv = Path(audit_csv)
        self.review_csv = Path(review_csv)
        self.clean_dir = Path(clean_dir)
        self._lock = threading.Lock()

    def _sha_by_clean_path(self) -> dict[str, str]:
        manifest = self.clean_dir / "manifest.jsonl"
        if not manifest.is_file():
            return {}
        return {str(r.get("path")): str(r.get("sha256", "")) for r in read_jsonl(manifest)}

    def _resolve(self, path: str) -> Path | None:
        for candidate in (self.audit_csv.parent / path, self.clean_dir / path):
            if candidate.is_file():
                return candidate
        return None

    def flagged(self) -> list[FlaggedImage]:
        """Every row of label_issues.csv. Raises ReviewError(404) when the file is missing,
        (422) when it lacks a column."""
        if not self.audit_csv.is_file():
            raise ReviewError(
                404,
                f"{self.audit_csv} not found: no label audit yet (run `python -m pipeline audit`, "
                "then reload this page)",
            )
        with open(self.audit_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in ISSUE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ReviewError(422, f"{self.audit_csv}: missing column(s) {', '.join(missing)}")
            rows = list(reader)
        shas = self._sha_by_clean_path()
        images = []
        for index, row in enumerate(rows):
            file = self._resolve(row["path"])
            clean_path = _relative_to(file, self.clean_dir) if file else None
            fields = (row[c] or "" for c in ISSUE_COLUMNS)
            sha256 = shas.get(clean_path or "", "")
            images.append(FlaggedImage(index, *fields, sha256=sha256, file=file))
        return images

    def _read_review(self) -> tuple[list[str], list[dict[str, str]]]:
        if not self.review_csv.is_file():
            return list(REVIEW_COLUMNS), []
        with open(self.review_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or [])
            rows = list(reader)
        missing = [c for c in ("path", "decision") if c not in fields]
        if missing:
            raise ReviewError(
                409, f"{self.review_csv}: missing column(s) {', '.join(missing)}; fix or move it"
            )
        return fields + [c for c in REVIEW_COLUMNS if c not in fields], rows

    def decisions(self) -> dict[str, str]:
        """path → decision, for every row of the review CSV."""
        return {row["path"]: row["decision"] for row in self._read_review()[1]}

    def listing(self, class_names: list[str]) -> dict[str, Any]:
        """What the review page shows: flagged images grouped by given class, with decisions."""
        images = self.flagged()
        decided = self.decisions()
        classes = sorted({*class_names, *(i.class_given for i in images if i.class_given)})
        groups: dict[str, list[dict[str, Any]]] = {}
        for image in images:
            item = {k: v for k, v in asdict(image).items() if k != "file"}
            item |= {"decision": decided.get(image.path, ""), "has_file": image.file is not None}
            groups.setdefault(image.class_given, []).append(item)
        return {
            "available": True,
            "audit_csv": str(self.audit_csv),
            "review_csv": str(self.review_csv),
            "classes": classes,
            "groups": [{"class": name, "images": groups[name]} for name in sorted(groups)],
        }

    def image(self, image_id: int, path: str | None = None) -> FlaggedImage:
        """The flagged image ``image_id``; ReviewError(404) if there is none, (409) if its path
        is not ``path`` (label_issues.csv changed since the page loaded)."""
        images = self.flagged()
        if not 0 <= image_id < len(images):
            raise ReviewError(404, f"no flagged image {image_id} in {self.audit_csv}")
        image = images[image_id]
        if path is not None and image.path != path:
            raise ReviewError(
                409, f"{self.audit_csv} changed since the page loaded (reload the page)"
            )
        return image

    def decide(
        self, image_id: int, path: str, decision: str, class_names: list[str]
    ) -> dict[str, str]:
        """Record ``decision`` for a flagged image, replacing any earlier one; ``""`` removes
        it. Returns the row written. Raises ReviewError(422) for a bad decision."""
        image = self.image(image_id, path)
        classes = set(class_names) | {i.class_given for i in self.flagged() if i.class_given}
        _check_decision(decision, classes)
        row = {"path": image.path, "sha256": image.sha256, "decision": decision}
        with self._lock:
            fields, rows = self._read_review()
            kept = [r for r in rows if not _same_image(r, image)]
            if decision:
                kept.append(row)
            write_csv(self.review_csv, kept, fields)
        return row


def _relative_to(file: Path, folder: Path) -> str:
    return Path(os.path.relpath(os.path.normpath(file), os.path.normpath(folder))).as_posix()


def _same_image(row: dict[str, str], image: FlaggedImage) -> bool:
    sha = (row.get("sha256") or "").strip().lower()
    return row.get("path") == image.path or bool(sha and sha == image.sha256)


def _check_decision(decision: str, classes: set[str]) -> None:
    if decision in ("", "keep", "drop"):
        return
    if decision.startswith("relabel:"):
        new_class = decision.removeprefix("relabel:")
        if new_class in classes:
            return
        raise ReviewError(
            422, f"relabel: unknown class {new_class!r} (classes: {', '.join(sorted(classes))})"
        )
    raise ReviewError(422, f"decision must be keep, drop or relabel:<class>, got {decision!r}")
