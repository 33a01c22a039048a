"""Crawl stage: find and download images for each class, politely, safely and resumably.

Consumes the ``classes`` and ``crawl`` sections of params.yaml (``CrawlConfig``) and the web (or
the bundled demo site, served on 127.0.0.1 while the stage runs). Produces:

- ``data/raw/<class>/<sha256 of bytes>.<ext>``: every image saved, named by content hash, never
  by anything taken from its URL;
- ``data/raw/manifest.jsonl``: one row per selected image (class, source, url, page_url, license,
  attribution, status, content_type, bytes, width, height, sha256, path, fetched_at);
- ``reports/crawl_report.json``: counts per class and per failure reason (a DVC metric);
- ``data/raw/.state/``: the crawl state (pages seen, candidates found, every fetch's outcome),
  appended as the crawl goes, so a killed crawl resumes where it stopped and a rerun of a
  finished crawl does no network I/O at all. Failed fetches are final too (with their reason);
  delete ``.state/fetch-*.jsonl`` to try them again.

``refresh=True`` (``python -m pipeline crawl --refresh``; scheduled flow runs) walks the sources
again: seed pages and API listings are fetched anew (robots.txt and host spacing as usual), URLs
not seen before are appended to the class's candidate list, and only those are fetched; images
already fetched are kept, not fetched again, and failures stay recorded. Appending, rather than
re-sorting, means a class at its ``max_images`` cap keeps the images it has and new ones only
fill free places. A refresh killed midway resumes its walk (for 24 hours) when run again with
``refresh``; a plain rerun meanwhile keeps using the last finished list.

A crawl runs in two phases. *Discovery* turns each class's sources into an ordered candidate list:
``pages`` (seed HTML pages and links followed level by level to ``max_depth``), ``urls`` (a text
or CSV file of image URLs), ``wikimedia_commons`` and ``openverse`` (their public search APIs).
*Fetching* downloads candidates in that order until the class has ``max_images`` distinct images.
Both phases run every request through one scheduler that keeps ``concurrency`` requests in flight
over all hosts, at most ``max_per_host`` per host, spaced by the larger of ``per_host_delay_s``
and robots.txt's Crawl-delay, and reschedules (instead of sleeping on) retries and Retry-After.
Requests go through one urllib3 connection pool (keep-alive per host).

Because candidates are ordered and selection is "the first N distinct images in order", the
manifest does not depend on timing: ``crawl`` in one process and ``crawl`` split over classes and
host shards followed by ``merge_shards`` write the same manifest (apart from ``fetched_at``).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import heapq
import html
import http.server
import io
import ipaddress
import itertools
import json
import os
import random
import re
import socket
import threading
import time
import urllib.request
import urllib.robotparser
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

import urllib3
from bs4 import BeautifulSoup
from PIL import Image
from tqdm import tqdm
from urllib3.util import Retry

from pipeline import paths
from pipeline.config import ClassConfig, CrawlConfig, StageError
from pipeline.files import (
    atomic_write_bytes,
    atomic_write_json,
    read_jsonl,
    write_jsonl,
)

DEMO = "{demo}"
MANIFEST_FIELDS = (
    "class",
    "source",
    "url",
    "page_url",
    "license",
    "attribution",
    "status",
    "content_type",
    "bytes",
    "width",
    "height",
    "sha256",
    "path",
    "fetched_at",
)
SOURCE_ORDER = ("pages", "urls", "wikimedia_commons", "openverse")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
SKIP_LINK_EXTENSIONS = (
    ".pdf",
    ".zip",
    ".gz",
    ".tar",
    ".mp4",
    ".mp3",
    ".webm",
    ".svg",
    ".css",
    ".js",
)
FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
X_ROBOTS_OPT_OUTS = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600  # RFC 9309: do not use a cached robots.txt for more than 24 hours
HTML_TYPES = ("text/html", "application/xhtml+xml")
CANDIDATE_FORMAT = 2  # bump when the candidate order changes, so old lists are rebuilt


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class CrawlSummary:
    """What a crawl (or one shard of it) did; ``str()`` is the CLI's one-line summary."""

    saved: dict[str, int]
    failed: dict[str, int]
    pages: int
    requests: int
    elapsed_s: float
    complete: bool = True
    new_candidates: int | None = None  # set by a refresh: URLs its walk found that were not known

    def __str__(self) -> str:
        per_class = ", ".join(f"{name} {n}" for name, n in self.saved.items())
        failures = ", ".join(f"{reason} {n}" for reason, n in sorted(self.failed.items()))
        text = (
            f"{sum(self.saved.values())} images saved ({per_class}) from {self.pages} pages; "
            f"{sum(self.failed.values())} candidates failed ({failures or 'none'}); "
            f"{self.requests} HTTP requests this run"
        )
        if self.new_candidates is not None:
            text += f"; refresh found {self.new_candidates} new candidate URLs"
        empty = [name for name, n in self.saved.items() if n == 0]
        if empty:
            text += f"; NO IMAGES for {', '.join(empty)} (see the report's failure counts)"
        return text if self.complete else text + " (shard done; run merge_shards for the manifest)"


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


# --------------------------------------------------------------------------------------------
# URLs


@dataclass(frozen=True)
class UrlMap:
    """Maps between stored URLs ("{demo}/a.png") and live ones ("http://127.0.0.1:4711/a.png").

    The demo server gets a new port every run; storing its URLs with the placeholder keeps the
    crawl state, the manifest and the resume logic independent of the port.
    """

    demo_base: str | None = None

    def live(self, url: str) -> str:
        if self.demo_base and url.startswith(DEMO):
            return self.demo_base + url[len(DEMO) :]
        return url

    def stored(self, url: str) -> str:
        if self.demo_base and (url == self.demo_base or url.startswith(self.demo_base + "/")):
            return DEMO + url[len(self.demo_base) :]
        return url


def normalize_url(url: str) -> str | None:
    """Return ``url`` in canonical form (lower-case scheme/host, no default port, no fragment).

    Returns None for anything that is not an absolute http(s) URL.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    host = parts.hostname.lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if port and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", parts.query, ""))


def stored_host(url: str) -> str:
    """The host part of a stored URL ("{demo}" for the demo site): used to shard by host."""
    return DEMO if url.startswith(DEMO) else urlsplit(url).netloc


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_shard_of(url: str, shard_count: int) -> int:
    digest = hashlib.sha256(stored_host(url).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard_count


# --------------------------------------------------------------------------------------------
# The demo site server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = (
        "HTTP/1.1"  # keep-alive, so the demo crawl reuses connections like a real one
    )

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve ``directory`` over HTTP on ``host`` and a free port; yield the base URL.

    Raises StageError if the directory does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise StageError(
            f"crawl.serve_demo_site: {directory} is not a directory "
            "(run `python demo/build_site.py`, or set crawl.serve_demo_site: null)"
        )
    handler = functools.partial(_QuietHandler, directory=str(directory.resolve()))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-site", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------
# HTTP: one request per call, run on worker threads; the scheduler decides when


@dataclass
class Job:
    """One HTTP request the scheduler must make; ``data`` is what the caller needs afterwards."""

    kind: str  # "robots" | "page" | "api" | "image"
    url: str  # live URL of the next request (changes on redirect)
    data: Any
    attempt: int = 0
    hops: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What one request came to: done (with a result), failed, retry later, or redirect."""

    kind: str  # "done" | "failed" | "retry" | "redirect"
    reason: str = ""
    status: int | None = None
    result: Any = None
    wait_s: float | None = None  # Retry-After, if the server sent one
    location: str = ""


class _Failure(Exception):
    def __init__(self, reason: str, status: int | None = None, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.status, self.retry = reason, status, retry


def _media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def header_values(response: urllib3.BaseHTTPResponse, name: str) -> list[str]:
    """Every value of a header, even one sent more than once."""
    return list(response.headers.getlist(name))


X_ROBOTS_VALUED = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)


