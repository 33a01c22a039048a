"""Pass 2's verdicts, kept between runs: a rerun verifies only the pairs it has not judged.

Consumes the candidate pairs pass 2 is about to verify, each named by its two images' pixel
sha256 (first and second, as verified: the check is not symmetric) and the way round it is
compared, and a fingerprint of everything that judges them: the per-image analysis settings
(``analysis_fingerprint``), ``VerifySettings`` and ``VERDICT_VERSION``. Produces
``data/clean/.verdicts.jsonl``: one line per judged pair, its ``Match`` or null (not one
picture), appended after each round of verification with one fsync, so a killed run keeps
what it judged. At the end of a run the log is rewritten with the verdicts that run used
(pairs of images no longer crawled, or made with other settings, drop out).

Why: the per-image analysis was already never redone on a rerun, but pass 2 was, and it is
most of the stage's cost (a rerun of the 1,500 throughput photos: 30+ CPU-s of 31). A weekly
re-crawl that adds a few images now verifies only the pairs that involve them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.clean.analysis import append_lines
from pipeline.clean.records import Match
from pipeline.files import atomic_write_text, json_line
from pipeline.resume import fingerprint

VERDICTS = ".verdicts.jsonl"
# Bump when verify.py or aligned.py judge a pair differently for the same images and settings.
VERDICT_VERSION = 3

Key = tuple[str, str, bool]  # first image's sha256, second's, compared mirrored first


def verdict_fingerprint(analysis: str, settings: dict[str, Any]) -> str:
    """What the verdicts were made with; a log entry with another value is stale."""
    return fingerprint(
        settings, extra={"analysis": analysis, "version": VERDICT_VERSION}, length=16
    )


class VerdictLog:
    """The verdicts of earlier runs made with ``fp`` (read once), and this run's."""

    def __init__(self, out: Path, fp: str) -> None:
        self.path = out / VERDICTS
        self.fp = fp
        self._known: dict[Key, Match | None] = {}
        self._used: dict[Key, Match | None] = {}
        # Each verdict's log line, encoded once: compact writes the lines again.
        self._lines: dict[Key, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                entry = _entry(line, fp)
                if entry is not None:
                    self._known[entry[0]] = entry[1]
                    self._lines[entry[0]] = line

    def get(self, key: Key) -> tuple[bool, Match | None]:
        """(known, verdict): the earlier run's verdict of ``key`` if there is one."""
        if key in self._known:
            self._used[key] = self._known[key]
            return True, self._known[key]
        return False, None

    def add(self, verdicts: Iterable[tuple[Key, Match | None]]) -> None:
        """Record this round's verdicts, appended to the log at once."""
        lines = []
        for key, match in verdicts:
            self._known[key] = self._used[key] = match
            self._lines[key] = json_line(_to_json(key, match, self.fp))
            lines.append(self._lines[key])
        if lines:
            append_lines(self.path, lines)

    def compact(self) -> None:
        """Rewrite the log with the verdicts this run used or made, sorted: a rerun that judges
        nothing new writes the same bytes, so DVC sees data/clean unchanged."""
        atomic_write_text(self.path, "".join(self._lines[key] + "\n" for key in sorted(self._used)))


def _to_json(key: Key, match: Match | None, fp: str) -> dict[str, Any]:
    first, second, mirrored = key
    return {
        "a": first,
        "b": second,
        "mirrored_first": mirrored,
        "match": None if match is None else match.to_json(),
        "fingerprint": fp,
    }


def _entry(line: str, fp: str) -> tuple[Key, Match | None] | None:
    """A log line's (key, verdict); None for a line torn by a kill, of another shape or made
    with another fingerprint (the log is a cache: that pair is verified again)."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict) or entry.get("fingerprint") != fp:
            return None
        key = (str(entry["a"]), str(entry["b"]), bool(entry["mirrored_first"]))
        match = entry["match"]
        return key, None if match is None else Match(**match)
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
