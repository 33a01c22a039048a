"""URLs: canonical form, tracking-parameter stripping, stored/live mapping, host shards.

Consumes URL strings found by the sources; produces the canonical, stored form that the crawl
state, the manifest and the shard assignment all key on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit, urlunsplit

DEMO = "{demo}"


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


def strip_tracking(url: str, tracking_params: Collection[str]) -> str:
    """Return ``url`` (live or stored form) without its fragment and tracking query parameters.

    ``a.png?utm_source=x&v=2#top`` becomes ``a.png?v=2``: a decorated link and the plain
    ``<img src>`` then name one image, fetched once. Other parameters keep their order and
    encoding, so an undecorated URL comes back unchanged.
    """
    parts = urlsplit(url)
    if not parts.query and not parts.fragment:
        return url
    names = {name.lower() for name in tracking_params}
    pairs = parts.query.split("&")
    kept = [pair for pair in pairs if unquote_plus(pair.partition("=")[0]).lower() not in names]
    query = parts.query if len(kept) == len(pairs) else "&".join(p for p in kept if p)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def stored_host(url: str) -> str:
    """The host part of a stored URL ("{demo}" for the demo site): used to shard by host."""
    return DEMO if url.startswith(DEMO) else urlsplit(url).netloc


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass(frozen=True)
class HostShard:
    """One of ``count`` parts of a crawl's hosts (0-based ``index``; "2/4" in text is 1-based).

    Every URL of one host falls in the same shard, so per-host limits hold inside one process.
    Raises ValueError for an index outside 0..count-1.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"index must be in 0..{self.count - 1}, got {self.index}")

    @classmethod
    def parse(cls, text: str) -> HostShard:
        """``"2/4"`` → HostShard(index=1, count=4). Raises ValueError naming ``text``."""
        index, slash, count = text.strip().partition("/")
        try:
            if not slash:
                raise ValueError
            return cls(int(index) - 1, int(count))
        except ValueError:
            raise ValueError(
                f"host shard {text!r}: expected K/N with 1 <= K <= N (e.g. 2/4)"
            ) from None

    @classmethod
    def coerce(cls, value: HostShard | tuple[int, int]) -> HostShard:
        """Accept a HostShard or the older ``(index, count)`` tuple (0-based index)."""
        return value if isinstance(value, HostShard) else cls(*value)

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"

    @property
    def state_suffix(self) -> str:
        """The part of this shard's state file names that names it (0-based, as always)."""
        return f"host{self.index}of{self.count}"

    def contains(self, url: str) -> bool:
        """Whether ``url`` (stored form) belongs to this shard."""
        return host_shard_of(url, self.count) == self.index


def host_shard_of(url: str, shard_count: int) -> int:
    digest = hashlib.sha256(stored_host(url).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shard_count
