"""The crawl-wide time limits: a deadline and a no-progress watchdog.

Consumes ``crawl.deadline_s`` and ``crawl.stall_timeout_s`` and, from the scheduler, the
moments requests start or finish and a description of what it is waiting on; produces
CrawlStopped when either limit passes, with a message naming the param and what the crawl was
waiting for. One CrawlClock serves every phase of a crawl, so the deadline counts from the
crawl's start. The stage catches CrawlStopped, writes what it has and fails (see stage.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.config import CrawlConfig


class CrawlStopped(Exception):
    """A crawl-wide limit passed; ``str()`` names the param and what the crawl waited on."""


@dataclass(frozen=True)
class LimitSettings:
    deadline_s: float  # 0: none
    stall_timeout_s: float  # 0: none

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> LimitSettings:
        return cls(cfg.deadline_s, cfg.stall_timeout_s)


class CrawlClock:
    """When the crawl must end, and how long it has gone without progress.

    Progress is a request starting or finishing. The no-progress clock does not run while the
    scheduler knowingly waits on a timer it was given (Retry-After, backoff, Crawl-delay): those
    waits are bounded by ``max_retry_after_s`` and the deadline; the watchdog is for waits on
    nothing (a request that never ends, work that can never start).
    """

    def __init__(self, settings: LimitSettings, now: float | None = None) -> None:
        self.settings = settings
        started = time.monotonic() if now is None else now
        self.deadline = started + settings.deadline_s if settings.deadline_s else math.inf
        self.last_progress = started

    def progress(self, now: float) -> None:
        self.last_progress = now

    def due(self) -> float:
        """The monotonic time at which the next limit passes (inf if none can)."""
        stall = self.settings.stall_timeout_s
        return min(self.deadline, self.last_progress + stall if stall else math.inf)

    def check(self, now: float, waiting_on: Callable[[], str]) -> None:
        """Raise CrawlStopped if a limit has passed; ``waiting_on()`` says for what."""
        if now >= self.deadline:
            raise CrawlStopped(
                f"crawl.deadline_s: the crawl reached its deadline of "
                f"{self.settings.deadline_s:g} s; {waiting_on()}"
            )
        stall = self.settings.stall_timeout_s
        if stall and now - self.last_progress >= stall:
            raise CrawlStopped(
                f"crawl.stall_timeout_s: nothing started or finished for {stall:g} s; "
                f"{waiting_on()}"
            )
