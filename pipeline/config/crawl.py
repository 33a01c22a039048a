"""The ``classes:`` list and the ``crawl:`` section (pipeline/crawl/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from pipeline.config.base import (
    NonNegativeFloat,
    PositiveFloat,
    _Section,
)


class ClassConfig(_Section):
    """One class to learn and where its images live on the web (crawl sources, pipeline/crawl/).

    Any mix of sources works; at least one is required. URLs may start with "{demo}", the base URL
    of the bundled demo site when crawl.serve_demo_site is set.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    # source `pages`: HTML pages to crawl, following links up to crawl.max_depth hops
    seeds: list[str] = []
    # source `urls`: a text file of image URLs (one per line) or a CSV with a `url` column
    image_urls: Path | None = None
    # sources `wikimedia_commons` and `openverse`
    commons_category: str | None = None
    commons_search: str | None = None
    openverse_query: str | None = None
    # shorthand: search every source in crawl.query_sources for this text
    query: str | None = None
    # links followed from seed pages: URL prefixes (default: each seed's folder) or domains
    follow_prefixes: list[str] = []
    allowed_domains: list[str] = []
    max_depth: Annotated[int, Field(ge=0, le=20)] | None = None
    max_images: Annotated[int, Field(ge=0)] | None = None
    # licence/attribution recorded when a page or list does not declare one
    license: str | None = None
    attribution: str | None = None

    @model_validator(mode="after")
    def _has_a_source(self) -> ClassConfig:
        sources = (
            self.seeds,
            self.image_urls,
            self.commons_category,
            self.commons_search,
            self.openverse_query,
            self.query,
        )
        if not any(sources):
            raise ValueError(
                f"class {self.name!r} needs at least one source: seeds, image_urls, "
                "commons_category, commons_search, openverse_query or query"
            )
        for url in self.seeds:
            if not url.startswith(("http://", "https://", "{demo}")):
                raise ValueError(f"class {self.name!r}: seed {url!r} must be an http(s) URL")
        return self


QuerySource = Literal["wikimedia_commons", "openverse"]


DEFAULT_TRACKING_PARAMS = [
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
    "mc_cid",
    "mc_eid",
    "ref",
]


class CrawlSettings(_Section):
    """crawl: sources, politeness, safety and concurrency of pipeline/crawl/ (params.yaml)."""

    serve_demo_site: Path | None = None
    user_agent: Annotated[str, Field(min_length=1)] = "crawl2model/0.1"
    obey_robots_txt: bool = True
    obey_x_robots_tag: bool = True
    allow_private_addresses: bool = False
    max_depth: Annotated[int, Field(ge=0, le=20)] = 2
    max_images_per_class: Annotated[int, Field(ge=0)] = 0
    concurrency: Annotated[int, Field(ge=1, le=256)] = 8
    max_per_host: Annotated[int, Field(ge=1, le=64)] = 2
    per_host_delay_s: NonNegativeFloat = 0.0
    timeout_s: PositiveFloat = 10.0
    retries: Annotated[int, Field(ge=0, le=20)] = 3
    backoff_s: NonNegativeFloat = 0.5
    max_retry_after_s: NonNegativeFloat = 600.0
    max_redirects: Annotated[int, Field(ge=0, le=30)] = 5
    max_bytes: Annotated[int, Field(ge=1)] = 10_000_000
    min_width: Annotated[int, Field(ge=1)] = 16
    min_height: Annotated[int, Field(ge=1)] = 16
    content_types: Annotated[list[str], Field(min_length=1)] = [
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "image/bmp",
    ]
    query_sources: list[QuerySource] = ["wikimedia_commons", "openverse"]
    wikimedia_api: str = "https://commons.wikimedia.org/w/api.php"
    openverse_api: str = "https://api.openverse.org/v1/images/"
    openverse_license_type: Literal["all", "all-cc", "commercial", "modification"] = "all-cc"
    api_delay_s: NonNegativeFloat = 1.0
    api_page_size: Annotated[int, Field(ge=1, le=50)] = 20
    thumbnail_width: Annotated[int, Field(ge=0)] = 640
    tracking_params: list[Annotated[str, Field(min_length=1)]] = DEFAULT_TRACKING_PARAMS
    # an unattended crawl ends (and the stage fails, after writing what it has) when it runs
    # past the deadline or nothing starts or finishes for stall_timeout_s; 0 = no limit
    deadline_s: NonNegativeFloat = 21600.0
    stall_timeout_s: NonNegativeFloat = 600.0
    # a class with fewer saved images fails the stage (after writing its outputs); 0 = off
    min_images_per_class: Annotated[int, Field(ge=0)] = 20

    @field_validator("content_types")
    @classmethod
    def _image_types(cls, types: list[str]) -> list[str]:
        bad = [t for t in types if not t.startswith("image/")]
        if bad:
            raise ValueError(f"content_types must all be image/* types, got {bad}")
        return [t.lower() for t in types]

    @model_validator(mode="after")
    def _cap_allows_the_minimum(self) -> CrawlSettings:
        minimum = self.min_images_per_class
        problem = _cap_below_minimum(self, [], "crawl.min_images_per_class", minimum)
        if problem:
            raise ValueError(problem)
        return self


def _cap_below_minimum(
    crawl: CrawlSettings, classes: list[ClassConfig], minimum_key: str, minimum: int
) -> str | None:
    """Say which cap (crawl.max_images_per_class or a class's max_images) keeps some class
    below ``minimum``, so that the stage could only fail; None when every cap allows it."""
    if not minimum:
        return None
    caps = [("crawl.max_images_per_class", crawl.max_images_per_class)]
    caps += [(f"classes.{k.name}.max_images", k.max_images) for k in classes if k.max_images]
    for key, cap in caps:
        if cap and cap < minimum:
            return f"{key} ({cap}) is below {minimum_key} ({minimum}): that class can never pass"
    return None


class CrawlConfig(CrawlSettings):
    """What the crawl runs with: the ``crawl:`` section plus the top-level ``classes`` list."""

    classes: list[ClassConfig]

    @model_validator(mode="after")
    def _class_caps_allow_the_minimum(self) -> CrawlConfig:
        minimum = self.min_images_per_class
        problem = _cap_below_minimum(self, self.classes, "crawl.min_images_per_class", minimum)
        if problem:
            raise ValueError(problem)
        return self
