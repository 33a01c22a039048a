"""Selection, manifest and report: which fetched images make the data set.

Consumes each class's ordered Candidates, its cap and the crawl state's FetchRecords and
PageRecords; produces ``<out>/manifest.jsonl`` (one row per selected image) and the crawl
report (counts per class and per failure kind, plus every failed URL with its reason).
Selection is "the first ``cap`` distinct images in candidate order", so it does not depend on
timing or on how the crawl was split into shards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import StageError
from pipeline.crawl.state import Candidate, FetchRecord, PageRecord, State
from pipeline.crawl.transport import reason_kind
from pipeline.files import atomic_write_json, write_jsonl


@dataclass(frozen=True)
class ManifestRow:
    """One selected image: where it came from, its licence, and the file it was saved as."""

    class_name: str
    source: str
    url: str
    page_url: str
    license: str
    attribution: str
    status: int | None
    content_type: str
    bytes: int
    width: int
    height: int
    sha256: str
    path: str
    fetched_at: str

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["class"] = row.pop("class_name")
        return row


@dataclass(frozen=True)
class FailedUrl:
    """A candidate inside a class's selection range that could not be saved."""

    url: str
    class_name: str
    reason: str

    def to_row(self) -> dict[str, str]:
        return {"url": self.url, "class": self.class_name, "reason": self.reason}


@dataclass
class ClassSelection:
    """What selection made of one class's candidates."""

    candidates: int
    chosen: list[ManifestRow] = field(default_factory=list)
    failed: list[FailedUrl] = field(default_factory=list)
    duplicates: int = 0  # downloads whose bytes an earlier candidate of the class already gave
    not_needed: int = 0  # candidates after the cap was reached
    unfinished: int = 0  # candidates in range that no shard has fetched yet

    def report(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "saved": len(self.chosen),
            "duplicates": self.duplicates,
            "not_needed": self.not_needed,
            "failed": count_kinds(f.reason for f in self.failed),
        }


def count_kinds(reasons: Iterable[str]) -> dict[str, int]:
    """Failure counts by kind (``content_type: text/html`` counts as ``content_type``)."""
    return dict(sorted(Counter(reason_kind(r) for r in reasons).items()))


def _manifest_row(candidate: Candidate, fetch: FetchRecord) -> ManifestRow:
    assert fetch.image is not None
    image = fetch.image
    return ManifestRow(
        class_name=candidate.class_name,
        source=candidate.source,
        url=candidate.url,
        page_url=candidate.page_url,
        license=candidate.license,
        attribution=candidate.attribution,
        status=fetch.status,
        content_type=image.content_type,
        bytes=image.bytes,
        width=image.width,
        height=image.height,
        sha256=image.sha256,
        path=image.path,
        fetched_at=fetch.fetched_at,
    )


def select_class(
    found: list[Candidate], cap: int, fetches: dict[tuple[str, str], FetchRecord]
) -> ClassSelection:
    """Pick a class's first ``cap`` (0: all) distinct images in candidate order."""
    selection = ClassSelection(candidates=len(found))
    chosen: set[str] = set()
    for candidate in found:
        if cap and len(chosen) >= cap:
            selection.not_needed += 1
            continue
        fetch = fetches.get((candidate.class_name, candidate.url))
        if fetch is None:
            selection.unfinished += 1
        elif fetch.image is None:
            selection.failed.append(FailedUrl(candidate.url, candidate.class_name, fetch.reason))
        elif fetch.image.sha256 in chosen:
            selection.duplicates += 1
        else:
            chosen.add(fetch.image.sha256)
            selection.chosen.append(_manifest_row(candidate, fetch))
    return selection


def select(
    candidates: dict[str, list[Candidate]],
    caps: dict[str, int],
    fetches: dict[tuple[str, str], FetchRecord],
) -> dict[str, ClassSelection]:
    """Select every class (see ``select_class``)."""
    return {name: select_class(found, caps[name], fetches) for name, found in candidates.items()}


def manifest_rows(selections: dict[str, ClassSelection]) -> list[ManifestRow]:
    rows = [row for selection in selections.values() for row in selection.chosen]
    return sorted(rows, key=lambda r: (r.class_name, r.path))


def build_report(
    selections: dict[str, ClassSelection], pages: dict[str, PageRecord]
) -> dict[str, Any]:
    """The crawl report: counts per class and failure kind, and each failed URL's reason."""
    failed = [f for selection in selections.values() for f in selection.failed]
    failed_pages = sorted((p for p in pages.values() if not p.ok), key=lambda p: p.key)
    return {
        "saved": sum(len(s.chosen) for s in selections.values()),
        "classes": {name: selection.report() for name, selection in selections.items()},
        "failed": count_kinds(f.reason for f in failed),
        "failed_urls": [f.to_row() for f in failed],
        "pages": {
            "fetched": sum(1 for page in pages.values() if page.ok),
            "failed": count_kinds(page.reason for page in failed_pages),
            "failed_urls": [{"url": page.key, "reason": page.reason} for page in failed_pages],
        },
    }


def write_outputs(
    out: Path,
    report: Path,
    candidates: dict[str, list[Candidate]],
    caps: dict[str, int],
    state: State,
    incomplete: str | None = None,
) -> dict[str, ClassSelection]:
    """Write the manifest and the report; remove image files no state row knows.

    ``incomplete`` (why a crawl stopped early) lets candidates stay unfetched: the manifest
    then holds what was saved so far and the report says why it is incomplete. Returns the
    selections. Raises StageError if, without it, some candidate a class still needs has not
    been fetched by any shard.
    """
    selections = select(candidates, caps, state.fetches)
    unfinished = sum(s.unfinished for s in selections.values())
    if unfinished and incomplete is None:
        raise StageError(
            f"{out / '.state'}: {unfinished} candidates are not fetched yet; finish every shard "
            "(or run the crawl without shards) before merging"
        )
    write_jsonl(out / "manifest.jsonl", [row.to_row() for row in manifest_rows(selections)])
    # image files no state row knows (left by a crawl whose state was reset) only confuse readers
    known = {fetch.image.path for fetch in state.fetches.values() if fetch.image is not None}
    for name in candidates:
        for path in (out / name).glob("*"):
            if path.is_file() and f"{name}/{path.name}" not in known:
                path.unlink()
    written = build_report(selections, state.pages)
    if incomplete is not None:
        written["incomplete"] = incomplete
    atomic_write_json(report, written)
    return selections


def too_few_images(
    minimum: int, selections: dict[str, ClassSelection], pages: dict[str, PageRecord]
) -> str | None:
    """Say which classes have fewer than ``minimum`` (0: no minimum) images and why (their top
    failure reasons); None when every class has enough."""
    short = {name: s for name, s in selections.items() if len(s.chosen) < minimum}
    if not short:
        return None
    page_failures = Counter(reason_kind(p.reason) for p in pages.values() if not p.ok)
    described = []
    for name, selection in short.items():
        why = [f"{selection.candidates} candidates"]
        failed = Counter(reason_kind(f.reason) for f in selection.failed)
        if failed:
            why.append("failed: " + _top(failed))
        if selection.duplicates:
            why.append(f"{selection.duplicates} duplicates")
        if not selection.candidates and page_failures:
            why.append("failed pages/API calls: " + _top(page_failures))
        described.append(f"{name}: {len(selection.chosen)} images ({'; '.join(why)})")
    return f"crawl.min_images_per_class is {minimum}, but " + ", ".join(described)


def _top(counts: Counter[str]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.most_common(3))
