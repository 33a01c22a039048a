"""Sources: where a class's candidate image URLs come from.

- ``pages.py``: HTML pages (seed pages and the links followed from them);
- ``url_list.py``: a text or CSV file of image URLs (img2dataset-style input);
- ``wikimedia.py`` and ``openverse.py``: the public search APIs, one page of results a call.

Each parser turns what came back into typed items (PageItem, SourceImage); discovery.py turns
those into the class's ordered Candidate list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SOURCE_ORDER = ("pages", "urls", "wikimedia_commons", "openverse")


@dataclass(frozen=True)
class SourceImage:
    """An image a URL list or a search API names, with what it says about the image."""

    url: str
    page_url: str = ""
    license: str = ""
    attribution: str = ""


@dataclass(frozen=True)
class ApiRequest:
    """One page of an API search for one class."""

    class_name: str
    source: str  # "wikimedia_commons" | "openverse"
    source_index: int  # the class's n-th search
    page: int
    params: dict[str, Any]
