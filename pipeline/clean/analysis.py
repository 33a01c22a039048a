"""Per-image analysis of every raw row, resumable: the decode phase of the stage.

Consumes the raw manifest rows (``RawImage``) and ``DecodeSettings``. Produces one
``Analysis`` per distinct raw file (decoded by ``decode.analyse_image`` on the worker pool)
and keeps them in ``data/clean/.analysis.jsonl``: each batch's results are appended (one
fsync per batch, after its normalised copies exist) as it finishes, with the fingerprint of
the settings that made it, so a killed or re-tuned run reuses every result
whose file (size, mtime) and fingerprint are unchanged and whose normalised copy still exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from pipeline.clean.decode import DecodeSettings, DecodeTask, analyse_batch
from pipeline.clean.embed import CENTRE, EMBEDDING_SIDE, VIEWS
from pipeline.clean.records import Analysis, RawImage
from pipeline.clean.workers import WorkerPool
from pipeline.files import json_line, write_jsonl
from pipeline.resume import fingerprint

ANALYSIS = ".analysis.jsonl"
# Bump when analyse_image gives another result for the same file and settings.
ANALYSIS_VERSION = 4
# Images per worker task: per-task overhead (pickling, a log fsync) was most of the cost of a
# 28 px image, while a few tasks per worker still balance the load.
MAX_BATCH = 64


def analysis_fingerprint(settings: DecodeSettings) -> str:
    """What a cached Analysis was made with; an entry with another value is stale."""
    extra = {
        "embedding_side": EMBEDDING_SIDE,
        "views": VIEWS,
        "centre": CENTRE,
        "version": ANALYSIS_VERSION,
    }
    return fingerprint(asdict(settings), extra=extra, length=16)


def _cached(log: Path, fp: str) -> dict[str, Analysis]:
    """The log's entries made with fingerprint ``fp``, by key. A line torn by a kill, even one
    a later run appended after, is skipped: the log is a cache, that file is analysed again."""
    cached: dict[str, Analysis] = {}
    if not log.is_file():
        return cached
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or entry.get("fingerprint") != fp:
            continue
        try:
            cached[entry["key"]] = Analysis.from_json(entry)
        except (KeyError, TypeError):
            continue  # an entry of another shape: analyse that file again
    return cached


def analyse_all(
    settings: DecodeSettings, raw: Path, out: Path, rows: list[RawImage], pool: WorkerPool
) -> tuple[dict[str, Analysis], int]:
    """Analyse every raw row, reusing results of a previous (possibly killed) run.

    Returns ({row key: Analysis}, number reused).
    """
    fp = analysis_fingerprint(settings)
    log = out / ANALYSIS
    cached = _cached(log, fp)
    results: dict[str, Analysis] = {}
    tasks: dict[str, DecodeTask] = {}  # by key: a file listed twice is analysed once
    for row in rows:
        previous = cached.get(row.key)
        if previous is not None and (
            previous.image is None or (out / previous.image.clean_path).is_file()
        ):
            results[row.key] = previous
            continue
        tasks[row.key] = DecodeTask(row.key, raw / row.path, row.class_name, out, settings)
    reused = len(results)
    out.mkdir(parents=True, exist_ok=True)
    pending = list(tasks.values())
    size = max(1, min(MAX_BATCH, len(pending) // (4 * max(pool.workers, 1))))
    batches = [tuple(pending[start : start + size]) for start in range(0, len(pending), size)]
    for batch in pool.map(analyse_batch, batches, "clean: decode", unit="batch"):
        # Appended as each batch finishes (its copies are on disk) so a killed run resumes here.
        append_log(log, [result.to_json(fp) for result in batch])
        for result in batch:
            results[result.key] = result
    return results, reused


def append_log(log: Path, entries: list[dict]) -> None:
    """Append JSON lines with one fsync; a kill mid-write leaves a torn last line, ignored."""
    append_lines(log, [json_line(entry) for entry in entries])


def append_lines(log: Path, lines: list[str]) -> None:
    """``append_log`` of lines already encoded (``files.json_line``)."""
    with open(log, "a+", encoding="utf-8") as fh:
        if fh.tell() > 0:
            fh.seek(fh.tell() - 1)
            if fh.read(1) != "\n":
                fh.write("\n")  # end a line torn by a kill, so it stays one bad line
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def compact_log(
    settings: DecodeSettings, out: Path, rows: list[RawImage], results: dict[str, Analysis]
) -> None:
    """Rewrite the log with this run's entries only (drops files no longer crawled)."""
    fp = analysis_fingerprint(settings)
    keys = dict.fromkeys(row.key for row in rows)
    write_jsonl(out / ANALYSIS, (results[key].to_json(fp) for key in keys))
