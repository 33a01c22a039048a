"""The crawl's resume state on disk, under ``<out>/.state``.

    pages-<shard>.jsonl      one row per HTML page or API page fetched (or failed)
    candidates/<class>.json  the class's ordered candidate list once discovery finished
    walks/<class>.json       the class's unfinished refresh walk, if any (resumed on rerun)
    fetch-<shard>.jsonl      one row per image fetch outcome (saved or failed, with reason)
    demo_site.json           the fingerprint of the demo site the state was made from

Consumes what discovery and fetching record; produces, on every start, what earlier runs did
(so nothing recorded as done is asked for again). A finished refresh walk keeps only the page
rows whose answer changed, so a refresh that finds nothing new leaves every file as it was
(data/raw is a DVC output: any changed byte reruns clean and makes a new dvc.lock commit).
Rows are typed (PageRecord, FetchRecord, Candidate); the files keep the JSON rows they always
had.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.crawl.politeness import ROBOTS_TTL_S
from pipeline.crawl.sources.pages import PageItem
from pipeline.files import atomic_write_json, atomic_write_text, read_jsonl
from pipeline.resume import fingerprint, reuse_or_wipe


@dataclass(frozen=True)
class Candidate:
    """An image URL a source proposes for a class, with what is known about it."""

    class_name: str
    url: str  # stored form: the demo site's base URL is written as "{demo}"
    page_url: str
    source: str
    license: str
    attribution: str
    order: tuple[int, ...]  # position in the class's deterministic candidate order

    def to_row(self) -> dict[str, Any]:
        return {
            "class": self.class_name,
            "url": self.url,
            "page_url": self.page_url,
            "source": self.source,
            "license": self.license,
            "attribution": self.attribution,
            "order": list(self.order),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Candidate:
        return cls(
            class_name=row["class"],
            url=row["url"],
            page_url=row["page_url"],
            source=row["source"],
            license=row["license"],
            attribution=row["attribution"],
            order=tuple(row["order"]),
        )


@dataclass(frozen=True)
class PageRecord:
    """What fetching one HTML page (``items``) or one API page (``payload``) came to."""

    key: str  # stored URL
    ok: bool
    reason: str
    status: int | None
    items: tuple[PageItem, ...] | None = None  # set for HTML pages (empty if failed)
    payload: dict[str, Any] | None = None  # an API page's answer (None if failed)
    walk: str | None = None  # the refresh walk that recorded it
    time: float = 0.0

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "key": self.key,
            "ok": self.ok,
            "reason": self.reason,
            "status": self.status,
            "time": self.time,
        }
        if self.items is not None:
            row["items"] = [item.to_row() for item in self.items]
        else:
            row["payload"] = self.payload
        if self.walk:
            row["walk"] = self.walk
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> PageRecord:
        items = None
        if "items" in row:
            items = tuple(PageItem.from_row(item) for item in row["items"])
        return cls(
            key=row["key"],
            ok=row["ok"],
            reason=row.get("reason", ""),
            status=row.get("status"),
            items=items,
            payload=row.get("payload"),
            walk=row.get("walk"),
            time=row.get("time", 0.0),
        )


@dataclass(frozen=True)
class SavedImage:
    """An image written to ``<out>/<path>``."""

    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    path: str  # <class>/<sha256>.<ext>, relative to the crawl's output folder


@dataclass(frozen=True)
class FetchRecord:
    """What fetching one candidate came to: a saved image or a failure reason."""

    class_name: str
    url: str  # stored form
    reason: str  # "" when saved; else "kind" or "kind: what came back"
    status: int | None
    fetched_at: str
    image: SavedImage | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "class": self.class_name,
            "url": self.url,
            "ok": self.ok,
            "reason": self.reason,
            "status": self.status,
            "fetched_at": self.fetched_at,
        }
        if self.image is not None:
            row |= asdict(self.image)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> FetchRecord:
        image = None
        if row["ok"]:
            image = SavedImage(
                row["content_type"],
                row["bytes"],
                row["width"],
                row["height"],
                row["sha256"],
                row["path"],
            )
        return cls(row["class"], row["url"], row["reason"], row["status"], row["fetched_at"], image)


class StateLog:
    """An append-only JSON-lines log that survives a kill at any instant, at disk speed.

    Each row is written and flushed to the OS at once, so SIGKILL loses nothing; fsync, which
    only matters if the machine itself goes down (the rows since are then fetched again), runs
    at most every ``sync_every_s``. ``files.append_jsonl`` fsyncs every row: about 7 ms here,
    which capped a crawl at ~50 images/s (``bench/crawl_throughput.py --state-log`` measures it).
    """

    def __init__(self, path: Path, sync_every_s: float = 1.0) -> None:
        self.path = path
        self.sync_every_s = sync_every_s
        self._file: io.TextIOWrapper | None = None
        self._synced = time.monotonic()

    def _open(self) -> io.TextIOWrapper:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a kill mid-write leaves a torn last line: cut it off before appending after it
        with open(self.path, "ab+") as raw:
            raw.seek(0, io.SEEK_END)
            size = raw.tell()
            if size:
                raw.seek(max(0, size - 65536))
                tail = raw.read()
                if not tail.endswith(b"\n"):
                    cut = tail.rfind(b"\n")
                    raw.truncate(size - len(tail) + cut + 1 if cut >= 0 else 0)
        return open(self.path, "a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
        self._file.flush()
        if time.monotonic() - self._synced >= self.sync_every_s:
            os.fsync(self._file.fileno())
            self._synced = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class State:
    """The crawl state under ``<out>/.state``: append-only logs, read back on every start."""

    def __init__(self, out: Path, shard_id: str) -> None:
        self.dir = out / ".state"
        self.shard_id = shard_id
        self.pages: dict[str, PageRecord] = {}
        self.fetches: dict[tuple[str, str], FetchRecord] = {}
        for log in sorted(self.dir.glob("pages-*.jsonl")):
            for row in read_jsonl(log):
                # a page walked again by a refresh has several rows: the newest one counts
                page = PageRecord.from_row(row)
                known = self.pages.get(page.key)
                if known is None or page.time >= known.time:
                    self.pages[page.key] = page
        for log in sorted(self.dir.glob("fetch-*.jsonl")):
            for row in read_jsonl(log):
                fetch = FetchRecord.from_row(row)
                key = (fetch.class_name, fetch.url)
                if key not in self.fetches or (fetch.ok and not self.fetches[key].ok):
                    self.fetches[key] = fetch
        self._page_log = StateLog(self.dir / f"pages-{shard_id}.jsonl")
        self._fetch_log = StateLog(self.dir / f"fetch-{shard_id}.jsonl")

    def record_page(self, page: PageRecord) -> None:
        self.pages[page.key] = page
        self._page_log.append(page.to_row())

    def record_fetch(self, fetch: FetchRecord) -> None:
        self.fetches[(fetch.class_name, fetch.url)] = fetch
        self._fetch_log.append(fetch.to_row())

    def close(self) -> None:
        self._page_log.close()
        self._fetch_log.close()

    def keep_changed_pages(self, walks: set[str]) -> None:
        """Drop the rows refresh ``walks`` recorded for pages (and API pages) that answered
        exactly as their newest earlier row says; those rows stay the newest again.

        The walk's rows are appended while it runs, so a killed refresh resumes it; once it
        has finished, a page that did not change needs no second row. Lines are kept byte for
        byte and a log left empty is removed, so an all-unchanged walk leaves the logs as they
        were before it.
        """
        self._page_log.close()
        logs = {log: _lines(log) for log in sorted(self.dir.glob("pages-*.jsonl"))}
        before: dict[str, PageRecord] = {}
        for lines in logs.values():
            for _, page in lines:
                known = before.get(page.key)
                if page.walk not in walks and (known is None or page.time >= known.time):
                    before[page.key] = page
        for log, lines in logs.items():
            kept = [line for line, page in lines if not _unchanged(page, before, walks)]
            if len(kept) == len(lines):
                continue
            if kept:
                atomic_write_text(log, "".join(kept))
            else:
                log.unlink()
        for key, page in self.pages.items():
            if _unchanged(page, before, walks):
                self.pages[key] = before[key]

    def candidates_path(self, class_name: str) -> Path:
        return self.dir / "candidates" / f"{class_name}.json"

    def load_candidates(self, class_name: str, fp: str) -> list[Candidate] | None:
        """The class's finished candidate list, if one was saved with fingerprint ``fp``."""
        path = self.candidates_path(class_name)
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fp:
            return None
        return [Candidate.from_row(row) for row in data["candidates"]]

    def save_candidates(self, class_name: str, fp: str, found: list[Candidate]) -> None:
        atomic_write_json(
            self.candidates_path(class_name),
            {"fingerprint": fp, "candidates": [c.to_row() for c in found]},
        )

    def walk_path(self, class_name: str) -> Path:
        return self.dir / "walks" / f"{class_name}.json"

    def begin_walk(self, class_name: str, fp: str, new_walk: str) -> str:
        """Return the id of the class's refresh walk: an unfinished one (same params, younger
        than a day) is resumed, so its pages are not fetched again; else ``new_walk`` starts."""
        path = self.walk_path(class_name)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["fingerprint"] == fp and time.time() - data["started"] < ROBOTS_TTL_S:
                return str(data["walk"])
        atomic_write_json(path, {"walk": new_walk, "fingerprint": fp, "started": time.time()})
        return new_walk

    def end_walk(self, class_name: str) -> None:
        # removed before the new list is saved: a kill in between costs a repeated walk, never
        # a refresh that silently resumes an already finished walk and so finds nothing
        self.walk_path(class_name).unlink(missing_ok=True)


