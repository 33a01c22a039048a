"""Phase 1, discovery: each class's sources become its ordered candidate list.

Consumes the classes (ClassConfig) and the discovery settings; walks seed pages level by level,
reads URL lists and pages through the search APIs (every request through the scheduler);
produces per class a list of Candidates in a deterministic order, saved in the crawl state
with a fingerprint of everything that decides it. A rerun with the same fingerprint reuses the
list; ``refresh`` walks the sources again and appends the URLs not seen before.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlencode, urlsplit

from tqdm import tqdm

from pipeline.config import ClassConfig, CrawlConfig, StageError
from pipeline.crawl.politeness import x_robots_opt_outs
from pipeline.crawl.scheduler import Job, Network
from pipeline.crawl.sources import SOURCE_ORDER, ApiRequest, SourceImage
from pipeline.crawl.sources.openverse import OpenverseSettings, openverse_params, parse_openverse
from pipeline.crawl.sources.pages import HTML_TYPES, PageItem, parse_page
from pipeline.crawl.sources.url_list import read_url_list
from pipeline.crawl.sources.wikimedia import WikimediaSettings, parse_wikimedia, wikimedia_params
from pipeline.crawl.state import Candidate, PageRecord, State
from pipeline.crawl.transport import FetchFailure, Outcome, Response, header_values, media_type
from pipeline.crawl.urls import UrlMap, normalize_url, strip_tracking
from pipeline.resume import fingerprint

CANDIDATE_FORMAT = 3  # bump when the candidate order or URL form changes: old lists are rebuilt

Offer = Callable[[Candidate], None]


@dataclass(frozen=True)
class DiscoverySettings:
    max_depth: int
    max_images_per_class: int
    obey_robots_txt: bool
    obey_x_robots_tag: bool
    user_agent: str  # X-Robots-Tag directives may name it
    max_bytes: int
    query_sources: tuple[str, ...]
    tracking_params: tuple[str, ...]
    wikimedia: WikimediaSettings
    openverse: OpenverseSettings

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> DiscoverySettings:
        return cls(
            max_depth=cfg.max_depth,
            max_images_per_class=cfg.max_images_per_class,
            obey_robots_txt=cfg.obey_robots_txt,
            obey_x_robots_tag=cfg.obey_x_robots_tag,
            user_agent=cfg.user_agent,
            max_bytes=cfg.max_bytes,
            query_sources=tuple(cfg.query_sources),
            tracking_params=tuple(cfg.tracking_params),
            wikimedia=WikimediaSettings.from_config(cfg),
            openverse=OpenverseSettings.from_config(cfg),
        )


def class_cap(klass: ClassConfig, max_images_per_class: int) -> int:
    """The class's image cap (0: no limit)."""
    return klass.max_images if klass.max_images is not None else max_images_per_class


def class_fingerprint(settings: DiscoverySettings, klass: ClassConfig) -> str:
    """Hash of everything that decides a class's candidate list (not politeness or limits)."""
    files = [klass.image_urls] if klass.image_urls is not None else []
    apis = [
        settings.query_sources,
        settings.wikimedia.api,
        settings.openverse.api,
        settings.openverse.license_type,
        settings.wikimedia.page_size,
        settings.wikimedia.thumbnail_width,
    ]
    relevant = {
        "version": CANDIDATE_FORMAT,
        "max_depth": settings.max_depth,
        "cap": class_cap(klass, settings.max_images_per_class),
        "robots": [settings.obey_robots_txt, settings.obey_x_robots_tag],
        "apis": apis,
        "types": settings.wikimedia.content_types,
        "tracking_params": sorted(settings.tracking_params),
    }
    return fingerprint(klass, exclude={"max_images"}, files=files, extra=relevant, length=16)


def follow_allowed(klass: ClassConfig, url: str) -> bool:
    """Whether links to ``url`` (stored form) may be followed for ``klass``."""
    prefixes = klass.follow_prefixes or [seed.rsplit("/", 1)[0] + "/" for seed in klass.seeds]
    if any(url.startswith(prefix) for prefix in prefixes):
        return True
    host = (urlsplit(url).hostname or "").lower()
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in klass.allowed_domains)


def _default(klass: ClassConfig, value: str, key: str) -> str:
    return value or getattr(klass, key) or ""


