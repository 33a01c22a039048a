"""The ``urls`` source: a class's image URLs listed in a file (img2dataset-style input).

Consumes a text file (one URL a line, ``#`` comments) or a CSV/TSV with a ``url`` column and
optional ``license``, ``attribution`` (or ``author``) and ``page_url`` columns; produces
SourceImages in file order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.config import StageError
from pipeline.crawl.sources import SourceImage


def read_url_list(path: Path) -> list[SourceImage]:
    """Return the listed images. Raises StageError naming the file if it is missing or a CSV
    has no ``url`` column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise StageError(f"{path}: cannot read image URL list: {exc}") from None
    if path.suffix.lower() not in (".csv", ".tsv"):
        return [
            SourceImage(line.strip())
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
    rows = list(csv.DictReader(io.StringIO(text), dialect=dialect))
    if rows and "url" not in rows[0]:
        raise StageError(f"{path}: CSV needs a 'url' column, has {list(rows[0])}")
    images = []
    for raw in rows:
        row = {key: (value or "").strip() for key, value in raw.items() if key}
        images.append(
            SourceImage(
                url=row["url"],
                page_url=row.get("page_url", ""),
                license=row.get("license", ""),
                attribution=row.get("attribution") or row.get("author", ""),
            )
        )
    return images
