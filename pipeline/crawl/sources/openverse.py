"""The ``openverse`` source: Openverse image search (openly licensed images).

Consumes Openverse's JSON search answers; produces SourceImages (image URL, landing page,
licence, attribution) without mature results, and the parameters of the next page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import CrawlConfig
from pipeline.crawl.sources import ApiRequest, SourceImage

MAX_PAGE_SIZE = 20  # anonymous Openverse clients get at most 20 results a page


@dataclass(frozen=True)
class OpenverseSettings:
    api: str
    page_size: int
    license_type: str  # "all" | "all-cc" | "commercial" | "modification"

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> OpenverseSettings:
        return cls(cfg.openverse_api, cfg.api_page_size, cfg.openverse_license_type)


def openverse_license(item: dict[str, Any]) -> str:
    code = str(item.get("license", "")).lower()
    version = str(item.get("license_version") or "")
    if code == "cc0":
        return "CC0 " + (version or "1.0")
    if code == "pdm":
        return "Public Domain Mark " + (version or "1.0")
    return f"CC {code.upper()} {version}".strip()


def openverse_params(settings: OpenverseSettings, query: str) -> dict[str, Any]:
    params = {"q": query, "page": "1", "page_size": str(min(settings.page_size, MAX_PAGE_SIZE))}
    if settings.license_type != "all":
        params["license_type"] = settings.license_type
    return params


def parse_openverse(
    payload: dict[str, Any], request: ApiRequest
) -> tuple[list[SourceImage], dict[str, Any] | None]:
    """Return (images, params of the next page or None) from an Openverse search answer."""
    images = []
    for result in payload["results"]:
        if result.get("mature") or not result.get("url"):
            continue
        images.append(
            SourceImage(
                url=result["url"],
                page_url=result.get("foreign_landing_url") or "",
                license=openverse_license(result),
                attribution=result.get("attribution") or result.get("creator") or "",
            )
        )
    page = int(payload.get("page") or request.page)
    page_count = int(payload.get("page_count") or 0)
    next_params = None
    if page < page_count and payload["results"]:
        next_params = {**request.params, "page": str(page + 1)}
    return images, next_params