class Discovery:
    """Turns each class's sources into its ordered candidate list (phase 1)."""

    def __init__(
        self,
        settings: DiscoverySettings,
        state: State,
        urls: UrlMap,
        network: Network,
        progress: bool = True,
    ) -> None:
        self.settings, self.state, self.urls = settings, state, urls
        self.progress = progress
        self.scheduler = network.scheduler({"page": self._fetch_page, "api": self._fetch_api})
        # refresh: pages and API answers count only if recorded by these walks (None: any)
        self.walks: set[str] | None = None
        self.walk = ""
        self.added: dict[str, int] = {}  # per class: candidates a refresh appended

    def fingerprint(self, klass: ClassConfig) -> str:
        return class_fingerprint(self.settings, klass)

    def known(self, key: str) -> PageRecord | None:
        """The recorded answer for a page or API URL that this run may reuse, if any."""
        record = self.state.pages.get(key)
        if record is not None and self.walks is not None and record.walk not in self.walks:
            return None
        return record

    def record(
        self,
        key: str,
        outcome: Outcome,
        items: tuple[PageItem, ...] | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        page = PageRecord(
            key=key,
            ok=outcome.kind == "done",
            reason=outcome.reason,
            status=outcome.status,
            items=items,
            payload=payload,
            walk=self.walk or None,
            time=time.time(),
        )
        self.state.record_page(page)

    def clean(self, url: str) -> str:
        """``url`` (stored) without a fragment or tracking parameters."""
        return strip_tracking(url, self.settings.tracking_params)

    # worker-thread handlers ---------------------------------------------------------------

    def _fetch_page(self, job: Job, response: Response) -> tuple[PageItem, ...]:
        found = media_type(response.headers.get("Content-Type"))
        if found not in HTML_TYPES:
            raise FetchFailure(f"not_html: {found or 'no Content-Type'}")
        directives: set[str] = set()
        if self.settings.obey_x_robots_tag:
            values = header_values(response, "X-Robots-Tag")
            directives = x_robots_opt_outs(values, self.settings.user_agent)
        body = self.scheduler.transport.read_body(response, self.settings.max_bytes)
        return tuple(
            replace(item, url=self.urls.stored(item.url), license=self.urls.stored(item.license))
            for item in parse_page(body, job.url, directives)
        )

    def _fetch_api(self, job: Job, response: Response) -> dict[str, Any]:
        body = self.scheduler.transport.read_body(response, self.settings.max_bytes)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise FetchFailure(f"bad_json: {exc}") from None
        if not isinstance(payload, dict):
            raise FetchFailure(f"bad_json: a {type(payload).__name__}, not an object")
        request: ApiRequest = job.data[0]
        # an API error answers 200 with an error object: record it as this call's failure
        if "error" in payload:
            error = payload["error"]
            code = error.get("code", "") if isinstance(error, dict) else str(error)
            raise FetchFailure(f"api_error: {code}" if code else "api_error")
        if request.source == "openverse" and "results" not in payload:
            raise FetchFailure("api_error: no results in the answer")
        return payload

    # main thread ----------------------------------------------------------------------------

    def run(self, classes: list[ClassConfig], refresh: bool = False) -> dict[str, list[Candidate]]:
        """Return each class's candidates, reusing the state's finished lists and pages.

        With ``refresh`` every class's sources are walked again (pages and API answers recorded
        by earlier walks are not reused) and URLs not in its finished list are appended to it.
        Raises StageError for a seed that is not an http(s) URL or an unreadable URL list.
        """
        found: dict[str, list[Candidate]] = {}
        previous: dict[str, list[Candidate]] = {}
        todo = []
        for klass in classes:
            cached = self.state.load_candidates(klass.name, self.fingerprint(klass))
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
                self.state.begin_walk(k.name, self.fingerprint(k), self.walk) for k in todo
            }
        best = self._walk_sources(todo)
        if self.walks is not None:
            self.state.keep_changed_pages(self.walks)
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
            self.state.save_candidates(klass.name, self.fingerprint(klass), ordered)
            found[klass.name] = ordered
        return found

    def _walk_sources(self, classes: list[ClassConfig]) -> dict[str, dict[str, Candidate]]:
        """Per class, every candidate URL any source offers, each at its earliest place."""
        best: dict[str, dict[str, Candidate]] = {k.name: {} for k in classes}

        def offer(candidate: Candidate) -> None:
            known = best[candidate.class_name].get(candidate.url)
            if known is None or candidate.order < known.order:
                best[candidate.class_name][candidate.url] = candidate

        bar = tqdm(desc="crawl: discover", unit="page", disable=not self.progress, leave=False)
        for klass in classes:
            self._urls_source(klass, offer)
        ApiWalk(self, classes, offer, bar).run()
        PageWalk(self, classes, offer, bar).run()
        bar.close()
        return best

    def offer_image(
        self,
        offer: Offer,
        klass: ClassConfig,
        image: SourceImage,
        source: str,
        order: tuple[int, ...],
    ) -> None:
        """Offer a URL list's or an API's image (a live or stored URL) as a candidate."""
        url = normalize_url(self.urls.live(image.url))
        if url is None:
            return
        candidate = Candidate(
            class_name=klass.name,
            url=self.clean(self.urls.stored(url)),
            page_url=image.page_url,
            source=source,
            license=_default(klass, image.license, "license"),
            attribution=_default(klass, image.attribution, "attribution"),
            order=order,
        )
        offer(candidate)

    def _urls_source(self, klass: ClassConfig, offer: Offer) -> None:
        if klass.image_urls is None:
            return
        index = SOURCE_ORDER.index("urls")
        for i, image in enumerate(read_url_list(klass.image_urls)):
            self.offer_image(offer, klass, image, "urls", (index, i))


