"""HTTP transport: one urllib3 client, one GET per call, streamed bodies, address checks.

Consumes a live URL and a function that reads a 200 answer; produces an Outcome (done, failed,
retry or redirect). It knows nothing of robots.txt, host spacing or retries: the scheduler
decides when a request is made and what happens after.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import urllib3

from pipeline.config import CrawlConfig
from pipeline.crawl.watchdog import WATCHED_POOLS, RequestWatchdog

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
WHOLE_ANSWER_TIMEOUTS = 6  # a whole answer (headers and body) gets this many timeout_s

Response = urllib3.BaseHTTPResponse
Reader = Callable[[Response], Any]


@dataclass(frozen=True)
class TransportSettings:
    user_agent: str
    timeout_s: float
    max_per_host: int  # kept-alive connections per host
    allow_private_addresses: bool

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> TransportSettings:
        return cls(cfg.user_agent, cfg.timeout_s, cfg.max_per_host, cfg.allow_private_addresses)


@dataclass(frozen=True)
class Outcome:
    """What one request came to: done (with a result), failed, retry later, or redirect.

    ``reason`` is "kind" or "kind: what came back" (``content_type: text/html``); reports count
    by the kind and list the whole reason per URL.
    """

    kind: str  # "done" | "failed" | "retry" | "redirect"
    reason: str = ""
    status: int | None = None
    result: Any = None
    retry_after: str | None = None  # the Retry-After header of a 429/503 answer, unparsed
    location: str = ""


def reason_kind(reason: str) -> str:
    """``"content_type: text/html"`` → ``"content_type"``: what reports count by."""
    return reason.partition(":")[0].strip()


class FetchFailure(Exception):
    """Raised by a reader to fail the request with ``reason`` (or, with ``retry``, retry it)."""

    def __init__(self, reason: str, status: int | None = None, retry: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.status, self.retry = reason, status, retry


def media_type(value: str | None) -> str:
    return (value or "").split(";")[0].strip().lower()


def header_values(response: Response, name: str) -> list[str]:
    """Every value of a header, even one sent more than once."""
    return list(response.headers.getlist(name))


class Transport:
    """Thread-safe HTTP client over one urllib3 ``PoolManager``: keep-alive connections reused
    per host (at most ``max_per_host`` each), address checks, streamed bodies with a size cap.

    urllib3 directly rather than requests: requests adds ~2 ms of CPU per request (measured in
    bench/crawl_throughput.py), which on 2 cores is most of a crawl's time. Proxies come from
    the usual environment variables (HTTP(S)_PROXY, NO_PROXY), as with requests.
    """

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self._addresses: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self.requests = 0
        options: dict[str, Any] = {
            "num_pools": 256,
            "maxsize": settings.max_per_host,
            "retries": False,  # the scheduler retries: it reschedules instead of sleeping
            "timeout": urllib3.Timeout(connect=settings.timeout_s, read=settings.timeout_s),
            "headers": {"User-Agent": settings.user_agent},
        }
        self._direct = urllib3.PoolManager(**options)
        self._proxies = {
            scheme: urllib3.ProxyManager(url, **options)
            for scheme, url in urllib.request.getproxies_environment().items()
            if scheme in ("http", "https")
        }
        for manager in (self._direct, *self._proxies.values()):
            manager.pool_classes_by_scheme = WATCHED_POOLS
        self.watchdog = RequestWatchdog()

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        if proxy is None or urllib.request.proxy_bypass_environment(parts.hostname or ""):
            return self._direct
        return proxy

    def address_problem(self, host: str) -> str | None:
        """Return a failure reason if ``host`` resolves to an address we must not contact."""
        if self.settings.allow_private_addresses:
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

    def perform(self, url: str, read: Reader, *, any_status: bool = False) -> Outcome:
        """GET ``url``; ``read`` turns the answer into the result. Never raises.

        ``read`` sees only 200 answers, or with ``any_status`` every final answer (robots.txt:
        a 404 is an answer, not a failure). Redirects and retryable statuses come back as such.
        """
        problem = self.address_problem(urlsplit(url).hostname or "")
        if problem:
            return Outcome("failed", problem)
        with self._lock:
            self.requests += 1
        limit_s = WHOLE_ANSWER_TIMEOUTS * self.settings.timeout_s
        with self.watchdog.watch(limit_s) as watch:
            outcome = self._request(url, read, any_status)
        if watch.fired:
            # the watchdog cut the socket: whatever came after is the timeout's doing (even a
            # "complete" answer: http.client takes a cut header block for the end of headers)
            reason = f"timeout: no complete answer within {limit_s:g} s"
            return Outcome("retry", reason, status=outcome.status)
        return outcome

    def _request(self, url: str, read: Reader, any_status: bool) -> Outcome:
        try:
            response = self._manager(url).request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.NewConnectionError as exc:  # a TimeoutError subclass
            return Outcome("retry", f"connection_error: {_connect_problem(exc)}")
        except urllib3.exceptions.TimeoutError:
            return Outcome("retry", "timeout")
        except urllib3.exceptions.LocationParseError:
            return Outcome("failed", "bad_url")
        except urllib3.exceptions.HTTPError as exc:
            return Outcome("retry", f"connection_error: {type(exc).__name__}")
        try:
            return self._answer(response, read, any_status)
        finally:
            _release(response)

    def _answer(self, response: Response, read: Reader, any_status: bool) -> Outcome:
        status = response.status
        try:
            if status in REDIRECT_STATUSES and response.headers.get("Location"):
                return Outcome("redirect", status=status, location=response.headers["Location"])
            if status in RETRY_STATUSES:
                retry_after = None
                if status in RETRY_AFTER_STATUSES:
                    retry_after = response.headers.get("Retry-After")
                return Outcome("retry", f"http_{status}", status=status, retry_after=retry_after)
            if status != 200 and not any_status:
                return Outcome("failed", f"http_{status}", status=status)
            return Outcome("done", status=status, result=read(response))
        except FetchFailure as failure:
            kind = "retry" if failure.retry else "failed"
            return Outcome(kind, failure.reason, status=failure.status or status)

    def read_body(self, response: Response, max_bytes: int, truncate: bool = False) -> bytes:
        """Read the body, refusing (or with ``truncate``, cutting) anything over ``max_bytes``.

        Raises FetchFailure("too_large: ...") before reading when Content-Length already says
        too much, and FetchFailure("truncated", retry=True) when the connection drops mid-body.
        """
        declared = response.headers.get("Content-Length", "")
        if not truncate and declared.isdigit() and int(declared) > max_bytes:
            raise FetchFailure(f"too_large: {declared} bytes declared, limit {max_bytes}")
        chunks: list[bytes] = []
        size = 0
        # a server dribbling bytes forever must not pin a worker: bound the whole download
        deadline = time.monotonic() + WHOLE_ANSWER_TIMEOUTS * self.settings.timeout_s
        try:
            for chunk in response.stream(64 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    response.close()
                    if truncate:
                        break
                    raise FetchFailure(f"too_large: over {max_bytes} bytes sent")
                if time.monotonic() > deadline:
                    response.close()
                    raise FetchFailure("timeout: body still arriving", retry=True)
        except urllib3.exceptions.TimeoutError:
            raise FetchFailure("timeout", retry=True) from None
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.IncompleteRead):
            raise FetchFailure(
                f"truncated: connection closed after {size} bytes", retry=True
            ) from None
        except urllib3.exceptions.HTTPError as exc:
            raise FetchFailure(f"connection_error: {type(exc).__name__}", retry=True) from None
        return b"".join(chunks)[: max_bytes if truncate else None]


def _connect_problem(exc: urllib3.exceptions.NewConnectionError) -> str:
    """What stopped a connection, in words: ``connection refused``, ``name not resolved``."""
    if isinstance(exc, urllib3.exceptions.NameResolutionError):
        return "name not resolved"
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return type(cause or exc).__name__


def _release(response: Response) -> None:
    # an unread body must not go back to the pool: drain a small one (keeping the connection
    # alive), drop the connection under a large or unknown one
    if not response.isclosed():
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) <= 65536:
            response.drain_conn()
        else:
            response.close()
    response.release_conn()
