"""The one place stages write to disk: atomic writes (temp file + rename) and manifests.

A stage killed at any instant leaves every file either complete or absent, never half written,
so a rerun can trust what it finds.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


def _create_temp(directory: Path, prefix: str, suffix: str) -> Path:
    """Create an empty, new temp file in ``directory``. Mode 0o666 filtered by the process's
    umask, as open() would give (mkstemp's 0600 would need the umask, which can only be read by
    changing it process-wide)."""
    for _ in range(100):
        candidate = directory / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"{directory}: could not create a unique temp file for {prefix}")


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success rename it onto ``path``, else delete it.

    For writers that want a filename (``model.save``, ``fig.savefig``, ``np.save``). ``suffix``
    defaults to the target's own, so libraries that pick a format by extension still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    tmp = _create_temp(path.parent, f".{path.name}.", suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced temp file, then rename). Returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically."""
    return atomic_write_text(path, "".join(json_line(r) + "\n" for r in rows))


def json_line(row: Mapping[str, Any]) -> str:
    """One row as a JSON line (without its newline), keys sorted, as write_jsonl writes it."""
    return json.dumps(dict(row), sort_keys=True, default=str)


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    """Read JSON lines; a torn last line (a writer killed mid-append) is ignored.

    Raises ValueError naming the file and line for corruption anywhere else.
    """
    path = Path(path)
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
    return rows


def append_jsonl(path: Path | str, row: Mapping[str, Any]) -> None:
    """Append one row and fsync: used for logs that must survive a kill (crawl state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(row), sort_keys=True, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_csv(path: Path | str, rows: Iterable[Mapping[str, Any]], fieldnames: list[str]) -> Path:
    """Write rows as CSV with a header, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path


def read_csv(path: Path | str) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
