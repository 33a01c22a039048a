"""Real HTTP servers on 127.0.0.x for tests and benchmarks: scripted, slow or misbehaving.

    with LocalServer() as server:
        server.add("/a.png", png_bytes())                        # 200, type from the extension
        server.add("/flaky.png", [Reply(500), Reply(200, png)])  # in turn; the last repeats
        server.add("/slow.png", Reply(200, png, delay_s=2))
        server.add("/loop", Reply(302, headers={"Location": "/loop"}))
        server.add("/cut.png", Reply(200, png, truncate_to=10))  # Content-Length says more
        server.add("/api", lambda count, path: Reply(200, answer_for(path)))
        crawl(... f"{server.url}/a.png" ...)
        server.hits("/a.png")                                   # how many requests it got

Every request is recorded (path, Host header, start time); ``peak_in_flight`` tells the most
requests one Host had open at once, so tests can check per-host limits. ``latency_s`` delays every
reply (the benchmark's 50 ms). Binding to 127.0.0.2..127.0.0.254 gives distinct hosts on Linux.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from PIL import Image

CONTENT_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".html": "text/html; charset=utf-8",
    ".txt": "text/plain",
    ".json": "application/json",
}


def png_bytes(size: int = 32, seed: int = 0, color: bool = True) -> bytes:
    """A small, distinct PNG: random pixels from ``seed`` (different seeds, different bytes)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if color else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def html_page(body: str, head: str = "") -> bytes:
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>".encode()


@dataclass
class Reply:
    """One scripted answer. ``truncate_to`` sends fewer body bytes than Content-Length claims;
    ``chunked_forever`` streams ``body`` repeatedly without a length (a huge download)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str | None = None
    delay_s: float = 0.0
    truncate_to: int | None = None
    chunked_forever: bool = False


@dataclass
class Hit:
    path: str
    host: str
    started: float
    user_agent: str


Route = Reply | bytes | list[Reply] | Callable[[int, str], Reply]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path
        host = self.headers.get("Host", "")
        reply, _ = owner._begin(path, host, self.headers.get("User-Agent", ""))
        try:
            delay = reply.delay_s + owner.latency_s
            if delay:
                time.sleep(delay)
            self._send(reply, path)
        except (BrokenPipeError, ConnectionResetError):
            owner.aborted[path] += 1
        finally:
            owner._end(host)

    def _send(self, reply: Reply, path: str) -> None:
        self.send_response(reply.status)
        content_type = reply.content_type
        if content_type is None:
            suffix = "." + path.split("?")[0].rsplit(".", 1)[-1] if "." in path else ""
            content_type = CONTENT_TYPES.get(suffix, "application/octet-stream")
        self.send_header("Content-Type", content_type)
        for name, value in reply.headers.items():
            for one in value.split("\n"):  # "a\nb" sends the header twice
                self.send_header(name, one)
        if reply.chunked_forever:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = reply.body or b"\0" * 65536
            sent = 0
            while sent < 1_000_000_000:
                self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
                self.server.owner.sent[path] = sent
            return
        self.send_header("Content-Length", str(len(reply.body)))
        if reply.truncate_to is not None:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body[: reply.truncate_to])
            self.wfile.flush()
            self.close_connection = True
            return
        self.end_headers()
        self.wfile.write(reply.body)
        self.server.owner.sent[path] = len(reply.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    owner: LocalServer


class LocalServer:
    """A scripted HTTP server on ``host`` and a free port (or ``port``), for ``with`` blocks."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_s: float = 0.0) -> None:
        self.host = host
        self.latency_s = latency_s
        self.routes: dict[str, Route] = {}
        self.hit_log: list[Hit] = []
        self.counts: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.peak_in_flight: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.aborted: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def add(self, path: str, route: Route) -> str:
        """Serve ``route`` at ``path`` (with its query string, if any); return the full URL."""
        self.routes[path] = route
        return self.url + path

    def _begin(self, path: str, host: str, user_agent: str) -> tuple[Reply, int]:
        with self._lock:
            self.counts[path] += 1
            count = self.counts[path]
            self.hit_log.append(Hit(path, host, time.monotonic(), user_agent))
            self.in_flight[host] += 1
            self.peak_in_flight[host] = max(self.peak_in_flight[host], self.in_flight[host])
        # exact path (with query) first, then the bare path: API routes read the query themselves
        route = self.routes.get(path, self.routes.get(path.split("?")[0]))
        if route is None:
            return Reply(404, b"not found", content_type="text/plain"), count
        if isinstance(route, bytes):
            return Reply(200, route), count
        if isinstance(route, Reply):
            return route, count
        if isinstance(route, list):
            return route[min(count, len(route)) - 1], count
        return route(count, path), count

    def _end(self, host: str) -> None:
        with self._lock:
            self.in_flight[host] -= 1

    def hits(self, path: str | None = None) -> int:
        """Requests received for ``path`` (all paths if None), robots.txt included."""
        return self.counts[path] if path is not None else sum(self.counts.values())

    def start(self) -> LocalServer:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
