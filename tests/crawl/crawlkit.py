"""Helpers for the crawl tests in this folder: a fast config, a crawl with a hard time bound, a
server that dribbles bytes forever, and a hash of every file a DVC output holds."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CrawlConfig
from pipeline.crawl import CrawlSummary, crawl


def config(classes: list[dict[str, Any]], **overrides: Any) -> CrawlConfig:
    """Small timeouts and instant backoff, so every failure path ends in seconds; no minimum
    number of images per class unless a test asks for one."""
    settings: dict[str, Any] = {
        "user_agent": "crawl2model-test/1.0 (+mailto:tests@example.org)",
        "allow_private_addresses": True,
        "retries": 1,
        "backoff_s": 0.01,
        "timeout_s": 0.5,
        "concurrency": 4,
        "max_per_host": 2,
        "api_delay_s": 0.0,
        "min_images_per_class": 0,
    }
    settings.update(overrides)
    return CrawlConfig.model_validate({"classes": classes, **settings})


@dataclass
class Finished:
    """How a bounded crawl ended: its summary or the exception it raised, and how long it took."""

    summary: CrawlSummary | None
    error: BaseException | None
    elapsed_s: float
    report: dict[str, Any]


def bounded_crawl(
    cfg: CrawlConfig, tmp_path: Path, limit_s: float = 20.0, **kwargs: Any
) -> Finished:
    """Run ``crawl`` in a thread; fail the test (instead of hanging it) if it is still running
    after ``limit_s``. Returns what it came to; the report is read if it was written."""
    out, report = tmp_path / "raw", tmp_path / "crawl_report.json"
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["summary"] = crawl(cfg, out, report, progress=False, **kwargs)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"crawl still running after {limit_s} s (hangs)"
    written = json.loads(report.read_text()) if report.exists() else {}
    return Finished(result.get("summary"), result.get("error"), elapsed, written)


def page_reasons(report: dict[str, Any]) -> dict[str, str]:
    """Failed page URL -> reason, from the crawl report."""
    return {row["url"]: row["reason"] for row in report["pages"]["failed_urls"]}


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (hidden ones too), by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


class DribbleServer:
    """A TCP server that answers every request by sending bytes one at a time, forever: the
    status line and then a header that never ends (``headers=True``), or complete headers and
    then a body far slower than any read timeout notices (slow-loris)."""

    def __init__(self, headers: bool = False, every_s: float = 0.02) -> None:
        self.headers, self.every_s = headers, every_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self.connections = 0

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if self.headers:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                else:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 1000000\r\n\r\nUser-agent: *\n"
                    )
                while not self._stop.wait(self.every_s):
                    conn.sendall(b"a")
            except OSError:
                return

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def __enter__(self) -> DribbleServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