def _lines(log: Path) -> list[tuple[str, PageRecord]]:
    """A pages log's complete lines (a torn last one is left out), each with its record."""
    text = log.read_text(encoding="utf-8")
    return [
        (line, PageRecord.from_row(json.loads(line)))
        for line in text.splitlines(keepends=True)
        if line.endswith("\n")
    ]


def _unchanged(page: PageRecord, before: dict[str, PageRecord], walks: set[str]) -> bool:
    """Whether ``page``, recorded by one of ``walks``, answered as the row before them did."""
    earlier = before.get(page.key)
    if page.walk not in walks or earlier is None:
        return False

    def answer(record: PageRecord) -> dict[str, Any]:
        row = record.to_row()
        row.pop("walk", None)
        row.pop("time", None)
        return row

    return answer(page) == answer(earlier)


def forget_state_if_demo_changed(demo_site: Path | None, out: Path) -> None:
    """Drop the crawl state when the bundled demo site's files changed since it was recorded.

    The state remembers pages by URL, and the demo's URLs stay the same when the site is
    rebuilt; without this a rebuilt site would be crawled from stale pages.
    """
    if demo_site is None or not Path(demo_site).is_dir():
        return
    site = Path(demo_site)
    files = sorted(p for p in site.rglob("*") if p.is_file())
    fp = fingerprint(files=files, extra={"names": [p.relative_to(site).as_posix() for p in files]})
    state = out / ".state"
    marker = state / "demo_site.json"
    # A state without a marker is kept: it predates the marker, or a shard of this very crawl
    # (running beside us) has just begun it.
    had_marker = marker.exists()

    def wipe() -> None:
        if not had_marker:
            return
        for log in state.glob("*.jsonl"):
            log.unlink()
        for folder in ("candidates", "walks"):
            for listing in (state / folder).glob("*.json"):
                listing.unlink()

    reuse_or_wipe(marker, fp, wipe, described={"demo_site": str(site)})
