"""Phase 2, fetching: download each class's candidates in order until it has its cap.

Consumes the ordered Candidates (phase 1) and the fetch settings; produces image files
``<out>/<class>/<sha256>.<ext>`` (named by content, never by URL) and one FetchRecord per
candidate fetched (saved, or failed with a reason that says what came back), appended to the
crawl state as it goes.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from pipeline.config import CrawlConfig
from pipeline.crawl.politeness import x_robots_opt_outs
from pipeline.crawl.scheduler import Job, Network
from pipeline.crawl.state import Candidate, FetchRecord, SavedImage, State
from pipeline.crawl.transport import (
    FetchFailure,
    Outcome,
    Response,
    header_values,
    media_type,
    reason_kind,
)
from pipeline.crawl.urls import UrlMap
from pipeline.files import atomic_write_bytes

FORMAT_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp"}


@dataclass(frozen=True)
class FetchSettings:
    obey_x_robots_tag: bool
    user_agent: str  # X-Robots-Tag directives may name it
    content_types: tuple[str, ...]
    max_bytes: int
    min_width: int
    min_height: int

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> FetchSettings:
        return cls(
            obey_x_robots_tag=cfg.obey_x_robots_tag,
            user_agent=cfg.user_agent,
            content_types=tuple(cfg.content_types),
            max_bytes=cfg.max_bytes,
            min_width=cfg.min_width,
            min_height=cfg.min_height,
        )


def _undecodable(body: bytes, image_format: str | None, error: Exception) -> str:
    """Say what came back instead of a whole image: ``truncated PNG``, ``starts with '<!doc'``."""
    if image_format is None:
        return f"unknown format, starts with {body[:12]!r}"
    if "truncated" in str(error).lower():
        return f"truncated {image_format}"
    return f"broken {image_format} ({type(error).__name__})"


def decode_image(body: bytes) -> tuple[str, int, int]:
    """Return (file extension, width, height) of image bytes.

    Raises FetchFailure("not_an_image: ...") if they do not decode completely.
    """
    image_format = None
    try:
        with Image.open(io.BytesIO(body)) as image:
            image_format = image.format
            image.load()  # verify() misses truncated pixel data; load() decodes it all
            extension = FORMAT_EXTENSIONS.get(image.format or "", (image.format or "img").lower())
            return extension, *image.size
    except (
        Exception
    ) as error:  # Pillow raises many types (OSError, SyntaxError, DecompressionBomb...)
        raise FetchFailure(f"not_an_image: {_undecodable(body, image_format, error)}") from None


class Fetcher:
    """Downloads candidates in order until each class has its cap of distinct images."""

    def __init__(
        self,
        settings: FetchSettings,
        state: State,
        urls: UrlMap,
        network: Network,
        out: Path,
        progress: bool = True,
    ) -> None:
        self.settings, self.state, self.urls, self.out = settings, state, urls, out
        self.progress = progress
        self.scheduler = network.scheduler({"image": self._fetch_image})

    def _fetch_image(self, job: Job, response: Response) -> SavedImage:
        """Worker thread: check, read, decode and save one image; raises FetchFailure."""
        candidate: Candidate = job.data
        settings = self.settings
        if settings.obey_x_robots_tag:
            values = header_values(response, "X-Robots-Tag")
            opt_outs = x_robots_opt_outs(values, settings.user_agent) - {"nofollow"}
            if opt_outs:  # decided before reading a byte of the body
                raise FetchFailure(f"x_robots_tag: {', '.join(sorted(opt_outs))}")
        content_type = media_type(response.headers.get("Content-Type"))
        if content_type not in settings.content_types:
            raise FetchFailure(f"content_type: {content_type or 'none'}")
        body = self.scheduler.transport.read_body(response, settings.max_bytes)
        extension, width, height = decode_image(body)
        if width < settings.min_width or height < settings.min_height:
            raise FetchFailure(f"too_small: {width}x{height}")
        sha256 = hashlib.sha256(body).hexdigest()
        relative = f"{candidate.class_name}/{sha256}.{extension}"
        target = self.out / relative
        if not target.exists():
            atomic_write_bytes(target, body)
        return SavedImage(content_type, len(body), width, height, sha256, relative)

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
            elif known.image is not None:
                have.add(known.image.sha256)
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
            queue, cap = queues[name], caps[name]
            while queue and (cap == 0 or len(shas[name]) + in_flight[name] < cap):
                candidate = queue.popleft()
                known = self.state.fetches.get((name, candidate.url))
                if known is not None:
                    if known.image is not None:
                        shas[name].add(known.image.sha256)
                    continue
                in_flight[name] += 1
                self.scheduler.add(Job("image", self.urls.live(candidate.url), candidate))

        def on_done(job: Job, outcome: Outcome) -> None:
            candidate: Candidate = job.data
            name = candidate.class_name
            in_flight[name] -= 1
            fetch = _record(candidate, outcome)
            if fetch.image is not None:
                shas[name].add(fetch.image.sha256)
            else:
                failures[reason_kind(fetch.reason)] += 1
            self.state.record_fetch(fetch)
            bar.update(1)
            status = " ".join(f"{n}={len(shas[n])}" for n in queues)
            if failures:
                status += " | failed: " + " ".join(f"{r}={k}" for r, k in failures.most_common(4))
            bar.set_postfix_str(status, refresh=False)
            refill(name)

        for name in queues:
            refill(name)
        self.scheduler.run(on_done)
        bar.close()


def _record(candidate: Candidate, outcome: Outcome) -> FetchRecord:
    return FetchRecord(
        class_name=candidate.class_name,
        url=candidate.url,
        reason=outcome.reason,
        status=outcome.status,
        fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
        image=outcome.result if outcome.kind == "done" else None,
    )