class ApiWalk:
    """The search-API sources of some classes: page after page until twice the cap is found."""

    def __init__(
        self, discovery: Discovery, classes: list[ClassConfig], offer: Offer, bar: tqdm
    ) -> None:
        self.discovery, self.classes, self.offer, self.bar = discovery, classes, offer, bar
        self.settings = discovery.settings
        self.by_name = {k.name: k for k in classes}
        self.counts: Counter[tuple[str, int]] = Counter()  # images per (class, search)

    def first_requests(self, klass: ClassConfig) -> list[ApiRequest]:
        """Page 1 of each of the class's searches, in the order that ranks their images."""
        commons_search, openverse_query = klass.commons_search, klass.openverse_query
        if klass.query:
            if "wikimedia_commons" in self.settings.query_sources and commons_search is None:
                commons_search = klass.query
            if "openverse" in self.settings.query_sources and openverse_query is None:
                openverse_query = klass.query
        searches: list[tuple[str, dict[str, Any]]] = []
        wikimedia = self.settings.wikimedia
        if klass.commons_category:
            searches.append(
                ("wikimedia_commons", wikimedia_params(wikimedia, klass.commons_category, None))
            )
        if commons_search:
            searches.append(
                ("wikimedia_commons", wikimedia_params(wikimedia, None, commons_search))
            )
        if openverse_query:
            searches.append(
                ("openverse", openverse_params(self.settings.openverse, openverse_query))
            )
        return [
            ApiRequest(klass.name, source, n, 1, params)
            for n, (source, params) in enumerate(searches)
        ]

    def run(self) -> None:
        requests = [r for klass in self.classes for r in self.first_requests(klass)]
        if not requests:
            return
        for request in requests:
            self.submit(request)
        self.discovery.scheduler.run(self.on_done)

    def submit(self, request: ApiRequest) -> None:
        base = (
            self.settings.wikimedia.api
            if request.source == "wikimedia_commons"
            else self.settings.openverse.api
        )
        url = base + ("&" if "?" in base else "?") + urlencode(sorted(request.params.items()))
        urls = self.discovery.urls
        key = urls.stored(url)
        known = self.discovery.known(key)
        if known is not None:
            self.handle(request, known)
        else:
            self.discovery.scheduler.add(Job("api", urls.live(url), (request, key)))

    def on_done(self, job: Job, outcome: Outcome) -> None:
        request, key = job.data
        self.discovery.record(key, outcome, payload=outcome.result)
        self.handle(request, self.discovery.state.pages[key])

    def handle(self, request: ApiRequest, record: PageRecord) -> None:
        self.bar.update(1)
        if not record.ok or record.payload is None:
            return  # recorded in the state; the report counts it
        if request.source == "wikimedia_commons":
            accepted = self.settings.wikimedia.content_types
            images, next_params = parse_wikimedia(record.payload, request, accepted)
        else:
            images, next_params = parse_openverse(record.payload, request)
        klass = self.by_name[request.class_name]
        source_index = SOURCE_ORDER.index(request.source)
        for i, image in enumerate(images):
            order = (source_index, request.source_index, request.page, i)
            self.discovery.offer_image(self.offer, klass, image, request.source, order)
        search = (klass.name, request.source_index)
        self.counts[search] += len(images)
        cap = class_cap(klass, self.settings.max_images_per_class)
        # fetch twice the cap in candidates: enough for failures and duplicates
        if next_params and (cap == 0 or self.counts[search] < 2 * cap):
            self.submit(replace(request, page=request.page + 1, params=next_params))


