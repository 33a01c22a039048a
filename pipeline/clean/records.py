"""The typed rows that pass between clean's modules.

- ``RawImage``: one row of ``data/raw/manifest.jsonl`` (class, path, provenance) plus the key
  that names this version of the file in the analysis cache.
- ``Analysis``: what a worker found out about one raw file: ``status`` "ok" with a
  ``DecodedImage``, or a removal reason with its ``detail``.
- ``ImageRecord``: a raw row whose file decoded, with its quality flags; what dedupe and the
  output files work on.
- ``Match``: the evidence that two images show the same picture.
- ``Removal``: one row of ``removed.jsonl``.

Each knows its own JSON shape, so the files on disk keep their field names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PROVENANCE = ("url", "page_url", "source", "license", "attribution", "fetched_at")


@dataclass(frozen=True)
class RawImage:
    """One raw manifest row; ``key`` changes whenever the file on disk does."""

    class_name: str
    path: str  # relative to data/raw
    key: str
    provenance: tuple[tuple[str, Any], ...]  # (name, value) for each of PROVENANCE

    @classmethod
    def from_row(cls, row: dict[str, Any], raw: Path) -> RawImage:
        try:
            stat = (raw / row["path"]).stat()
            key = f"{row['class']}|{row['path']}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            key = f"{row['class']}|{row['path']}|missing"
        provenance = tuple((name, row.get(name)) for name in PROVENANCE)
        return cls(class_name=row["class"], path=row["path"], key=key, provenance=provenance)


@dataclass(frozen=True)
class QualityScores:
    """Scores behind the quality flags, measured on the normalised image."""

    brightness_p99: float
    brightness_p05: float
    entropy: float
    sharpness: float


@dataclass(frozen=True)
class DecodedImage:
    """A raw file that decoded and passed validation, as written to data/clean."""

    sha256: str  # of the decoded pixels (and their size)
    phash: str  # hex
    phash_mirror: str  # hex pHash of the horizontally mirrored image
    original_width: int  # after EXIF rotation, before shrinking
    original_height: int
    width: int  # of the file written to data/clean
    height: int
    frames: int
    clean_path: str  # relative to data/clean
    embedding: str  # base64 float16 grey thumbnail, for pass 2's neighbour search
    mirror_embedding: str
    scores: QualityScores


@dataclass(frozen=True)
class Analysis:
    """A worker's verdict on one raw file: ``image`` is set exactly when ``status`` is "ok"."""

    key: str
    status: str  # "ok" or a removal reason
    detail: str = ""
    image: DecodedImage | None = None

    def to_json(self, fingerprint: str) -> dict[str, Any]:
        """``asdict(self)`` plus the fingerprint, built field by field: ``asdict`` deep-copies
        every value and cost more than the JSON encoding of a log line."""
        image = None
        if self.image is not None:
            image = _fields(self.image)
            image["scores"] = _fields(self.image.scores)
        return {**_fields(self), "image": image, "fingerprint": fingerprint}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Analysis:
        """Raises KeyError/TypeError for an entry of another shape."""
        image = entry.get("image")
        if image is not None:
            scores = QualityScores(**image["scores"])
            image = DecodedImage(**{**image, "scores": scores})
        return cls(key=entry["key"], status=entry["status"], detail=entry["detail"], image=image)


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields, by name, shallow."""
    return {f.name: getattr(record, f.name) for f in fields(record)}


@dataclass(frozen=True)
class ImageRecord:
    """A raw row whose file decoded, with its quality flags."""

    raw: RawImage
    image: DecodedImage
    flags: tuple[str, ...] = ()

    @property
    def class_name(self) -> str:
        return self.raw.class_name

    @property
    def path(self) -> str:
        return self.raw.path

    @property
    def area(self) -> int:
        return self.image.original_width * self.image.original_height


@dataclass(frozen=True)
class Match:
    """Why two images are the same picture; ``method`` is exact, phash, phash_mirror or orb."""

    method: str
    distance: int | None = None  # Hamming distance of the pHashes (exact: 0)
    inliers: int | None = None  # orb: RANSAC inliers
    correlation: float | None = None  # orb: high-pass correlation once aligned
    mirrored: bool | None = None  # orb: matched against the mirrored image

    def to_json(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if value is not None}


EXACT = Match("exact", distance=0)


@dataclass(frozen=True)
class Removal:
    """One dropped raw file: a row of removed.jsonl (fields left None are not written)."""

    path: str
    class_name: str
    reason: str
    detail: str | None = None
    flags: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    group: str | None = None
    dup_of: str | None = None
    kept: str | None = None
    match: Match | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"path": self.path, "class": self.class_name, "reason": self.reason}
        for name in ("detail", "flags", "classes", "group", "dup_of", "kept"):
            value = getattr(self, name)
            if value is not None:
                row[name] = list(value) if isinstance(value, tuple) else value
        if self.match is not None:
            row.update(self.match.to_json())
        return row