def x_robots_opt_outs(values: Iterable[str], user_agent: str) -> set[str]:
    """Return the opt-out directives among X-Robots-Tag header values that apply to us.

    A directive may be scoped to one crawler ("otherbot: noindex"); those for other crawlers are
    ignored.
    """
    token = user_agent.split("/")[0].strip().lower()
    directives: set[str] = set()
    for value in values:
        scope = None
        for raw in value.split(","):
            part = raw.strip().lower()
            if ":" in part and part.split(":")[0].strip() not in X_ROBOTS_VALUED:
                scope, _, part = (s.strip() for s in part.partition(":"))
            if scope not in (None, token, "*"):
                continue
            if part in X_ROBOTS_OPT_OUTS or part == "nofollow":
                directives.add(part)
    return directives


Response = urllib3.BaseHTTPResponse
Handler = Callable[["Job", Response], Any]


class Http:
    """Thread-safe HTTP client over one urllib3 ``PoolManager``: keep-alive connections reused
    per host (at most ``max_per_host`` each), address checks, streamed bodies with a size cap.

    urllib3 directly rather than requests: requests adds ~2 ms of CPU per request (measured in
    bench/crawl_throughput.py), which on 2 cores is most of a crawl's time. Proxies come from
    the usual environment variables (HTTP(S)_PROXY, NO_PROXY), as with requests.
    """

    def __init__(self, cfg: CrawlConfig) -> None:
        self.cfg = cfg
        self._addresses: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self.requests = 0
        self._retry_after = Retry()  # for its RFC 9110 Retry-After parser (seconds or a date)
        self.gates: dict[str, HostGate] = {}
        self.robots: dict[str, RobotsPolicy] = {}
        options: dict[str, Any] = {
            "num_pools": 256,
            "maxsize": cfg.max_per_host,
            "retries": False,  # the scheduler retries: it reschedules instead of sleeping
            "timeout": urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s),
            "headers": {"User-Agent": cfg.user_agent},
        }
        self._direct = urllib3.PoolManager(**options)
        self._proxies = {
            scheme: urllib3.ProxyManager(url, **options)
            for scheme, url in urllib.request.getproxies_environment().items()
            if scheme in ("http", "https")
        }

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy is None or urllib.request.proxy_bypass_environment(parts.hostname or ""):
            return self._direct
        return proxy

    def address_problem(self, host: str) -> str | None:
        """Return a failure reason if ``host`` resolves to an address we must not contact."""
        if self.cfg.allow_private_addresses:
            return None
        if host not in self._addresses:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except (socket.gaierror, UnicodeError):
                problem: str | None = "dns_error"
            else:
                problem = None
                for info in infos:
                    address = ipaddress.ip_address(info[4][0].split("%")[0])
                    if not address.is_global:  # private, loopback, link-local, reserved, ...
                        problem = "private_address"
            self._addresses[host] = problem
        return self._addresses[host]

    def perform(self, job: Job, handle: Handler) -> Outcome:
        """Make ``job``'s request; ``handle`` turns a 200 answer into the result. Never raises."""
        parts = urlsplit(job.url)
        problem = self.address_problem(parts.hostname or "")
        if problem:
            return Outcome("failed", problem)
        with self._lock:
            self.requests += 1
        try:
            response = self._manager(job.url).request(
                "GET", job.url, preload_content=False, redirect=False
            )
        except urllib3.exceptions.TimeoutError:
            return Outcome("retry", "timeout")
        except urllib3.exceptions.LocationParseError:
            return Outcome("failed", "bad_url")
        except urllib3.exceptions.HTTPError:
            return Outcome("retry", "connection_error")
        status = response.status
        try:
            if status in REDIRECT_STATUSES and response.headers.get("Location"):
                return Outcome("redirect", status=status, location=response.headers["Location"])
            if status in RETRY_STATUSES:
                wait_s = None
                if status in (429, 503) and response.headers.get("Retry-After"):
                    with contextlib.suppress(Exception):
                        wait_s = self._retry_after.parse_retry_after(
                            response.headers["Retry-After"]
                        )
                return Outcome("retry", f"http_{status}", status=status, wait_s=wait_s)
            if job.kind == "robots":  # 4xx is an answer for robots.txt, not a failure
                body = self.read_body(response, ROBOTS_MAX_BYTES, truncate=True)
                return Outcome("done", status=status, result=(status, body))
            if status != 200:
                return Outcome("failed", f"http_{status}", status=status)
            return Outcome("done", status=status, result=handle(job, response))
        except _Failure as failure:
            kind = "retry" if failure.retry else "failed"
            return Outcome(kind, failure.reason, status=failure.status or status)
        finally:
            # an unread body must not go back to the pool: drain a small one (keeping the
            # connection alive), drop the connection under a large or unknown one
            if not response.isclosed():
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) <= 65536:
                    response.drain_conn()
                else:
                    response.close()
            response.release_conn()

    def read_body(self, response: Response, max_bytes: int, truncate: bool = False) -> bytes:
        """Read the body, refusing (or with ``truncate``, cutting) anything over ``max_bytes``.

        Raises _Failure("too_large") before reading when Content-Length already says too much,
        and _Failure("truncated", retry=True) when the connection drops mid-body.
        """
        declared = response.headers.get("Content-Length", "")
        if not truncate and declared.isdigit() and int(declared) > max_bytes:
            raise _Failure("too_large")
        chunks: list[bytes] = []
        size = 0
        # a server dribbling bytes forever must not pin a worker: bound the whole download
        deadline = time.monotonic() + 6 * self.cfg.timeout_s
        try:
            for chunk in response.stream(64 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    response.close()
                    if truncate:
                        break
                    raise _Failure("too_large")
                if time.monotonic() > deadline:
                    response.close()
                    raise _Failure("timeout", retry=True)
        except urllib3.exceptions.TimeoutError:
            raise _Failure("timeout", retry=True) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead):
            raise _Failure("truncated", retry=True) from None
        except urllib3.exceptions.HTTPError:
            raise _Failure("connection_error", retry=True) from None
        return b"".join(chunks)[: max_bytes if truncate else None]


# --------------------------------------------------------------------------------------------
# Politeness: robots.txt and per-host gates


@dataclass
class RobotsPolicy:
    parser: urllib.robotparser.RobotFileParser
    fetched_at: float
    note: str  # "ok" | "4xx: allow all" | "unreachable: disallow all"
    text: str = ""

    def crawl_delay(self, user_agent: str) -> float:
        """Crawl-delay for ``user_agent`` in seconds (0 if none).

        urllib.robotparser only understands whole seconds ("Crawl-delay: 0.5" is dropped), so the
        value is read here: the group naming our product token wins over the "*" group.
        """
        token = user_agent.split("/")[0].strip().lower()
        delays: dict[str, float] = {}
        agents: list[str] = []
        in_rules = False
        for raw in self.text.splitlines():
            line = raw.split("#", 1)[0].strip()
            name, _, value = (part.strip() for part in line.partition(":"))
            name = name.lower()
            if name == "user-agent":
                if in_rules:
                    agents, in_rules = [], False
                agents.append(value.lower())
            elif name:
                in_rules = True
                if name == "crawl-delay":
                    with contextlib.suppress(ValueError):
                        for agent in agents:
                            delays[agent] = float(value)
        specific = [d for agent, d in delays.items() if agent != "*" and agent in token]
        return max(0.0, specific[0] if specific else delays.get("*", 0.0))

    @classmethod
    def from_answer(cls, status: int | None, body: bytes) -> RobotsPolicy:
        """RFC 9309: 2xx is parsed; 4xx means no restrictions; 5xx or no answer disallows all."""
        parser = urllib.robotparser.RobotFileParser()
        text = ""
        if status is not None and 200 <= status < 300:
            text = body.decode("utf-8", errors="replace")
            parser.parse(text.splitlines())
            note = "ok"
        elif status is not None and 400 <= status < 500:
            parser.allow_all = True
            note = f"{status}: allow all"
        else:
            parser.disallow_all = True
            note = f"{status or 'unreachable'}: disallow all"
        return cls(parser, time.monotonic(), note, text)