class PageWalk:
    """The ``pages`` source of some classes: breadth first, one level at a time, so each page's
    depth and order key is fixed whatever order the answers come in."""

    def __init__(
        self, discovery: Discovery, classes: list[ClassConfig], offer: Offer, bar: tqdm
    ) -> None:
        self.discovery, self.classes, self.offer, self.bar = discovery, classes, offer, bar
        self.index = SOURCE_ORDER.index("pages")
        self.visited: dict[str, set[str]] = {k.name: set() for k in classes}

    def seed_level(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Per class: stored seed URL -> order key. Raises StageError for a non-http seed."""
        urls = self.discovery.urls
        level: dict[str, dict[str, tuple[int, ...]]] = {}
        for klass in self.classes:
            level[klass.name] = {}
            for i, seed in enumerate(klass.seeds):
                url = normalize_url(urls.live(seed))
                if url is None:
                    raise StageError(f"classes.{klass.name}.seeds: {seed!r} is not an http(s) URL")
                stored = urls.stored(url)
                level[klass.name].setdefault(stored, (self.index, i))
                self.visited[klass.name].add(stored)
        return level

    def run(self) -> None:
        level = self.seed_level()
        for depth in itertools.count():
            wanted = {url for pages in level.values() for url in pages}
            if not wanted:
                break
            self.fetch(wanted)
            level = {
                klass.name: self.visit(klass, depth, level[klass.name]) for klass in self.classes
            }

    def fetch(self, wanted: set[str]) -> None:
        """Fetch the pages of one level that the state does not know yet."""
        discovery = self.discovery
        for url in sorted(url for url in wanted if discovery.known(url) is None):
            discovery.scheduler.add(Job("page", discovery.urls.live(url), url))

        def on_done(job: Job, outcome: Outcome) -> None:
            discovery.record(job.data, outcome, items=outcome.result or ())
            self.bar.update(1)

        discovery.scheduler.run(on_done)

    def visit(
        self, klass: ClassConfig, depth: int, pages: dict[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """Offer the images of one level's pages; return the next level's pages (URL -> key)."""
        max_depth = (
            klass.max_depth if klass.max_depth is not None else self.discovery.settings.max_depth
        )
        visited = self.visited[klass.name]
        next_pages: dict[str, tuple[int, ...]] = {}
        for page_url, key in sorted(pages.items(), key=lambda kv: kv[1]):
            record = self.discovery.state.pages[page_url]
            if not record.ok:
                continue
            for i, item in enumerate(record.items or ()):
                child_key = (*key, i)
                url = self.discovery.clean(item.url)
                if item.is_image:
                    # breadth first: a seed's own images before those of the pages it links to
                    self.offer_page_image(
                        klass, page_url, item, url, (self.index, depth, *child_key[1:])
                    )
                elif depth < max_depth and url not in visited and follow_allowed(klass, url):
                    known = next_pages.get(url)
                    if known is None or child_key < known:
                        next_pages[url] = child_key
        visited |= set(next_pages)
        return next_pages

    def offer_page_image(
        self, klass: ClassConfig, page_url: str, item: PageItem, url: str, order: tuple[int, ...]
    ) -> None:
        candidate = Candidate(
            class_name=klass.name,
            url=url,
            page_url=page_url,
            source="pages",
            license=_default(klass, item.license, "license"),
            attribution=_default(klass, item.attribution, "attribution"),
            order=order,
        )
        self.offer(candidate)
