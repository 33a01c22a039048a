"""The job scheduler: per-host queues, a thread pool, retries and redirects.

Consumes Jobs (one request each, with the data its handler needs afterwards); produces one
final Outcome per job, handed to ``on_done`` on the calling thread. Politeness decides when a
host may be asked; the transport makes the request; the scheduler only orders the work.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

from pipeline.config import CrawlConfig
from pipeline.crawl.limits import CrawlClock, LimitSettings
from pipeline.crawl.politeness import (
    ROBOTS_MAX_BYTES,
    WAIT,
    Politeness,
    PolitenessSettings,
    RobotsPolicy,
)
from pipeline.crawl.transport import Outcome, Response, Transport, TransportSettings
from pipeline.crawl.urls import normalize_url, origin_of


@dataclass(frozen=True)
class SchedulerSettings:
    concurrency: int
    retries: int
    backoff_s: float
    max_redirects: int

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> SchedulerSettings:
        return cls(cfg.concurrency, cfg.retries, cfg.backoff_s, cfg.max_redirects)


@dataclass
class Job:
    """One HTTP request the scheduler must make; ``data`` is what the caller needs afterwards."""

    kind: str  # "robots" | "page" | "api" | "image"
    url: str  # live URL of the next request (changes on redirect)
    data: Any
    attempt: int = 0
    hops: tuple[str, ...] = ()


Handler = Callable[[Job, Response], Any]  # runs on a worker thread; turns a 200 into a result
OnDone = Callable[[Job, Outcome], None]  # runs on the calling thread


InFlight = dict[Future[Outcome], Job]  # requests running, with their jobs


def _no_handler(job: Job, response: Response) -> Any:
    return None


class Scheduler:
    """Runs jobs on a thread pool, never more than ``max_per_host`` in flight per host.

    Jobs wait in per-host queues; the dispatcher (the calling thread) starts one only when its
    host has a free slot and its delay has passed, so no worker ever sleeps on a busy host and a
    slow host never starves the others. Retries and Retry-After reschedule the job (and, for
    Retry-After, the whole host); redirects are re-dispatched hop by hop so every hop gets the
    scheme, address and robots.txt checks. The crawl's clock (limits.py) ends the run early.
    """

    def __init__(
        self,
        settings: SchedulerSettings,
        transport: Transport,
        politeness: Politeness,
        handlers: Mapping[str, Handler],
        clock: CrawlClock,
    ) -> None:
        self.settings = settings
        self.transport = transport
        self.politeness = politeness
        self.handlers = dict(handlers)
        self.clock = clock
        self.queues: dict[str, deque[Job]] = {}
        self.delayed: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._timed_wait = False  # the last dispatch left a host waiting on its spacing timer

    def add(self, job: Job) -> None:
        queue = self.queues.setdefault(origin_of(job.url), deque())
        if job.kind == "robots":
            # every other job of the host waits for it, so it heads the queue, also when it
            # comes back from a retry or a redirect (queued behind them it would wait forever)
            queue.appendleft(job)
        else:
            queue.append(job)

    def _verdict(self, origin: str, job: Job) -> str | None:
        """WAIT while robots.txt is unknown (queueing its request first), a refusal, or None."""
        # API calls follow the API's own terms and rate limits, not robots.txt, which is for
        # crawlers of pages (Wikimedia's disallows /w/ for crawlers, API included)
        verdict = self.politeness.verdict(origin, job.url, job.kind not in ("robots", "api"))
        if verdict == WAIT and self.politeness.robots_requested(origin):
            self.add(Job("robots", origin + "/robots.txt", origin))
        return verdict

    def _on_robots(self, job: Job, outcome: Outcome) -> None:
        if outcome.kind == "done":
            status, body = outcome.result
            policy = RobotsPolicy.from_answer(status, body)
        elif outcome.reason in ("private_address", "bad_scheme"):
            # the host itself is off limits; let each request fail with that reason instead
            policy = RobotsPolicy.from_answer(404, b"")
        else:
            policy = RobotsPolicy.unreachable(outcome.reason.removeprefix("connection_error: "))
        self.politeness.learn_robots(job.data, policy)

    def _retry(self, job: Job, outcome: Outcome) -> bool:
        """Reschedule a retryable outcome; False once the job's retries are spent."""
        if job.attempt >= self.settings.retries:
            return False
        now = time.monotonic()
        delay = self.politeness.retry_delay(origin_of(job.url), outcome.retry_after, now)
        if delay is None:
            delay = self.settings.backoff_s * 2**job.attempt * random.uniform(0.5, 1.5)
        job.attempt += 1
        heapq.heappush(self.delayed, (now + delay, next(self._seq), job))
        return True

    def _redirect(self, job: Job, outcome: Outcome) -> Outcome | None:
        """Queue the next hop of a redirect; return the failure if it may not be followed."""
        target = normalize_url(urljoin(job.url, outcome.location))
        if target is None:
            return Outcome("failed", "bad_scheme", status=outcome.status)
        if target in job.hops or target == job.url:
            return Outcome("failed", "redirect_loop", status=outcome.status)
        if len(job.hops) >= self.settings.max_redirects:
            return Outcome("failed", "too_many_redirects", status=outcome.status)
        job.hops = (*job.hops, job.url)
        job.url = target
        self.add(job)
        return None

    def _settle(self, job: Job, outcome: Outcome, on_done: OnDone) -> None:
        """Turn retry/redirect outcomes into new attempts; pass final ones on."""
        if outcome.kind == "retry":
            if self._retry(job, outcome):
                return
            outcome = replace(outcome, kind="failed", retry_after=None)
        if outcome.kind == "redirect":
            failure = self._redirect(job, outcome)
            if failure is None:
                return
            outcome = failure
        if job.kind == "robots":
            self._on_robots(job, outcome)
        else:
            on_done(job, outcome)

    def _submit(self, pool: ThreadPoolExecutor, job: Job) -> Future[Outcome]:
        if job.kind == "robots":
            read = functools.partial(_read_robots, self.transport)
            return pool.submit(self.transport.perform, job.url, read, any_status=True)
        handler = self.handlers.get(job.kind, _no_handler)
        return pool.submit(self.transport.perform, job.url, functools.partial(handler, job))

    def _dispatch(
        self, pool: ThreadPoolExecutor, in_flight: InFlight, on_done: OnDone, now: float
    ) -> float:
        """Start every job whose host is ready; return when the next one may become ready."""
        next_event = self.delayed[0][0] if self.delayed else now + 1.0
        self._timed_wait = False
        for origin in list(self.queues):
            queue = self.queues[origin]
            gate = self.politeness.gate(origin)
            while queue and len(in_flight) < self.settings.concurrency:
                ready = gate.ready_at(now)
                if ready is None:
                    break
                if ready > now:
                    next_event = min(next_event, ready)
                    self._timed_wait = True
                    break
                job = queue[0]
                verdict = self._verdict(origin, job)
                if verdict == WAIT:
                    if queue[0] is job:  # robots.txt already in flight
                        break
                    continue  # robots.txt job now heads the queue
                queue.popleft()
                if verdict is not None:
                    on_done(job, Outcome("failed", verdict))
                    continue
                gate.start(now)
                self.clock.progress(now)
                in_flight[self._submit(pool, job)] = job
            if not queue and self.queues.get(origin) is queue:
                del self.queues[origin]
        return next_event

    def run(self, on_done: OnDone) -> None:
        """Run every queued job (and any ``on_done`` adds) to a final outcome.

        Raises CrawlStopped when the crawl's deadline or no-progress limit passes: requests in
        flight are cut and their jobs, like those still queued, get no outcome (nothing is
        recorded for them, so a rerun makes them again).
        """
        in_flight: InFlight = {}
        self.clock.progress(time.monotonic())  # local work between phases is not a stall
        pool = ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="crawl")
        try:
            while self.queues or self.delayed or in_flight:
                self._step(pool, in_flight, on_done)
        except BaseException:
            self.transport.watchdog.interrupt_all()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()

    def _step(self, pool: ThreadPoolExecutor, in_flight: InFlight, on_done: OnDone) -> None:
        """Start what may start, then wait for a request to finish or the next timer."""
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.add(heapq.heappop(self.delayed)[2])
        next_event = min(self._dispatch(pool, in_flight, on_done, now), self.clock.due())
        if self.delayed or self._timed_wait:
            self.clock.progress(now)  # a wait we were told to make is not a stall
        self.clock.check(now, lambda: self.waiting_on(in_flight, now))
        timeout = max(0.0, next_event - time.monotonic())
        if not in_flight:
            if self.queues or self.delayed:
                time.sleep(min(timeout, 1.0))
            return
        done, _ = wait(in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            job = in_flight.pop(future)
            self.politeness.gate(origin_of(job.url)).finish()
            self.clock.progress(time.monotonic())
            self._settle(job, future.result(), on_done)

    def waiting_on(self, in_flight: InFlight, now: float) -> str:
        """What the run is waiting for, host by host, in words (for CrawlStopped)."""
        parts = []
        running = Counter(_host(job.url) for job in in_flight.values())
        if running:
            parts.append("waiting on " + _per_host(running))
        if self.delayed:
            retrying = Counter(_host(job.url) for _, _, job in self.delayed)
            soonest = max(0.0, self.delayed[0][0] - now)
            parts.append(
                f"{_per_host(retrying)} waiting to be retried after a Retry-After or backoff "
                f"(the next in {soonest:.0f} s)"
            )
        queued = Counter({_host(origin): len(q) for origin, q in self.queues.items() if q})
        if queued:
            parts.append(f"{_per_host(queued)} queued")
        return "; ".join(parts) or "nothing was left to wait on"


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _per_host(counts: Counter[str]) -> str:
    """``3 requests to host a.org, 1 request to host b.org``."""
    return ", ".join(
        f"{n} request{'s' if n != 1 else ''} to host {host}" for host, n in counts.most_common()
    )


def _read_robots(transport: Transport, response: Response) -> tuple[int, bytes]:
    # any final status is an answer for robots.txt (4xx: no restrictions), not a failure
    return response.status, transport.read_body(response, ROBOTS_MAX_BYTES, truncate=True)


@dataclass(frozen=True)
class Network:
    """What every phase of one crawl shares: one transport and one politeness (robots.txt is
    fetched once per host, host spacing holds across phases), plus the scheduler settings."""

    settings: SchedulerSettings
    transport: Transport
    politeness: Politeness
    clock: CrawlClock  # started when the crawl starts: the deadline spans every phase

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> Network:
        return cls(
            SchedulerSettings.from_config(cfg),
            Transport(TransportSettings.from_config(cfg)),
            Politeness(PolitenessSettings.from_config(cfg)),
            CrawlClock(LimitSettings.from_config(cfg)),
        )

    def scheduler(self, handlers: Mapping[str, Handler]) -> Scheduler:
        return Scheduler(self.settings, self.transport, self.politeness, handlers, self.clock)