@dataclass
class HostGate:
    """At most ``max_in_flight`` requests to one host, starts spaced ``min_interval`` apart."""

    max_in_flight: int
    min_interval: float
    in_flight: int = 0
    next_start: float = 0.0
    peak: int = 0

    def ready_at(self, now: float) -> float | None:
        """When the next request may start (``now`` or later); None while the host is full."""
        if self.in_flight >= self.max_in_flight:
            return None
        return max(now, self.next_start)

    def start(self, now: float) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.next_start = max(now, self.next_start) + self.min_interval

    def finish(self, not_before: float | None = None) -> None:
        self.in_flight -= 1
        if not_before is not None:
            self.next_start = max(self.next_start, not_before)


class Scheduler:
    """Runs jobs on a thread pool, never more than ``max_per_host`` in flight per host.

    Jobs wait in per-host queues; the dispatcher (the calling thread) starts one only when its
    host has a free slot and its delay has passed, so no worker ever sleeps on a busy host and a
    slow host never starves the others. Retries and Retry-After reschedule the job (and, for
    Retry-After, the whole host); redirects are re-dispatched hop by hop so every hop gets the
    scheme, address and robots.txt checks. ``on_done(job, outcome)`` runs on the calling thread.
    """

    def __init__(self, cfg: CrawlConfig, http: Http, api_hosts: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.http = http
        self.api_hosts = set(api_hosts)
        self.queues: dict[str, deque[Job]] = {}
        self.delayed: list[tuple[float, int, Job]] = []
        # shared by every scheduler on this client, so robots.txt is fetched once per crawl and
        # host spacing holds across the discovery and fetch phases
        self.gates = http.gates
        self.robots = http.robots
        self.robots_pending: set[str] = set()
        self._seq = itertools.count()
        self.handlers: dict[str, Handler] = {}

    def add(self, job: Job) -> None:
        self.queues.setdefault(origin_of(job.url), deque()).append(job)

    def gate(self, origin: str) -> HostGate:
        if origin not in self.gates:
            delay = self.cfg.per_host_delay_s
            if urlsplit(origin).netloc in self.api_hosts:
                delay = max(delay, self.cfg.api_delay_s)
            self.gates[origin] = HostGate(self.cfg.max_per_host, delay)
        return self.gates[origin]

    def _robots_gate(self, origin: str, job: Job) -> str | None:
        """Return "wait" while robots.txt is unknown, a failure reason, or None to go ahead."""
        # API calls follow the API's own terms and rate limits, not robots.txt, which is for
        # crawlers of pages (Wikimedia's disallows /w/ for crawlers, API included)
        if not self.cfg.obey_robots_txt or job.kind in ("robots", "api"):
            return None
        policy = self.robots.get(origin)
        if policy is None or time.monotonic() - policy.fetched_at > ROBOTS_TTL_S:
            if origin not in self.robots_pending:
                self.robots_pending.add(origin)
                self.queues[origin].appendleft(Job("robots", origin + "/robots.txt", origin))
            return "wait"
        if not policy.parser.can_fetch(self.cfg.user_agent, job.url):
            return "robots_disallowed"
        return None

    def _on_robots(self, job: Job, outcome: Outcome) -> None:
        origin = job.data
        if outcome.kind == "done":
            status, body = outcome.result
            policy = RobotsPolicy.from_answer(status, body)
        elif outcome.reason in ("private_address", "bad_scheme"):
            # the host itself is off limits; let each request fail with that reason instead
            policy = RobotsPolicy.from_answer(404, b"")
        else:
            policy = RobotsPolicy.from_answer(None, b"")
        self.robots[origin] = policy
        self.robots_pending.discard(origin)
        delay = policy.crawl_delay(self.cfg.user_agent)
        if delay:
            gate = self.gate(origin)
            gate.min_interval = max(gate.min_interval, delay)

    def _settle(self, job: Job, outcome: Outcome, on_done: Callable[[Job, Outcome], None]) -> None:
        """Turn retry/redirect outcomes into new attempts; pass final ones to ``on_done``."""
        now = time.monotonic()
        if outcome.kind == "retry":
            if job.attempt >= self.cfg.retries:
                outcome = Outcome("failed", outcome.reason, status=outcome.status)
            else:
                if outcome.wait_s is not None:
                    delay = min(outcome.wait_s, self.cfg.max_retry_after_s)
                    # Retry-After speaks for the whole host, not just this URL
                    gate = self.gate(origin_of(job.url))
                    gate.next_start = max(gate.next_start, now + delay)
                else:
                    delay = self.cfg.backoff_s * 2**job.attempt * random.uniform(0.5, 1.5)
                job.attempt += 1
                heapq.heappush(self.delayed, (now + delay, next(self._seq), job))
                return
        if outcome.kind == "redirect":
            target = normalize_url(urljoin(job.url, outcome.location))
            if target is None:
                outcome = Outcome("failed", "bad_scheme", status=outcome.status)
            elif target in job.hops or target == job.url:
                outcome = Outcome("failed", "redirect_loop", status=outcome.status)
            elif len(job.hops) >= self.cfg.max_redirects:
                outcome = Outcome("failed", "too_many_redirects", status=outcome.status)
            else:
                job.hops = (*job.hops, job.url)
                job.url = target
                self.add(job)
                return
        if job.kind == "robots":
            self._on_robots(job, outcome)
        else:
            on_done(job, outcome)

    def run(self, on_done: Callable[[Job, Outcome], None]) -> None:
        """Run every queued job (and any ``on_done`` adds) to a final outcome."""
        in_flight: dict[Future[Outcome], Job] = {}
        with ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="crawl") as pool:
            while self.queues or self.delayed or in_flight:
                now = time.monotonic()
                while self.delayed and self.delayed[0][0] <= now:
                    self.add(heapq.heappop(self.delayed)[2])
                next_event = self.delayed[0][0] if self.delayed else now + 1.0
                for origin in list(self.queues):
                    queue = self.queues[origin]
                    gate = self.gate(origin)
                    while queue and len(in_flight) < self.cfg.concurrency:
                        ready = gate.ready_at(now)
                        if ready is None:
                            break
                        if ready > now:
                            next_event = min(next_event, ready)
                            break
                        job = queue[0]
                        verdict = self._robots_gate(origin, job)
                        if verdict == "wait":
                            if queue[0] is job:  # robots.txt already in flight
                                break
                            continue  # robots.txt job now heads the queue
                        queue.popleft()
                        if verdict is not None:
                            on_done(job, Outcome("failed", verdict))
                            continue
                        gate.start(now)
                        handler = self.handlers.get(job.kind, _no_handler)
                        in_flight[pool.submit(self.http.perform, job, handler)] = job
                    if not queue and self.queues.get(origin) is queue:
                        del self.queues[origin]
                if not in_flight:
                    if self.queues or self.delayed:
                        time.sleep(max(0.0, min(next_event - time.monotonic(), 1.0)))
                    continue
                timeout = max(0.0, next_event - time.monotonic())
                done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
                for future in done:
                    job = in_flight.pop(future)
                    self.gate(origin_of(job.url)).finish()
                    self._settle(job, future.result(), on_done)


def _no_handler(job: Job, response: Response) -> Any:
    return None


# --------------------------------------------------------------------------------------------
# Parsing pages


def largest_from_srcset(srcset: str) -> str | None:
    """Return the URL of the largest candidate in an ``srcset`` ("a.png 1x, b.png 2x")."""
    best: tuple[float, str] | None = None
    for entry in re.split(r",\s+", srcset.strip()):
        parts = entry.strip().split()
        if not parts:
            continue
        size = 1.0
        if len(parts) > 1:
            descriptor = parts[1].lower()
            with contextlib.suppress(ValueError):
                size = float(descriptor[:-1]) if descriptor[-1:] in ("w", "x") else size
        if best is None or size > best[0]:
            best = (size, parts[0])
    return best[1] if best else None


