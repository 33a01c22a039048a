"""One way to resume: saved work is reused only when its fingerprint still matches.

Every stage that keeps work between runs (crawl state, clean's per-image analyses, split's last
assignment, augment's offline copies, training's backup, the transfer feature cache) decides
"reuse or start over" the same way:

1. ``fingerprint(config, exclude=..., files=..., extra=...)`` hashes what makes the saved work
   valid: the config model (minus the fields that only change how a run looks, e.g. ``verbose``),
   the bytes of its input files, and anything else named in ``extra``.
2. ``reuse_or_wipe(marker, fp, wipe)`` compares it with the fingerprint recorded in ``marker`` (a
   small JSON file a person can read). Same: the work is reused. Different or missing: ``wipe()``
   removes the stale work, the new fingerprint is recorded, and the stage starts over.

Per-entry caches (clean's analysis log) store ``fingerprint(...)`` beside each entry instead and
ignore entries whose fingerprint differs.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipeline.files import atomic_write_json


class Resume(enum.Enum):
    """What ``reuse_or_wipe`` decided."""

    REUSE = "reuse"  # the marker matched: keep the saved work
    FRESH = "fresh"  # no marker: nothing was saved before
    WIPED = "wiped"  # the marker recorded another fingerprint: the saved work was removed

    @property
    def reused(self) -> bool:
        return self is Resume.REUSE


def _jsonable(config: BaseModel | Mapping[str, Any] | None, exclude: Iterable[str]) -> Any:
    skip = set(exclude)
    if config is None:
        return None
    if isinstance(config, BaseModel):
        return config.model_dump(mode="json", exclude=skip)
    return {key: value for key, value in config.items() if key not in skip}


def fingerprint(
    config: BaseModel | Mapping[str, Any] | None = None,
    *,
    exclude: Iterable[str] = (),
    files: Iterable[Path] = (),
    extra: Mapping[str, Any] | None = None,
    length: int = 64,
) -> str:
    """Hex sha256 of ``config`` (minus ``exclude``), the bytes of ``files`` and ``extra``.

    ``files`` are hashed by content in the order given; a missing file hashes as absent rather
    than raising, so "the input is gone" is just another fingerprint. Returns the first
    ``length`` hex digits.
    """
    digest = hashlib.sha256()
    payload = {"config": _jsonable(config, exclude), "extra": dict(extra or {})}
    digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
    for path in files:
        path = Path(path)
        digest.update(b"\0file\0" + path.name.encode())
        if path.is_file():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(b"\0absent\0")
    return digest.hexdigest()[:length]


def recorded_fingerprint(marker: Path) -> str | None:
    """The fingerprint recorded in ``marker``, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = data.get("fingerprint") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def record(marker: Path, fp: str, described: Mapping[str, Any] | None = None) -> None:
    """Write ``fp`` (and, for a reader, what it was made from) to ``marker`` atomically."""
    body: dict[str, Any] = {"fingerprint": fp}
    if described:
        body["made_from"] = dict(described)
    atomic_write_json(marker, body)


def reuse_or_wipe(
    marker: Path,
    fp: str,
    wipe: Callable[[], None],
    described: Mapping[str, Any] | None = None,
) -> Resume:
    """Reuse saved work if ``marker`` records ``fp``; otherwise ``wipe()`` it and record ``fp``.

    ``described`` (e.g. the config dump) is written beside the fingerprint so a person can see
    what the saved work was made with. Returns the decision.
    """
    previous = recorded_fingerprint(marker)
    if previous == fp:
        return Resume.REUSE
    existed = Path(marker).exists()
    wipe()
    record(marker, fp, described)
    return Resume.WIPED if existed else Resume.FRESH
