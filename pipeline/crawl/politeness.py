"""Politeness: robots.txt, per-host gates, Retry-After and X-Robots-Tag.

Consumes the crawl's politeness settings and the answers to robots.txt requests; produces, per
request, a verdict (go, wait for robots.txt, or refused) and, per host, a HostGate that spaces
requests (like Scrapy's per-domain ``Slot``). One Politeness serves every phase of a crawl, so
robots.txt is fetched once per host and host spacing holds across discovery and fetching.
"""

from __future__ import annotations

import contextlib
import time
import urllib.robotparser
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from urllib3.util import Retry

from pipeline.config import CrawlConfig

X_ROBOTS_OPT_OUTS = frozenset({"noai", "noimageai", "noindex", "noimageindex", "none"})
X_ROBOTS_VALUED = frozenset(
    {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
)
ROBOTS_MAX_BYTES = 512 * 1024  # RFC 9309: parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600  # RFC 9309: do not use a cached robots.txt for more than 24 hours
WAIT = "wait"  # verdict: robots.txt for the host is not known yet

_RETRY_AFTER = Retry()  # for its RFC 9110 Retry-After parser (seconds or an HTTP date)


@dataclass(frozen=True)
class PolitenessSettings:
    user_agent: str
    obey_robots_txt: bool
    max_per_host: int
    per_host_delay_s: float
    api_delay_s: float
    api_hosts: frozenset[str]  # host[:port] of the search APIs: spaced by api_delay_s
    max_retry_after_s: float

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> PolitenessSettings:
        return cls(
            user_agent=cfg.user_agent,
            obey_robots_txt=cfg.obey_robots_txt,
            max_per_host=cfg.max_per_host,
            per_host_delay_s=cfg.per_host_delay_s,
            api_delay_s=cfg.api_delay_s,
            api_hosts=frozenset(urlsplit(u).netloc for u in (cfg.wikimedia_api, cfg.openverse_api)),
            max_retry_after_s=cfg.max_retry_after_s,
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


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    with contextlib.suppress(Exception):
        return _RETRY_AFTER.parse_retry_after(value)
    return None


@dataclass
class RobotsPolicy:
    parser: urllib.robotparser.RobotFileParser
    fetched_at: float
    note: str  # "ok" | "4xx: allow all" | "unreachable: disallow all"
    text: str = ""
    # the failure reason of each URL it blocks: rules said no, or robots.txt could not be read
    refusal: str = "robots_disallowed"

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
    def from_answer(cls, status: int, body: bytes) -> RobotsPolicy:
        """RFC 9309: 2xx is parsed; 4xx means no restrictions; 5xx disallows all."""
        parser = urllib.robotparser.RobotFileParser()
        text = ""
        if 200 <= status < 300:
            text = body.decode("utf-8", errors="replace")
            parser.parse(text.splitlines())
            return cls(parser, time.monotonic(), "ok", text)
        if 400 <= status < 500:
            parser.allow_all = True
            return cls(parser, time.monotonic(), f"{status}: allow all", text)
        return cls.unreachable(f"http_{status}")

    @classmethod
    def unreachable(cls, why: str) -> RobotsPolicy:
        """RFC 9309: robots.txt that cannot be read (5xx, no connection, no complete answer)
        disallows the whole host; each blocked URL's reason says why (``robots_unreachable:
        connection refused``), not that rules forbade it."""
        parser = urllib.robotparser.RobotFileParser()
        parser.disallow_all = True
        return cls(
            parser, time.monotonic(), f"{why}: disallow all", refusal=f"robots_unreachable: {why}"
        )


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

    def finish(self) -> None:
        self.in_flight -= 1

    def hold_until(self, when: float) -> None:
        """No request starts before ``when`` (a Retry-After speaks for the whole host)."""
        self.next_start = max(self.next_start, when)


@dataclass
class Politeness:
    """Per-host gates and robots.txt policies for one crawl (shared by its schedulers)."""

    settings: PolitenessSettings
    gates: dict[str, HostGate] = field(default_factory=dict)
    robots: dict[str, RobotsPolicy] = field(default_factory=dict)
    robots_pending: set[str] = field(default_factory=set)

    def gate(self, origin: str) -> HostGate:
        if origin not in self.gates:
            delay = self.settings.per_host_delay_s
            if urlsplit(origin).netloc in self.settings.api_hosts:
                delay = max(delay, self.settings.api_delay_s)
            self.gates[origin] = HostGate(self.settings.max_per_host, delay)
        return self.gates[origin]

    def verdict(self, origin: str, url: str, follows_robots: bool) -> str | None:
        """Return WAIT while ``origin``'s robots.txt is unknown (or stale), a failure reason
        ("robots_disallowed", "robots_unreachable: http_503"), or None to go ahead.
        ``follows_robots`` is False for requests robots.txt does not govern (robots.txt
        itself, API calls)."""
        if not self.settings.obey_robots_txt or not follows_robots:
            return None
        policy = self.robots.get(origin)
        if policy is None or time.monotonic() - policy.fetched_at > ROBOTS_TTL_S:
            return WAIT
        if not policy.parser.can_fetch(self.settings.user_agent, url):
            return policy.refusal
        return None

    def robots_requested(self, origin: str) -> bool:
        """Mark ``origin``'s robots.txt as requested; False if it already was."""
        if origin in self.robots_pending:
            return False
        self.robots_pending.add(origin)
        return True

    def learn_robots(self, origin: str, policy: RobotsPolicy) -> None:
        """Record ``origin``'s robots.txt; its Crawl-delay widens the host's spacing."""
        self.robots[origin] = policy
        self.robots_pending.discard(origin)
        delay = policy.crawl_delay(self.settings.user_agent)
        if delay:
            gate = self.gate(origin)
            gate.min_interval = max(gate.min_interval, delay)

    def retry_delay(self, origin: str, retry_after: str | None, now: float) -> float | None:
        """Seconds to wait per the server's Retry-After (capped), holding the whole host that
        long; None when the server did not say."""
        wait_s = retry_after_seconds(retry_after)
        if wait_s is None:
            return None
        delay = min(wait_s, self.settings.max_retry_after_s)
        self.gate(origin).hold_until(now + delay)
        return delay