def parse_page(html_text: str | bytes, page_url: str, x_robots: set[str]) -> list[dict[str, Any]]:
    """Return a page's links and images in document order, URLs absolute and normalised (live).

    Images come from ``<img src>`` (or the largest ``srcset`` candidate), ``<a href>`` to image
    files and ``og:image``; each carries the page's ``rel=license`` link and author meta, if any.
    Honours robots meta tags and X-Robots-Tag: ``nofollow`` drops links, image opt-outs drop
    images.
    """
    soup = BeautifulSoup(html_text, "html.parser")
    base = page_url
    base_tag = soup.find("base", href=True)
    if base_tag is not None:
        base = urljoin(page_url, str(base_tag["href"]))
    directives = set(x_robots)
    for meta in soup.find_all("meta", attrs={"name": re.compile("^robots$", re.I)}):
        directives |= {d.strip().lower() for d in str(meta.get("content", "")).split(",")}
    license_tag = soup.find(["link", "a"], rel="license", href=True)
    license_url = urljoin(page_url, str(license_tag["href"])) if license_tag is not None else ""
    author = soup.find("meta", attrs={"name": "author"})
    attribution = str(author.get("content", "")).strip() if author is not None else ""
    follow = not directives & {"nofollow", "none"}
    images_ok = not directives & {"noai", "noimageai", "noimageindex", "none"}

    items: list[dict[str, Any]] = []

    def add(kind: str, raw: str | None) -> None:
        if not raw or raw.startswith(("data:", "javascript:", "mailto:")):
            return
        url = normalize_url(urljoin(base, html.unescape(raw)))
        if url is None:
            return
        if kind == "image":
            items.append({"image": url, "license": license_url, "attribution": attribution})
        else:
            items.append({"link": url})

    for tag in soup.find_all(["img", "a", "meta"]):
        if tag.name == "img" and images_ok:
            srcset = tag.get("srcset")
            add(
                "image",
                largest_from_srcset(str(srcset))
                if srcset
                else tag.get("src") or tag.get("data-src"),
            )
        elif tag.name == "a" and tag.get("href"):
            href = str(tag["href"])
            path = urlsplit(href).path.lower()
            if path.endswith(IMAGE_EXTENSIONS):
                if images_ok:
                    add("image", href)
            elif follow and not path.endswith(SKIP_LINK_EXTENSIONS):
                add("link", href)
        elif tag.name == "meta" and tag.get("property") == "og:image" and images_ok:
            add("image", tag.get("content"))
    return items


# --------------------------------------------------------------------------------------------
# API sources: Wikimedia Commons and Openverse


def strip_html(text: str) -> str:
    return re.sub(r"\s+", " ", BeautifulSoup(text or "", "html.parser").get_text(" ")).strip()


@dataclass
class ApiRequest:
    """One page of an API search for one class."""

    class_name: str
    source: str  # "wikimedia_commons" | "openverse"
    source_index: int
    page: int
    params: dict[str, Any]


def wikimedia_params(cfg: CrawlConfig, category: str | None, search: str | None) -> dict[str, Any]:
    """MediaWiki API parameters for files in a Commons category or matching a search."""
    params: dict[str, Any] = {
        "action": "query",
        "format": "json",
        "formatversion": "2",
        "prop": "imageinfo",
        "iiprop": "url|mime|size|extmetadata",
        "iiextmetadatafilter": "LicenseShortName|LicenseUrl|Artist|Credit|UsageTerms",
    }
    if cfg.thumbnail_width:
        params["iiurlwidth"] = str(cfg.thumbnail_width)
    if category is not None:
        title = category if category.lower().startswith("category:") else f"Category:{category}"
        params |= {
            "generator": "categorymembers",
            "gcmtitle": title,
            "gcmtype": "file",
            "gcmlimit": str(cfg.api_page_size),
        }
    else:
        params |= {
            "generator": "search",
            "gsrsearch": search,
            "gsrnamespace": "6",
            "gsrlimit": str(cfg.api_page_size),
        }
    return params


