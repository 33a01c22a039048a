"""The ``wikimedia_commons`` source: files in a Commons category or matching a search.

Consumes the MediaWiki API's JSON answers (``prop=imageinfo`` over a ``categorymembers`` or
``search`` generator); produces SourceImages (thumbnail URL, file page, licence, author) and the
parameters of the next page of results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bs4 import BeautifulSoup

from pipeline.config import CrawlConfig
from pipeline.crawl.sources import ApiRequest, SourceImage
from pipeline.crawl.transport import media_type


@dataclass(frozen=True)
class WikimediaSettings:
    api: str
    page_size: int
    thumbnail_width: int  # 0: the original files
    content_types: tuple[str, ...]  # originals of other types are skipped

    @classmethod
    def from_config(cls, cfg: CrawlConfig) -> WikimediaSettings:
        return cls(
            cfg.wikimedia_api, cfg.api_page_size, cfg.thumbnail_width, tuple(cfg.content_types)
        )


def strip_html(text: str) -> str:
    return re.sub(r"\s+", " ", BeautifulSoup(text or "", "html.parser").get_text(" ")).strip()


def wikimedia_params(
    settings: WikimediaSettings, category: str | None, search: str | None
) -> dict[str, Any]:
    """MediaWiki API parameters for files in a Commons category or matching a search."""
    params: dict[str, Any] = {
        "action": "query",
        "format": "json",
        "formatversion": "2",
        "prop": "imageinfo",
        "iiprop": "url|mime|size|extmetadata",
        "iiextmetadatafilter": "LicenseShortName|LicenseUrl|Artist|Credit|UsageTerms",
    }
    if settings.thumbnail_width:
        params["iiurlwidth"] = str(settings.thumbnail_width)
    if category is not None:
        title = category if category.lower().startswith("category:") else f"Category:{category}"
        params |= {
            "generator": "categorymembers",
            "gcmtitle": title,
            "gcmtype": "file",
            "gcmlimit": str(settings.page_size),
        }
    else:
        params |= {
            "generator": "search",
            "gsrsearch": search,
            "gsrnamespace": "6",
            "gsrlimit": str(settings.page_size),
        }
    return params


def _image(info: dict[str, Any], accepted: tuple[str, ...]) -> SourceImage | None:
    url = info.get("thumburl") or info.get("url")
    if not url:
        return None
    if not info.get("thumburl") and media_type(info.get("mime")) not in accepted:
        return None
    meta = info.get("extmetadata", {})
    artist = strip_html(meta.get("Artist", {}).get("value", ""))
    credit = strip_html(meta.get("Credit", {}).get("value", ""))
    return SourceImage(
        url=url,
        page_url=info.get("descriptionurl", ""),
        license=strip_html(meta.get("LicenseShortName", {}).get("value", "")),
        attribution=artist or credit,
    )


def parse_wikimedia(
    payload: dict[str, Any], request: ApiRequest, accepted: tuple[str, ...]
) -> tuple[list[SourceImage], dict[str, Any] | None]:
    """Return (images, params of the next page or None) from a MediaWiki API answer."""
    pages = payload.get("query", {}).get("pages", [])
    if isinstance(pages, dict):  # formatversion=1 answers
        pages = list(pages.values())
    # generator results come in arbitrary order; "index" (search) or title gives a stable one
    pages = sorted(pages, key=lambda p: (p.get("index", 0), p.get("title", "")))
    images = []
    for page in pages:
        for info in page.get("imageinfo", [])[:1]:
            image = _image(info, accepted)
            if image is not None:
                images.append(image)
    next_params = None
    if "continue" in payload:
        next_params = {**request.params, **payload["continue"]}
    return images, next_params
