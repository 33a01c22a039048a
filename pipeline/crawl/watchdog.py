"""A time limit on each whole request, enforced by shutting its socket.

Consumes the requests the transport makes (each worker thread registers its request while it
runs, and urllib3 hands over the socket once the request is sent); produces interruptions: a
request still answering after its limit has its socket shut down, so the blocked read returns
and the transport reports a timeout. urllib3's timeouts bound each read, not the answer, so a
server that dribbles its status line, headers or body a byte at a time could otherwise hold a
worker (and the crawl that waits for it) for hours. ``interrupt_all`` frees every worker at
once when a crawl stops early.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()  # the Watch of the request this thread is making, if any


@dataclass(eq=False)
class Watch:
    """One running request: when it must be over, its socket once known, whether it was cut."""

    deadline: float
    sock: socket.socket | None = None
    fired: bool = False

    def attach(self, sock: socket.socket | None) -> None:
        self.sock = sock
        if self.fired:  # cut before the socket was known
            self._shut()

    def fire(self) -> None:
        self.fired = True
        self._shut()

    def _shut(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


class RequestWatchdog:
    """Cuts requests that outlive their limit; one helper thread, alive only while needed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, limit_s: float) -> Iterator[Watch]:
        """Watch the request the calling thread makes inside the ``with`` block."""
        watch = Watch(time.monotonic() + limit_s)
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="crawl-watchdog", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        _current.watch = watch
        try:
            yield watch
        finally:
            _current.watch = None
            with self._cond:
                self._watches.discard(watch)
                self._cond.notify()  # the helper thread ends once nothing is watched

    def interrupt_all(self) -> None:
        """Cut every request in progress (a crawl that stops early frees its workers)."""
        with self._cond:
            for watch in self._watches:
                watch.fire()

    def _run(self) -> None:
        with self._cond:
            while self._watches:
                now = time.monotonic()
                waiting = [w for w in self._watches if not w.fired]
                for watch in waiting:
                    if watch.deadline <= now:
                        watch.fire()
                pending = [w.deadline for w in waiting if not w.fired]
                self._cond.wait(min(pending) - now if pending else None)
            self._thread = None


def _attach_socket(connection: HTTPConnection) -> None:
    watch = getattr(_current, "watch", None)
    if watch is not None:
        watch.attach(connection.sock)


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _attach_socket(self)
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        _attach_socket(self)
        return super().getresponse(*args, **kwargs)


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


# for PoolManager.pool_classes_by_scheme: connections whose socket a Watch can cut
WATCHED_POOLS: dict[str, type[HTTPConnectionPool]] = {
    "http": _WatchedHTTPPool,
    "https": _WatchedHTTPSPool,
}