def parse_wikimedia(
    payload: dict[str, Any], request: ApiRequest, accepted: list[str]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Return (image items, params of the next page or None) from a MediaWiki API answer."""
    items = []
    pages = payload.get("query", {}).get("pages", [])
    if isinstance(pages, dict):  # formatversion=1 answers
        pages = list(pages.values())
    # generator results come in arbitrary order; "index" (search) or title gives a stable one
    pages = sorted(pages, key=lambda p: (p.get("index", 0), p.get("title", "")))
    for page in pages:
        for info in page.get("imageinfo", [])[:1]:
            url = info.get("thumburl") or info.get("url")
            if not url:
                continue
            if not info.get("thumburl") and _media_type(info.get("mime")) not in accepted:
                continue
            meta = info.get("extmetadata", {})
            license_name = meta.get("LicenseShortName", {}).get("value", "")
            artist = strip_html(meta.get("Artist", {}).get("value", ""))
            credit = strip_html(meta.get("Credit", {}).get("value", ""))
            items.append(
                {
                    "image": url,
                    "page_url": info.get("descriptionurl", ""),
                    "license": strip_html(license_name),
                    "attribution": artist or credit,
                }
            )
    next_params = None
    if "continue" in payload:
        next_params = {**request.params, **payload["continue"]}
    return items, next_params


def openverse_license(item: dict[str, Any]) -> str:
    code = str(item.get("license", "")).lower()
    version = str(item.get("license_version") or "")
    if code == "cc0":
        return "CC0 " + (version or "1.0")
    if code == "pdm":
        return "Public Domain Mark " + (version or "1.0")
    return f"CC {code.upper()} {version}".strip()


def openverse_params(cfg: CrawlConfig, query: str) -> dict[str, Any]:
    params = {"q": query, "page": "1", "page_size": str(min(cfg.api_page_size, 20))}
    if cfg.openverse_license_type != "all":
        params["license_type"] = cfg.openverse_license_type
    return params


def parse_openverse(
    payload: dict[str, Any], request: ApiRequest
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Return (image items, params of the next page or None) from an Openverse search answer."""
    items = []
    for result in payload["results"]:
        if result.get("mature") or not result.get("url"):
            continue
        creator = result.get("creator") or ""
        items.append(
            {
                "image": result["url"],
                "page_url": result.get("foreign_landing_url") or "",
                "license": openverse_license(result),
                "attribution": result.get("attribution") or creator,
            }
        )
    page = int(payload.get("page") or request.page)
    page_count = int(payload.get("page_count") or 0)
    next_params = None
    if page < page_count and payload["results"]:
        next_params = {**request.params, "page": str(page + 1)}
    return items, next_params


# --------------------------------------------------------------------------------------------
# Crawl state on disk


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
    """The crawl state under ``<out>/.state``: append-only logs, read back on every start.

    pages-<shard>.jsonl      one row per HTML page or API page fetched (or failed)
    candidates/<class>.json  the class's ordered candidate list once discovery finished
    walks/<class>.json       the class's unfinished refresh walk, if any (resumed on rerun)
    fetch-<shard>.jsonl      one row per image fetch outcome (saved or failed, with reason)
    """

    def __init__(self, out: Path, shard_id: str) -> None:
        self.dir = out / ".state"
        self.shard_id = shard_id
        self.pages: dict[str, dict[str, Any]] = {}
        self.fetches: dict[tuple[str, str], dict[str, Any]] = {}
        for log in sorted(self.dir.glob("pages-*.jsonl")):
            for row in read_jsonl(log):
                # a page walked again by a refresh has several rows: the newest one counts
                known = self.pages.get(row["key"])
                if known is None or row.get("time", 0.0) >= known.get("time", 0.0):
                    self.pages[row["key"]] = row
        for log in sorted(self.dir.glob("fetch-*.jsonl")):
            for row in read_jsonl(log):
                key = (row["class"], row["url"])
                if key not in self.fetches or (row["ok"] and not self.fetches[key]["ok"]):
                    self.fetches[key] = row

        self._page_log = StateLog(self.dir / f"pages-{shard_id}.jsonl")
        self._fetch_log = StateLog(self.dir / f"fetch-{shard_id}.jsonl")

    def record_page(self, row: dict[str, Any]) -> None:
        row["time"] = time.time()
        self.pages[row["key"]] = row
        self._page_log.append(row)

    def record_fetch(self, row: dict[str, Any]) -> None:
        self.fetches[(row["class"], row["url"])] = row
        self._fetch_log.append(row)

    def close(self) -> None:
        self._page_log.close()
        self._fetch_log.close()

    def candidates_path(self, class_name: str) -> Path:
        return self.dir / "candidates" / f"{class_name}.json"

    def load_candidates(self, class_name: str, fingerprint: str) -> list[Candidate] | None:
        path = self.candidates_path(class_name)
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fingerprint:
            return None
        return [Candidate.from_row(row) for row in data["candidates"]]

    def save_candidates(self, class_name: str, fingerprint: str, found: list[Candidate]) -> None:
        atomic_write_json(
            self.candidates_path(class_name),
            {"fingerprint": fingerprint, "candidates": [c.to_row() for c in found]},
        )

    def walk_path(self, class_name: str) -> Path:
        return self.dir / "walks" / f"{class_name}.json"

    def begin_walk(self, class_name: str, fingerprint: str, new_walk: str) -> str:
        """Return the id of the class's refresh walk: an unfinished one (same params, younger
        than a day) is resumed, so its pages are not fetched again; else ``new_walk`` starts."""
        path = self.walk_path(class_name)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if data["fingerprint"] == fingerprint and time.time() - data["started"] < ROBOTS_TTL_S:
                return str(data["walk"])
        atomic_write_json(
            path, {"walk": new_walk, "fingerprint": fingerprint, "started": time.time()}
        )
        return new_walk

    def end_walk(self, class_name: str) -> None:
        # removed before the new list is saved: a kill in between costs a repeated walk, never
        # a refresh that silently resumes an already finished walk and so finds nothing
        self.walk_path(class_name).unlink(missing_ok=True)


def forget_state_if_demo_changed(cfg: CrawlConfig, out: Path) -> None:
    """Drop the crawl state when the bundled demo site's files changed since it was recorded.

    The state remembers pages by URL, and the demo's URLs stay the same when the site is
    rebuilt; without this a rebuilt site would be crawled from stale pages.
    """
    if cfg.serve_demo_site is None or not Path(cfg.serve_demo_site).is_dir():
        return
    digest = hashlib.sha256()
    site = Path(cfg.serve_demo_site)
    for path in sorted(p for p in site.rglob("*") if p.is_file()):
        digest.update(path.relative_to(site).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    marker = out / ".state" / "demo_site.sha256"
    if marker.exists() and marker.read_text().strip() != digest.hexdigest():
        for log in (out / ".state").glob("*.jsonl"):
            log.unlink()
        for folder in ("candidates", "walks"):
            for listing in (out / ".state" / folder).glob("*.json"):
                listing.unlink()
    atomic_write_bytes(marker, digest.hexdigest().encode() + b"\n")


def class_fingerprint(cfg: CrawlConfig, klass: ClassConfig) -> str:
    """Hash of everything that decides a class's candidate list (not politeness or limits)."""
    image_list = ""
    if klass.image_urls is not None and Path(klass.image_urls).exists():
        image_list = hashlib.sha256(Path(klass.image_urls).read_bytes()).hexdigest()
    relevant = {
        "version": CANDIDATE_FORMAT,
        "class": klass.model_dump(mode="json", exclude={"max_images", "license", "attribution"}),
        "license": klass.license,
        "attribution": klass.attribution,
        "max_depth": cfg.max_depth,
        "cap": class_cap(cfg, klass),
        "image_list": image_list,
        "robots": [cfg.obey_robots_txt, cfg.obey_x_robots_tag],
        "apis": [
            cfg.query_sources,
            cfg.wikimedia_api,
            cfg.openverse_api,
            cfg.openverse_license_type,
            cfg.api_page_size,
            cfg.thumbnail_width,
        ],
        "types": cfg.content_types,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def class_cap(cfg: CrawlConfig, klass: ClassConfig) -> int:
    return klass.max_images if klass.max_images is not None else cfg.max_images_per_class


def follow_allowed(klass: ClassConfig, url: str) -> bool:
    """Whether links to ``url`` (stored form) may be followed for ``klass``."""
    prefixes = klass.follow_prefixes or [seed.rsplit("/", 1)[0] + "/" for seed in klass.seeds]
    if any(url.startswith(prefix) for prefix in prefixes):
        return True
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in klass.allowed_domains)


def read_url_list(path: Path) -> list[dict[str, str]]:
    """Read img2dataset-style input: a text file of URLs or a CSV with a ``url`` column.

    Returns rows with url (and license/attribution/page_url if the CSV has them). Raises
    StageError naming the file if it is missing or has no ``url`` column.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StageError(f"{path}: cannot read image URL list: {exc}") from None
    if Path(path).suffix.lower() in (".csv", ".tsv"):
        dialect = "excel-tab" if Path(path).suffix.lower() == ".tsv" else "excel"
        rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
        if rows and "url" not in rows[0]:
            raise StageError(f"{path}: CSV needs a 'url' column, has {list(rows[0])}")
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in rows]
    return [
        {"url": line.strip()}
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


# --------------------------------------------------------------------------------------------
# Phase 1: discovery


class Discovery:
    """Turns each class's sources into its ordered candidate list (phase 1)."""

    def __init__(
        self, cfg: CrawlConfig, state: State, urls: UrlMap, http: Http, progress: bool = True
    ) -> None:
        self.cfg, self.state, self.urls, self.http = cfg, state, urls, http
        self.progress = progress
        api_hosts = {urlsplit(cfg.wikimedia_api).netloc, urlsplit(cfg.openverse_api).netloc}
        self.scheduler = Scheduler(cfg, http, api_hosts)
        self.scheduler.handlers = {"page": self._fetch_page, "api": self._fetch_api}
        # refresh: pages and API answers count only if recorded by these walks (None: any)
        self.walks: set[str] | None = None
        self.walk = ""
        self.added: dict[str, int] = {}  # per class: candidates a refresh appended

    def _known(self, key: str) -> dict[str, Any] | None:
        """The recorded answer for a page or API URL that this run may reuse, if any."""
        row = self.state.pages.get(key)
        if row is not None and self.walks is not None and row.get("walk") not in self.walks:
            return None
        return row

    def _record_page(self, row: dict[str, Any]) -> None:
        if self.walk:
            row["walk"] = self.walk
        self.state.record_page(row)

    # worker-thread handlers ---------------------------------------------------------------

    def _fetch_page(self, job: Job, response: Response) -> list[dict[str, Any]]:
        if _media_type(response.headers.get("Content-Type")) not in HTML_TYPES:
            raise _Failure("not_html")
        directives = set()
        if self.cfg.obey_x_robots_tag:
            directives = x_robots_opt_outs(
                header_values(response, "X-Robots-Tag"), self.cfg.user_agent
            )
        body = self.http.read_body(response, self.cfg.max_bytes)
        items = parse_page(body, job.url, directives)
        for item in items:
            for key in ("image", "link", "license"):
                if item.get(key):
                    item[key] = self.urls.stored(item[key])
        return items

    def _fetch_api(self, job: Job, response: Response) -> dict[str, Any]:
        body = self.http.read_body(response, self.cfg.max_bytes)
        try:
            payload = json.loads(body)
        except ValueError:
            raise _Failure("bad_json") from None
        if not isinstance(payload, dict):
            raise _Failure("bad_json")
        request: ApiRequest = job.data[0]
        # an API error answers 200 with an error object: record it as this call's failure
        if "error" in payload or (request.source == "openverse" and "results" not in payload):
            raise _Failure("api_error")
        return payload

    # main thread ----------------------------------------------------------------------------

    def run(self, classes: list[ClassConfig], refresh: bool = False) -> dict[str, list[Candidate]]:
        """Return each class's candidates, reusing the state's finished lists and pages.

        With ``refresh`` every class's sources are walked again (pages and API answers recorded
        by earlier walks are not reused) and URLs not in its finished list are appended to it.
        """
        found: dict[str, list[Candidate]] = {}
        previous: dict[str, list[Candidate]] = {}
        todo = []
        for klass in classes:
            cached = self.state.load_candidates(klass.name, class_fingerprint(self.cfg, klass))
            if cached is not None and not refresh:
                found[klass.name] = cached
            else:
                todo.append(klass)
                previous[klass.name] = cached or []
        if not todo:
            return found
        if refresh:
            self.walk = os.urandom(8).hex()
            self.walks = {
                self.state.begin_walk(k.name, class_fingerprint(self.cfg, k), self.walk)
                for k in todo
            }
        bar = tqdm(desc="crawl: discover", unit="page", disable=not self.progress, leave=False)
        best: dict[str, dict[str, Candidate]] = {k.name: {} for k in todo}

        def offer(candidate: Candidate) -> None:
            known = best[candidate.class_name].get(candidate.url)
            if known is None or candidate.order < known.order:
                best[candidate.class_name][candidate.url] = candidate

        for klass in todo:
            self._urls_source(klass, offer)
        self._api_sources(todo, offer, bar)
        self._pages_source(todo, offer, bar)
        bar.close()
        for klass in todo:
            ordered = sorted(best[klass.name].values(), key=lambda c: c.order)
            if refresh:
                # appended after the known ones, whatever their place on the page: selection
                # takes the first `cap` images in list order, so kept images stay selected
                old = previous[klass.name]
                known = {c.url for c in old}
                new = [c for c in ordered if c.url not in known]
                self.added[klass.name] = len(new)
                ordered = old + new
                self.state.end_walk(klass.name)
            self.state.save_candidates(klass.name, class_fingerprint(self.cfg, klass), ordered)
            found[klass.name] = ordered
        return found

    def _default(self, klass: ClassConfig, value: str, key: str) -> str:
        return value or getattr(klass, key) or ""

    def _urls_source(self, klass: ClassConfig, offer: Callable[[Candidate], None]) -> None:
        if klass.image_urls is None:
            return
        index = SOURCE_ORDER.index("urls")
        for i, row in enumerate(read_url_list(klass.image_urls)):
            url = normalize_url(self.urls.live(row["url"]))
            if url is None:
                continue
            offer(
                Candidate(
                    class_name=klass.name,
                    url=self.urls.stored(url),
                    page_url=row.get("page_url", ""),
                    source="urls",
                    license=self._default(klass, row.get("license", ""), "license"),
                    attribution=self._default(
                        klass, row.get("attribution") or row.get("author", ""), "attribution"
                    ),
                    order=(index, i),
                )
            )

    def _api_sources(
        self, classes: list[ClassConfig], offer: Callable[[Candidate], None], bar: tqdm
    ) -> None:
        requests_: list[ApiRequest] = []
        for klass in classes:
            searches: list[tuple[str, dict[str, Any]]] = []
            commons_search = klass.commons_search
            openverse_query = klass.openverse_query
            if klass.query:
                if "wikimedia_commons" in self.cfg.query_sources and commons_search is None:
                    commons_search = klass.query
                if "openverse" in self.cfg.query_sources and openverse_query is None:
                    openverse_query = klass.query
            if klass.commons_category:
                searches.append(
                    ("wikimedia_commons", wikimedia_params(self.cfg, klass.commons_category, None))
                )
            if commons_search:
                searches.append(
                    ("wikimedia_commons", wikimedia_params(self.cfg, None, commons_search))
                )
            if openverse_query:
                searches.append(("openverse", openverse_params(self.cfg, openverse_query)))
            for n, (source, params) in enumerate(searches):
                requests_.append(ApiRequest(klass.name, source, n, 1, params))
        if not requests_:
            return
        by_name = {k.name: k for k in classes}
        counts: Counter[tuple[str, int]] = Counter()

        def submit(request: ApiRequest) -> None:
            base = (
                self.cfg.wikimedia_api
                if request.source == "wikimedia_commons"
                else (self.cfg.openverse_api)
            )
            url = base + ("&" if "?" in base else "?") + urlencode(sorted(request.params.items()))
            key = self.urls.stored(url)
            known = self._known(key)
            if known is not None:
                handle(request, known)
            else:
                self.scheduler.add(Job("api", self.urls.live(url), (request, key)))

        def handle(request: ApiRequest, row: dict[str, Any]) -> None:
            bar.update(1)
            if not row["ok"]:
                return  # recorded in the state; the report counts it
            payload = row["payload"]
            if request.source == "wikimedia_commons":
                items, next_params = parse_wikimedia(payload, request, self.cfg.content_types)
            else:
                items, next_params = parse_openverse(payload, request)
            klass = by_name[request.class_name]
            source_index = SOURCE_ORDER.index(request.source)
            for i, item in enumerate(items):
                url = normalize_url(self.urls.live(item["image"]))
                if url is None:
                    continue
                offer(
                    Candidate(
                        class_name=klass.name,
                        url=self.urls.stored(url),
                        page_url=item["page_url"],
                        source=request.source,
                        license=self._default(klass, item["license"], "license"),
                        attribution=self._default(klass, item["attribution"], "attribution"),
                        order=(source_index, request.source_index, request.page, i),
                    )
                )
            counts[(klass.name, request.source_index)] += len(items)
            cap = class_cap(self.cfg, klass)
            # fetch twice the cap in candidates: enough for failures and duplicates
            if next_params and (cap == 0 or counts[(klass.name, request.source_index)] < 2 * cap):
                submit(
                    ApiRequest(
                        klass.name,
                        request.source,
                        request.source_index,
                        request.page + 1,
                        next_params,
                    )
                )

        def on_done(job: Job, outcome: Outcome) -> None:
            request, key = job.data
            row = {
                "key": key,
                "ok": outcome.kind == "done",
                "reason": outcome.reason,
                "status": outcome.status,
                "payload": outcome.result,
            }
            self._record_page(row)
            handle(request, row)

        for request in requests_:
            submit(request)
        self.scheduler.run(on_done)

    def _pages_source(
        self, classes: list[ClassConfig], offer: Callable[[Candidate], None], bar: tqdm
    ) -> None:
        """Breadth-first, one level at a time, so each page's depth and order key is fixed."""
        index = SOURCE_ORDER.index("pages")
        # per class: stored page URL -> order key, for pages at the current level
        level: dict[str, dict[str, tuple[int, ...]]] = {}
        visited: dict[str, set[str]] = {}
        for klass in classes:
            level[klass.name] = {}
            visited[klass.name] = set()
            for i, seed in enumerate(klass.seeds):
                url = normalize_url(self.urls.live(seed))
                if url is None:
                    raise StageError(f"classes.{klass.name}.seeds: {seed!r} is not an http(s) URL")
                stored = self.urls.stored(url)
                level[klass.name].setdefault(stored, (index, i))
                visited[klass.name].add(stored)
        by_name = {k.name: k for k in classes}
        for depth in itertools.count():
            wanted = {url for pages in level.values() for url in pages}
            if not wanted:
                break
            missing = sorted(url for url in wanted if self._known(url) is None)
            for url in missing:
                self.scheduler.add(Job("page", self.urls.live(url), url))

            def on_done(job: Job, outcome: Outcome) -> None:
                row = {
                    "key": job.data,
                    "ok": outcome.kind == "done",
                    "reason": outcome.reason,
                    "status": outcome.status,
                    "items": outcome.result or [],
                }
                self._record_page(row)
                bar.update(1)

            self.scheduler.run(on_done)
            next_level: dict[str, dict[str, tuple[int, ...]]] = {}
            for name, pages in level.items():
                klass = by_name[name]
                max_depth = klass.max_depth if klass.max_depth is not None else self.cfg.max_depth
                next_level[name] = {}
                for page_url, key in sorted(pages.items(), key=lambda kv: kv[1]):
                    row = self.state.pages[page_url]
                    if not row["ok"]:
                        continue
                    for i, item in enumerate(row["items"]):
                        child_key = (*key, i)
                        if "image" in item:
                            offer(
                                Candidate(
                                    class_name=name,
                                    url=item["image"],
                                    page_url=page_url,
                                    source="pages",
                                    license=self._default(
                                        klass, item.get("license", ""), "license"
                                    ),
                                    attribution=self._default(
                                        klass, item.get("attribution", ""), "attribution"
                                    ),
                                    # breadth first: a seed's own images before
                                    # those of the pages it links to
                                    order=(index, depth, *child_key[1:]),
                                )
                            )
                        elif (
                            depth < max_depth
                            and item["link"] not in visited[name]
                            and follow_allowed(klass, item["link"])
                        ):
                            known = next_level[name].get(item["link"])
                            if known is None or child_key < known:
                                next_level[name][item["link"]] = child_key
                visited[name] |= set(next_level[name])
            level = next_level


# --------------------------------------------------------------------------------------------
# Phase 2: fetching images


def decode_image(body: bytes) -> tuple[str, int, int]:
    """Return (file extension, width, height) of image bytes; raises _Failure if they do not
    decode completely."""
    try:
        with Image.open(io.BytesIO(body)) as image:
            image.load()  # verify() misses truncated pixel data; load() decodes it all
            return FORMAT_EXTENSIONS.get(
                image.format or "", (image.format or "img").lower()
            ), *image.size
    except Exception:  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise _Failure("not_an_image") from None


class Fetcher:
    """Downloads candidates in order until each class has its cap of distinct images."""

    def __init__(
        self,
        cfg: CrawlConfig,
        state: State,
        urls: UrlMap,
        http: Http,
        out: Path,
        progress: bool = True,
    ) -> None:
        self.cfg, self.state, self.urls, self.http, self.out = cfg, state, urls, http, out
        self.progress = progress
        self.scheduler = Scheduler(cfg, http)
        self.scheduler.handlers = {"image": self._fetch_image}

    def _fetch_image(self, job: Job, response: Response) -> dict[str, Any]:
        candidate: Candidate = job.data
        if self.cfg.obey_x_robots_tag:
            values = header_values(response, "X-Robots-Tag")
            if x_robots_opt_outs(values, self.cfg.user_agent) - {"nofollow"}:
                raise _Failure("x_robots_tag")  # decided before reading a byte of the body
        content_type = _media_type(response.headers.get("Content-Type"))
        if content_type not in self.cfg.content_types:
            raise _Failure("content_type")
        body = self.http.read_body(response, self.cfg.max_bytes)
        extension, width, height = decode_image(body)
        if width < self.cfg.min_width or height < self.cfg.min_height:
            raise _Failure("too_small")
        sha256 = hashlib.sha256(body).hexdigest()
        relative = f"{candidate.class_name}/{sha256}.{extension}"
        target = self.out / relative
        if not target.exists():
            atomic_write_bytes(target, body)
        return {
            "content_type": content_type,
            "bytes": len(body),
            "width": width,
            "height": height,
            "sha256": sha256,
            "path": relative,
        }

    def _expected(self, queue: Iterable[Candidate], cap: int) -> int:
        """How many fetches a class needs if every one succeeds (the progress bar's total)."""
        have: set[str] = set()
        needed = 0
        for candidate in queue:
            if cap and len(have) + needed >= cap:
                break
            known = self.state.fetches.get((candidate.class_name, candidate.url))
            if known is None:
                needed += 1
            elif known["ok"]:
                have.add(known["sha256"])
        return needed

    def run(
        self,
        candidates: dict[str, list[Candidate]],
        caps: dict[str, int],
        mine: Callable[[Candidate], bool],
    ) -> None:
        """Fetch, in order, the candidates ``mine`` accepts until each class reaches its cap."""
        # The candidates considered so far are always a prefix of the class's order (in this
        # shard); a class stops once that prefix holds `cap` distinct images, counting requests
        # in flight as if they will succeed. Fetches recorded by earlier runs count when the
        # prefix reaches them, never before, so a resumed crawl selects what a fresh one would.
        queues = {name: deque(c for c in found if mine(c)) for name, found in candidates.items()}
        shas: dict[str, set[str]] = defaultdict(set)  # distinct images in the considered prefix
        in_flight: Counter[str] = Counter()
        bar = tqdm(
            total=sum(self._expected(q, caps[n]) for n, q in queues.items()),
            desc="crawl: images",
            unit="img",
            disable=not self.progress,
        )
        failures: Counter[str] = Counter()

        def refill(name: str) -> None:
            queue = queues[name]
            cap = caps[name]
            while queue and (cap == 0 or len(shas[name]) + in_flight[name] < cap):
                candidate = queue.popleft()
                known = self.state.fetches.get((name, candidate.url))
                if known is not None:
                    if known["ok"]:
                        shas[name].add(known["sha256"])
                    continue
                in_flight[name] += 1
                self.scheduler.add(Job("image", self.urls.live(candidate.url), candidate))

        def on_done(job: Job, outcome: Outcome) -> None:
            candidate: Candidate = job.data
            name = candidate.class_name
            in_flight[name] -= 1
            row: dict[str, Any] = {
                "class": name,
                "url": candidate.url,
                "ok": outcome.kind == "done",
                "reason": outcome.reason,
                "status": outcome.status,
                "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            if outcome.kind == "done":
                row |= outcome.result
                shas[name].add(row["sha256"])
            else:
                failures[outcome.reason] += 1
            self.state.record_fetch(row)
            bar.update(1)
            bar.set_postfix_str(
                " ".join(f"{n}={len(shas[n])}" for n in queues)
                + (
                    " | failed: " + " ".join(f"{r}={k}" for r, k in failures.most_common(4))
                    if failures
                    else ""
                ),
                refresh=False,
            )
            refill(name)

        for name in queues:
            refill(name)
        self.scheduler.run(on_done)
        bar.close()


# --------------------------------------------------------------------------------------------
# Selection, manifest and report


def select(
    cfg: CrawlConfig, candidates: dict[str, list[Candidate]], fetches: dict[tuple[str, str], dict]
) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """Pick each class's first ``cap`` distinct images in candidate order.

    Returns (manifest rows, report, number of candidates still unfetched before a class's cap
    was reached — nonzero means some shard has not finished).
    """
    by_name = {k.name: k for k in cfg.classes}
    rows: list[dict[str, Any]] = []
    report_classes: dict[str, Any] = {}
    all_failed: Counter[str] = Counter()
    unfinished = 0
    for name, found in candidates.items():
        cap = class_cap(cfg, by_name[name])
        chosen: set[str] = set()
        failed: Counter[str] = Counter()
        duplicates = unused = 0
        for candidate in found:
            if cap and len(chosen) >= cap:
                unused += 1
                continue
            fetch = fetches.get((name, candidate.url))
            if fetch is None:
                unfinished += 1
                continue
            if not fetch["ok"]:
                failed[fetch["reason"]] += 1
                continue
            if fetch["sha256"] in chosen:
                duplicates += 1
                continue
            chosen.add(fetch["sha256"])
            rows.append(
                {
                    "class": name,
                    "source": candidate.source,
                    "url": candidate.url,
                    "page_url": candidate.page_url,
                    "license": candidate.license,
                    "attribution": candidate.attribution,
                    "status": fetch["status"],
                    "content_type": fetch["content_type"],
                    "bytes": fetch["bytes"],
                    "width": fetch["width"],
                    "height": fetch["height"],
                    "sha256": fetch["sha256"],
                    "path": fetch["path"],
                    "fetched_at": fetch["fetched_at"],
                }
            )
        all_failed.update(failed)
        report_classes[name] = {
            "candidates": len(found),
            "saved": len(chosen),
            "duplicates": duplicates,
            "not_needed": unused,
            "failed": dict(sorted(failed.items())),
        }
    rows.sort(key=lambda r: (r["class"], r["path"]))
    report = {
        "saved": len(rows),
        "classes": report_classes,
        "failed": dict(sorted(all_failed.items())),
    }
    return rows, report, unfinished


# --------------------------------------------------------------------------------------------
# Entry points


@contextlib.contextmanager
def _url_map(cfg: CrawlConfig) -> Iterator[UrlMap]:
    uses_demo = any(seed.startswith(DEMO) for k in cfg.classes for seed in k.seeds) or any(
        k.image_urls and DEMO in Path(k.image_urls).read_text(encoding="utf-8", errors="replace")
        for k in cfg.classes
        if k.image_urls and Path(k.image_urls).exists()
    )
    if uses_demo and cfg.serve_demo_site is None:
        raise StageError("classes: seeds use {demo} but crawl.serve_demo_site is not set")
    if cfg.serve_demo_site is None:
        yield UrlMap()
        return
    with serve_directory(cfg.serve_demo_site) as base:
        yield UrlMap(base)


def _pick_classes(cfg: CrawlConfig, classes: Iterable[str] | None) -> list[ClassConfig]:
    if classes is None:
        return list(cfg.classes)
    wanted = list(classes)
    known = {k.name: k for k in cfg.classes}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise StageError(f"classes: no class named {', '.join(unknown)} in params.yaml")
    return [known[name] for name in wanted]


def discover(
    cfg: CrawlConfig,
    out: Path = paths.RAW,
    classes: Iterable[str] | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> dict[str, int]:
    """Run phase 1 only (for a fan-out flow: one task per class before the host shards).

    With ``refresh`` the sources are walked again and new URLs appended (see the module
    docstring); the host shards then fetch them with ``crawl(..., host_shard=...)``.
    Returns the number of candidates per class; the lists are kept in ``<out>/.state``.
    Raises StageError for bad sources (missing URL list, {demo} without a demo site).
    """
    chosen = _pick_classes(cfg, classes)
    shard_id = "discover-" + "-".join(k.name for k in chosen)
    forget_state_if_demo_changed(cfg, Path(out))
    state = State(Path(out), shard_id)
    with _url_map(cfg) as urls, contextlib.closing(state):
        found = Discovery(cfg, state, urls, Http(cfg), progress).run(chosen, refresh)
    return {name: len(found[name]) for name in found}


def crawl(
    cfg: CrawlConfig,
    out: Path = paths.RAW,
    report: Path = paths.CRAWL_REPORT,
    *,
    classes: Iterable[str] | None = None,
    host_shard: tuple[int, int] | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> CrawlSummary:
    """Crawl images for every class into ``out``; write the manifest and ``report``.

    With ``classes`` (a subset of names) and/or ``host_shard=(index, count)`` it crawls only that
    part, writing its own state files, and leaves the manifest to ``merge_shards``; shards of one
    crawl may run at the same time in different processes. Reruns resume: nothing recorded as
    done is fetched again. ``refresh`` walks the sources again for new images (module
    docstring); with host shards, call ``discover(..., refresh=True)`` once instead.

    Returns a CrawlSummary. Raises StageError naming the params key, file or URL for bad input.
    """
    started = time.monotonic()
    out = Path(out)
    partial = classes is not None or host_shard is not None
    chosen = _pick_classes(cfg, classes)
    if host_shard is not None:
        index, count = host_shard
        if not 0 <= index < count:
            raise StageError(f"host_shard: index must be in 0..{count - 1}, got {index}")
        if refresh:
            # every shard would walk the class's sources again, each appending to one list
            raise StageError(
                "refresh: not with host_shard; run discover(..., refresh=True) once per class, "
                "then the host shards without refresh"
            )
    shard_id = "all"
    if partial:
        shard_id = "-".join(k.name for k in chosen) if classes is not None else "all"
        if host_shard is not None:
            shard_id += f".host{host_shard[0]}of{host_shard[1]}"
    forget_state_if_demo_changed(cfg, out)
    state = State(out, shard_id)
    http = Http(cfg)

    def mine(candidate: Candidate) -> bool:
        return host_shard is None or host_shard_of(candidate.url, host_shard[1]) == host_shard[0]

    with _url_map(cfg) as urls, contextlib.closing(state):
        discovery = Discovery(cfg, state, urls, http, progress)
        candidates = discovery.run(chosen, refresh)
        caps = {k.name: class_cap(cfg, k) for k in chosen}
        Fetcher(cfg, state, urls, http, out, progress).run(candidates, caps, mine)
    pages = sum(1 for row in state.pages.values() if row["ok"])
    if partial:
        rows, _, _ = select(cfg, candidates, state.fetches)
        saved = Counter(r["class"] for r in rows)
        failed = Counter(
            row["reason"]
            for (name, _), row in state.fetches.items()
            if not row["ok"] and name in candidates
        )
        return CrawlSummary(
            saved={k.name: saved[k.name] for k in chosen},
            failed=dict(failed),
            pages=pages,
            requests=http.requests,
            elapsed_s=time.monotonic() - started,
            complete=False,
            new_candidates=sum(discovery.added.values()) if refresh else None,
        )
    summary = _finish(cfg, out, report, candidates, state)
    return CrawlSummary(
        saved=summary["saved"],
        failed=summary["failed"],
        pages=pages,
        requests=http.requests,
        elapsed_s=time.monotonic() - started,
        new_candidates=sum(discovery.added.values()) if refresh else None,
    )


def merge_shards(
    cfg: CrawlConfig, out: Path = paths.RAW, report: Path = paths.CRAWL_REPORT
) -> CrawlSummary:
    """Combine the state of every shard into ``<out>/manifest.jsonl`` and ``report``.

    Returns a CrawlSummary (no requests are made). Raises StageError if a class has not been
    discovered or a shard has not finished the candidates its class still needs.
    """
    started = time.monotonic()
    out = Path(out)
    state = State(out, "merge")
    candidates = {}
    for klass in cfg.classes:
        found = state.load_candidates(klass.name, class_fingerprint(cfg, klass))
        if found is None:
            raise StageError(
                f"{state.candidates_path(klass.name)}: class {klass.name!r} has no finished "
                "discovery for the current params; run its crawl shard first"
            )
        candidates[klass.name] = found
    summary = _finish(cfg, out, report, candidates, state)
    return CrawlSummary(
        saved=summary["saved"],
        failed=summary["failed"],
        pages=sum(1 for row in state.pages.values() if row["ok"]),
        requests=0,
        elapsed_s=time.monotonic() - started,
    )


def _finish(
    cfg: CrawlConfig,
    out: Path,
    report: Path,
    candidates: dict[str, list[Candidate]],
    state: State,
) -> dict[str, Any]:
    rows, report_data, unfinished = select(cfg, candidates, state.fetches)
    if unfinished:
        raise StageError(
            f"{out / '.state'}: {unfinished} candidates are not fetched yet; finish every shard "
            "(or run the crawl without shards) before merging"
        )
    write_jsonl(out / "manifest.jsonl", rows)
    # image files no state row knows (left by a crawl whose state was reset) only confuse readers
    known = {row["path"] for row in state.fetches.values() if row["ok"]}
    for name in candidates:
        for path in (out / name).glob("*"):
            if path.is_file() and f"{name}/{path.name}" not in known:
                path.unlink()
    failed_pages: Counter[str] = Counter(
        row["reason"] for row in state.pages.values() if not row["ok"]
    )
    report_data["pages"] = {
        "fetched": sum(1 for row in state.pages.values() if row["ok"]),
        "failed": dict(sorted(failed_pages.items())),
    }
    atomic_write_json(report, report_data)
    return {
        "saved": {name: report_data["classes"][name]["saved"] for name in candidates},
        "failed": report_data["failed"],
    }
