"""The ``pages`` source: an HTML page's images and links, in document order.

Consumes a page's bytes, its URL and the X-Robots-Tag directives that came with it; produces
PageItems (absolute, normalised live URLs) honouring robots meta tags.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from bs4 import BeautifulSoup, Tag

from pipeline.crawl.urls import normalize_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
SKIP_LINK_EXTENSIONS = (
    ".pdf",
    ".zip",
    ".gz",
    ".tar",
    ".mp4",
    ".mp3",
    ".webm",
    ".svg",
    ".css",
    ".js",
)
HTML_TYPES = ("text/html", "application/xhtml+xml")


@dataclass(frozen=True)
class PageItem:
    """An image on a page (with the page's licence and author) or a link to follow."""

    url: str
    is_image: bool
    license: str = ""
    attribution: str = ""

    def to_row(self) -> dict[str, str]:
        if self.is_image:
            return {"image": self.url, "license": self.license, "attribution": self.attribution}
        return {"link": self.url}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> PageItem:
        if "image" in row:
            return cls(row["image"], True, row.get("license", ""), row.get("attribution", ""))
        return cls(row["link"], False)


def largest_from_srcset(srcset: str) -> str | None:
    """Return the URL of the largest candidate in an ``srcset`` ("a.png 1x, b.png 2x")."""
    best: tuple[float, str] | None = None
    for entry in re.split(r",\s+", srcset.strip()):
        parts = entry.strip().split()
        if not parts:
            continue
        size = 1.0
        if len(parts) > 1:
            descriptor = parts[1].lower()
            with contextlib.suppress(ValueError):
                size = float(descriptor[:-1]) if descriptor[-1:] in ("w", "x") else size
        if best is None or size > best[0]:
            best = (size, parts[0])
    return best[1] if best else None


def _raw_items(soup: BeautifulSoup, follow: bool, images_ok: bool) -> Iterator[tuple[bool, str]]:
    """(is_image, raw URL) for each image and followable link, in document order."""
    for tag in soup.find_all(["img", "a", "meta"]):
        if not isinstance(tag, Tag):
            continue
        if tag.name == "img" and images_ok:
            srcset = tag.get("srcset")
            raw = (
                largest_from_srcset(str(srcset))
                if srcset
                else tag.get("src") or tag.get("data-src")
            )
            yield True, str(raw or "")
        elif tag.name == "a" and tag.get("href"):
            href = str(tag["href"])
            path = urlsplit(href).path.lower()
            if path.endswith(IMAGE_EXTENSIONS):
                if images_ok:
                    yield True, href
            elif follow and not path.endswith(SKIP_LINK_EXTENSIONS):
                yield False, href
        elif tag.name == "meta" and tag.get("property") == "og:image" and images_ok:
            yield True, str(tag.get("content") or "")


def parse_page(html_text: str | bytes, page_url: str, x_robots: set[str]) -> list[PageItem]:
    """Return a page's links and images in document order, URLs absolute and normalised (live).

    Images come from ``<img src>`` (or the largest ``srcset`` candidate), ``<a href>`` to image
    files and ``og:image``; each carries the page's ``rel=license`` link and author meta, if any.
    Honours robots meta tags and X-Robots-Tag: ``nofollow`` drops links, image opt-outs drop
    images.
    """
    soup = BeautifulSoup(html_text, "html.parser")
    base = page_url
    base_tag = soup.find("base", href=True)
    if isinstance(base_tag, Tag):
        base = urljoin(page_url, str(base_tag["href"]))
    directives = set(x_robots)
    for meta in soup.find_all("meta", attrs={"name": re.compile("^robots$", re.I)}):
        if isinstance(meta, Tag):
            directives |= {d.strip().lower() for d in str(meta.get("content", "")).split(",")}
    license_tag = soup.find(["link", "a"], rel="license", href=True)
    license_url = (
        urljoin(page_url, str(license_tag["href"])) if isinstance(license_tag, Tag) else ""
    )
    author = soup.find("meta", attrs={"name": "author"})
    attribution = str(author.get("content", "")).strip() if isinstance(author, Tag) else ""
    follow = not directives & {"nofollow", "none"}
    images_ok = not directives & {"noai", "noimageai", "noimageindex", "none"}

    items: list[PageItem] = []
    for is_image, raw in _raw_items(soup, follow, images_ok):
        if not raw or raw.startswith(("data:", "javascript:", "mailto:")):
            continue
        url = normalize_url(urljoin(base, html.unescape(raw)))
        if url is None:
            continue
        if is_image:
            items.append(PageItem(url, True, license_url, attribution))
        else:
            items.append(PageItem(url, False))
    return items
