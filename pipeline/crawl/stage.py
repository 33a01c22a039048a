"""The crawl stage's entry points: ``crawl``, ``discover`` and ``merge_shards``.

Consumes the ``crawl`` section of params.yaml (CrawlConfig, with its classes) and the web (or
the demo site); produces ``<out>/<class>/<sha256>.<ext>``, ``<out>/manifest.jsonl``, the crawl
report and the resume state in ``<out>/.state`` (see the package docstring). Each entry point
builds the pieces' settings from the config and wires them: demo server → state → discovery →
fetching → selection. A crawl-wide limit (limits.py) or a class short of
``min_images_per_class`` fails the stage with StageError, after writing what it has.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths
from pipeline.config import ClassConfig, CrawlConfig, StageError
from pipeline.crawl.demo_server import url_map
from pipeline.crawl.discovery import Discovery, DiscoverySettings, class_cap, class_fingerprint
from pipeline.crawl.fetch import Fetcher, FetchSettings
from pipeline.crawl.limits import CrawlStopped
from pipeline.crawl.manifest import (
    ClassSelection,
    count_kinds,
    select,
    too_few_images,
    write_outputs,
)
from pipeline.crawl.scheduler import Network
from pipeline.crawl.state import Candidate, State, forget_state_if_demo_changed
from pipeline.crawl.urls import HostShard

SHARD_SUFFIX = " (shard done; run merge_shards for the manifest)"
RESUME = (
    "the crawl is incomplete and the stage fails: rerun it to resume where it stopped (the "
    "scheduled flow's retries and next run do; nothing fetched is fetched again)"
)


@dataclass(frozen=True)
class CrawlSummary:
    """What a crawl (or one shard of it) did; ``str()`` is the CLI's one-line summary.

    Every field is JSON-serialisable (``dataclasses.asdict`` gives the flow's log record).
    """

    saved: dict[str, int]
    failed: dict[str, int]  # failed candidates by reason kind
    pages: int
    requests: int
    elapsed_s: float
    complete: bool = True
    new_candidates: int | None = None  # set by a refresh: URLs its walk found that were not known
    duplicates: int = 0  # downloads discarded because an image with the same bytes was kept

    def __str__(self) -> str:
        per_class = ", ".join(f"{name} {n}" for name, n in self.saved.items())
        failures = ", ".join(f"{reason} {n}" for reason, n in sorted(self.failed.items()))
        text = (
            f"{sum(self.saved.values())} images saved ({per_class}) from {self.pages} pages; "
            f"{self.duplicates} duplicate downloads discarded; "
            f"{sum(self.failed.values())} candidates failed ({failures or 'none'}); "
            f"{self.requests} HTTP requests this run"
        )
        if self.new_candidates is not None:
            text += f"; refresh found {self.new_candidates} new candidate URLs"
        empty = [name for name, n in self.saved.items() if n == 0]
        if empty:
            text += f"; NO IMAGES for {', '.join(empty)} (see the report's failure counts)"
        return text if self.complete else text + SHARD_SUFFIX


def _pick_classes(cfg: CrawlConfig, classes: Iterable[str] | None) -> list[ClassConfig]:
    if classes is None:
        return list(cfg.classes)
    wanted = list(classes)
    known = {k.name: k for k in cfg.classes}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise StageError(f"classes: no class named {', '.join(unknown)} in params.yaml")
    return [known[name] for name in wanted]


def _caps(cfg: CrawlConfig, classes: Iterable[ClassConfig]) -> dict[str, int]:
    return {k.name: class_cap(k, cfg.max_images_per_class) for k in classes}


def discover(
    cfg: CrawlConfig,
    out: Path = paths.RAW,
    classes: Iterable[str] | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> dict[str, int]:
    """Run phase 1 only (for a fan-out flow: one task per class before the host shards).

    With ``refresh`` the sources are walked again and new URLs appended (see the package
    docstring); the host shards then fetch them with ``crawl(..., host_shard=...)``.
    Returns the number of candidates per class; the lists are kept in ``<out>/.state``.
    Raises StageError for bad sources (missing URL list, {demo} without a demo site).
    """
    chosen = _pick_classes(cfg, classes)
    shard_id = "discover-" + "-".join(k.name for k in chosen)
    forget_state_if_demo_changed(cfg.serve_demo_site, Path(out))
    state = State(Path(out), shard_id)
    settings = DiscoverySettings.from_config(cfg)
    with url_map(cfg.classes, cfg.serve_demo_site) as urls, contextlib.closing(state):
        discovery = Discovery(settings, state, urls, Network.from_config(cfg), progress)
        try:
            found = discovery.run(chosen, refresh)
        except CrawlStopped as stop:
            raise StageError(f"{stop}. Stopped during discovery, state kept; {RESUME}") from None
    return {name: len(found[name]) for name in found}


def _host_shard(value: HostShard | tuple[int, int] | None, refresh: bool) -> HostShard | None:
    if value is None:
        return None
    try:
        shard = HostShard.coerce(value)
    except ValueError as exc:
        raise StageError(f"host_shard: {exc}") from None
    if refresh:
        # every shard would walk the class's sources again, each appending to one list
        raise StageError(
            "refresh: not with host_shard; run discover(..., refresh=True) once per class, "
            "then the host shards without refresh"
        )
    return shard


def _state_id(classes: list[ClassConfig] | None, shard: HostShard | None) -> str:
    """The name of a crawl's own state files: "all", or the classes and host shard it does."""
    state_id = "-".join(k.name for k in classes) if classes is not None else "all"
    return state_id if shard is None else f"{state_id}.{shard.state_suffix}"


def crawl(
    cfg: CrawlConfig,
    out: Path = paths.RAW,
    report: Path = paths.CRAWL_REPORT,
    *,
    classes: Iterable[str] | None = None,
    host_shard: HostShard | tuple[int, int] | None = None,
    progress: bool = True,
    refresh: bool = False,
) -> CrawlSummary:
    """Crawl images for every class into ``out``; write the manifest and ``report``.

    With ``classes`` (a subset of names) and/or ``host_shard`` (a HostShard, or the older
    ``(index, count)`` tuple, 0-based) it crawls only that part, writing its own state files,
    and leaves the manifest to ``merge_shards``; shards of one crawl may run at the same time in
    different processes. Reruns resume: nothing recorded as done is fetched again. ``refresh``
    walks the sources again for new images; with host shards, call ``discover(...,
    refresh=True)`` once instead (``shards.plan`` does this).

    Returns a CrawlSummary. Raises StageError naming the params key, file or URL for bad input.
    """
    started = time.monotonic()
    out = Path(out)
    partial = classes is not None or host_shard is not None
    chosen = _pick_classes(cfg, classes)
    shard = _host_shard(host_shard, refresh)
    forget_state_if_demo_changed(cfg.serve_demo_site, out)
    state = State(out, _state_id(chosen if classes is not None else None, shard))
    network = Network.from_config(cfg)
    caps = _caps(cfg, chosen)

    def mine(candidate: Candidate) -> bool:
        return shard is None or shard.contains(candidate.url)

    with url_map(cfg.classes, cfg.serve_demo_site) as urls, contextlib.closing(state):
        discovery = Discovery(DiscoverySettings.from_config(cfg), state, urls, network, progress)
        fetcher = Fetcher(FetchSettings.from_config(cfg), state, urls, network, out, progress)
        candidates: dict[str, list[Candidate]] | None = None
        try:
            candidates = discovery.run(chosen, refresh)
            fetcher.run(candidates, caps, mine)
        except CrawlStopped as stop:
            written = None if partial else candidates  # a shard leaves the manifest to the merge
            raise _stopped(stop, out, report, written, caps, state) from None
    if partial:
        selections = select(candidates, caps, state.fetches)
        failed = count_kinds(
            fetch.reason
            for (name, _), fetch in state.fetches.items()
            if fetch.image is None and name in candidates
        )
    else:
        selections = write_outputs(out, report, candidates, caps, state)
        failed = count_kinds(f.reason for s in selections.values() for f in s.failed)
        _check_minimum(cfg, selections, state)
    return _summary(
        [k.name for k in chosen],
        selections,
        failed,
        state,
        requests=network.transport.requests,
        started=started,
        complete=not partial,
        new_candidates=sum(discovery.added.values()) if refresh else None,
    )


def merge_shards(
    cfg: CrawlConfig, out: Path = paths.RAW, report: Path = paths.CRAWL_REPORT
) -> CrawlSummary:
    """Combine the state of every shard into ``<out>/manifest.jsonl`` and ``report``.

    Returns a CrawlSummary (no requests are made). Raises StageError if a class has not been
    discovered or a shard has not finished the candidates its class still needs.
    """
    started = time.monotonic()
    out = Path(out)
    state = State(out, "merge")
    settings = DiscoverySettings.from_config(cfg)
    candidates = {}
    for klass in cfg.classes:
        found = state.load_candidates(klass.name, class_fingerprint(settings, klass))
        if found is None:
            raise StageError(
                f"{state.candidates_path(klass.name)}: class {klass.name!r} has no finished "
                "discovery for the current params; run its crawl shard first"
            )
        candidates[klass.name] = found
    selections = write_outputs(out, report, candidates, _caps(cfg, cfg.classes), state)
    failed = count_kinds(f.reason for s in selections.values() for f in s.failed)
    _check_minimum(cfg, selections, state)
    return _summary(list(candidates), selections, failed, state, requests=0, started=started)


def _stopped(
    stop: CrawlStopped,
    out: Path,
    report: Path,
    candidates: dict[str, list[Candidate]] | None,
    caps: dict[str, int],
    state: State,
) -> StageError:
    """The error a crawl stopped by a limit fails with, after writing the manifest and report
    for what it saved (a whole crawl stopped while fetching) or leaving them as they were
    (stopped during discovery, or one shard of a crawl)."""
    if candidates is None:
        return StageError(f"{stop}. The state is kept, the manifest left as it was; {RESUME}")
    selections = write_outputs(out, report, candidates, caps, state, incomplete=str(stop))
    saved = sum(len(s.chosen) for s in selections.values())
    return StageError(
        f"{stop}. Wrote the manifest and {report} for the {saved} images saved so far; {RESUME}"
    )


def _check_minimum(cfg: CrawlConfig, selections: dict[str, ClassSelection], state: State) -> None:
    """Raise StageError if a class has fewer than crawl.min_images_per_class images (the
    manifest and report are already written, so the rest of the crawl is not lost)."""
    problem = too_few_images(cfg.min_images_per_class, selections, state.pages)
    if problem:
        raise StageError(
            f"{problem}. The manifest and report are written (each failed URL with its reason "
            "is in the report); fix the class's sources or lower crawl.min_images_per_class, "
            "then rerun: images already saved are kept, failed URLs are not tried again "
            f"(delete {state.dir}/fetch-*.jsonl to retry them)"
        )


def _summary(
    names: list[str],
    selections: dict[str, ClassSelection],
    failed: dict[str, int],
    state: State,
    *,
    requests: int,
    started: float,
    complete: bool = True,
    new_candidates: int | None = None,
) -> CrawlSummary:
    return CrawlSummary(
        saved={name: len(selections[name].chosen) for name in names},
        failed=failed,
        pages=sum(1 for page in state.pages.values() if page.ok),
        requests=requests,
        elapsed_s=time.monotonic() - started,
        complete=complete,
        new_candidates=new_candidates,
        duplicates=sum(s.duplicates for s in selections.values()),
    )
