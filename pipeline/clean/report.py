"""The clean stage's files: what was kept, what was removed and why, and the report.

Consumes the decisions (kept ``ImageRecord``s with their group ids, ``Removal``s,
``DuplicateGroup``s, per-pass pair counts). Produces, under data/clean, ``manifest.jsonl``,
``removed.jsonl``, ``groups.jsonl`` and ``issues.csv``; beside the report,
``clean_report.json`` (a DVC metric: counts per class and reason) and
``clean_duplicates.png`` (a DVC plot); ``prune`` deletes normalised images no manifest row
names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from pipeline.clean.decode import strict_pillow, to_rgb
from pipeline.clean.grouping import DuplicateGroup
from pipeline.clean.records import ImageRecord, RawImage, Removal
from pipeline.files import atomic_path, write_csv, write_jsonl

MANIFEST = "manifest.jsonl"
REMOVED = "removed.jsonl"
GROUPS = "groups.jsonl"
ISSUES = "issues.csv"
DUPLICATE_SHEET = "clean_duplicates.png"  # beside the report: a DVC plot

ISSUE_COLUMNS = [
    "raw_path",
    "class",
    "sha256",
    "width",
    "height",
    "brightness_p99",
    "brightness_p05",
    "entropy",
    "sharpness",
    "aspect_ratio",
    "flags",
    "kept",
]


@dataclass(frozen=True)
class Outcome:
    """Everything the files are written from."""

    rows: list[RawImage]  # the raw manifest, in order
    kept: list[tuple[ImageRecord, str]]  # (record, group id), in manifest order
    removed: list[Removal]  # in manifest order
    issues: list[tuple[ImageRecord, bool]]  # every decoded image, and whether it was kept
    groups: list[DuplicateGroup]  # sorted by group id
    pass_counts: dict[str, int]


def write_outputs(out: Path, outcome: Outcome) -> None:
    """manifest.jsonl, removed.jsonl, groups.jsonl and issues.csv."""
    write_jsonl(out / MANIFEST, [manifest_row(r, group) for r, group in outcome.kept])
    write_jsonl(out / REMOVED, [r.to_json() for r in outcome.removed])
    write_jsonl(out / GROUPS, [g.to_json() for g in outcome.groups])
    write_csv(out / ISSUES, [issue_row(r, kept) for r, kept in outcome.issues], ISSUE_COLUMNS)


def manifest_row(record: ImageRecord, group: str) -> dict[str, Any]:
    image = record.image
    row = {
        "path": image.clean_path,
        "class": record.class_name,
        "sha256": image.sha256,
        "phash": image.phash,
        "width": image.width,
        "height": image.height,
        "group": group,
        "raw_path": record.path,
        "flags": list(record.flags),
    }
    row.update(record.raw.provenance)
    return row


def issue_row(record: ImageRecord, kept: bool) -> dict[str, Any]:
    image, scores = record.image, record.image.scores
    width, height = image.original_width, image.original_height
    return {
        "raw_path": record.path,
        "class": record.class_name,
        "sha256": image.sha256,
        "width": width,
        "height": height,
        "brightness_p99": scores.brightness_p99,
        "brightness_p05": scores.brightness_p05,
        "entropy": scores.entropy,
        "sharpness": scores.sharpness,
        "aspect_ratio": round(max(width, height) / min(width, height), 3),
        "flags": ";".join(record.flags),
        "kept": kept,
    }


def report_json(outcome: Outcome) -> dict[str, Any]:
    """clean_report.json: totals, then the same counts per class."""
    rows, removed = outcome.rows, outcome.removed
    kept = [record for record, _ in outcome.kept]
    flagged = [record for record, _ in outcome.issues]
    per_class: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.class_name for r in rows):
        per_class[name] = {
            "raw": sum(1 for r in rows if r.class_name == name),
            "kept": sum(1 for r in kept if r.class_name == name),
            "removed": dict(Counter(r.reason for r in removed if r.class_name == name)),
            "flagged": dict(Counter(f for r in flagged if r.class_name == name for f in r.flags)),
        }
    return {
        "raw": len(rows),
        "kept": len(kept),
        "removed": len(removed),
        "removed_by_reason": dict(Counter(r.reason for r in removed)),
        "flagged": dict(Counter(f for r in flagged for f in r.flags)),
        "groups": len(outcome.groups),
        "label_conflict_groups": sum(1 for g in outcome.groups if g.label_conflict),
        "passes": outcome.pass_counts,
        "per_class": per_class,
    }


def prune(out: Path, kept_paths: set[str]) -> None:
    """Delete normalised images that are not in the manifest (dropped or from older runs)."""
    for class_dir in out.iterdir():
        if not class_dir.is_dir() or class_dir.name.startswith("."):
            continue
        for path in class_dir.iterdir():
            if path.is_file() and f"{class_dir.name}/{path.name}" not in kept_paths:
                path.unlink()
        if not any(class_dir.iterdir()):
            class_dir.rmdir()


def write_duplicate_sheet(
    path: Path, raw: Path, groups: Sequence[DuplicateGroup], max_groups: int = 12
) -> None:
    """A PNG with one row per duplicate group (largest first): kept images framed green,
    dropped ones red, each captioned with how it was matched (a note when there are none:
    DVC expects every declared plot to exist).
    """
    # The raw images passed clean.max_image_pixels, which may be above Pillow's own limit.
    with strict_pillow():
        sheet = _draw_sheet(raw, groups, max_groups) if groups else _no_groups_note()
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def _no_groups_note() -> Image.Image:
    sheet = Image.new("RGB", (320, 40), "white")
    ImageDraw.Draw(sheet).text((8, 14), "no duplicate groups found", fill=(0, 0, 0))
    return sheet


def _draw_sheet(raw: Path, groups: Sequence[DuplicateGroup], max_groups: int) -> Image.Image:
    tile, columns = 96, 6
    shown = sorted(groups, key=lambda g: (-len(g.members), g.group))[:max_groups]
    sheet = Image.new("RGB", (columns * (tile + 8) + 8, len(shown) * (tile + 22) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for row, group in enumerate(shown):
        method: dict[str, str] = {}
        for edge in group.edges:
            method.setdefault(edge.b, edge.match.method)
            method.setdefault(edge.a, edge.match.method)
        for column, member in enumerate(group.members[:columns]):
            x, y = 8 + column * (tile + 8), 8 + row * (tile + 22)
            try:
                with Image.open(raw / member.path) as image:
                    thumb = to_rgb(ImageOps.exif_transpose(image))
            except (OSError, ValueError):
                continue
            thumb = ImageOps.contain(thumb, (tile, tile), Image.Resampling.NEAREST)
            sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - thumb.height) // 2))
            colour = (0, 160, 0) if member.kept else (200, 0, 0)
            draw.rectangle((x - 2, y - 2, x + tile + 1, y + tile + 1), outline=colour, width=2)
            caption = f"{member.class_name[:9]}: {method.get(member.path, '')}"
            draw.text((x, y + tile + 4), caption, fill=(0, 0, 0))
    return sheet
