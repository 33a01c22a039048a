"""Per-image analysis of every raw row, resumable: the decode phase of the stage.

Consumes the raw manifest rows (``RawImage``) and ``DecodeSettings``. Produces one
``Analysis`` per distinct raw file (decoded by ``decode.analyse_image`` on the worker pool)
and keeps them in ``data/clean/.analysis.jsonl``: each result is appended as it finishes, with
the fingerprint of the settings that made it, so a killed or re-tuned run reuses every result
whose file (size, mtime) and fingerprint are unchanged and whose normalised copy still exists.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.clean.decode import EMBEDDING_SIDE, DecodeSettings, DecodeTask, analyse_image
from pipeline.clean.records import Analysis, RawImage
from pipeline.clean.workers import WorkerPool
from pipeline.files import append_jsonl, read_jsonl, write_jsonl
from pipeline.resume import fingerprint

ANALYSIS = ".analysis.jsonl"
# Bump when analyse_image gives another result for the same file and settings.
ANALYSIS_VERSION = 2


def analysis_fingerprint(settings: DecodeSettings) -> str:
    """What a cached Analysis was made with; an entry with another value is stale."""
    extra = {"embedding_side": EMBEDDING_SIDE, "version": ANALYSIS_VERSION}
    return fingerprint(asdict(settings), extra=extra, length=16)


def _cached(log: Path, fp: str) -> dict[str, Analysis]:
    """The log's entries made with fingerprint ``fp``, by key (a torn last line is ignored)."""
    cached: dict[str, Analysis] = {}
    if log.is_file():
        for entry in read_jsonl(log):
            if entry.get("fingerprint") != fp:
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
    for result in pool.map(analyse_image, list(tasks.values()), "clean: decode", unit="img"):
        # Appended as each image finishes so a killed run resumes from here.
        append_jsonl(log, result.to_json(fp))
        results[result.key] = result
    return results, reused


def compact_log(
    settings: DecodeSettings, out: Path, rows: list[RawImage], results: dict[str, Analysis]
) -> None:
    """Rewrite the log with this run's entries only (drops files no longer crawled)."""
    fp = analysis_fingerprint(settings)
    keys = dict.fromkeys(row.key for row in rows)
    write_jsonl(out / ANALYSIS, (results[key].to_json(fp) for key in keys))
