"""Splitting a crawl into jobs: the plan a flow or the CLI runs, one job at a time or fanned out.

Consumes the class names, the number of host shards and whether to refresh; produces a
CrawlPlan: discovery jobs (run first, one per class) and fetch jobs (one per class and host
shard), then a merge. The rule: without host shards each class's fetch job discovers for
itself (and refreshes, if asked); with host shards every shard of a class needs the class's
candidate list first, so discovery runs once per class (with the refresh) and the shards only
fetch. Any split writes the same manifest as one ``crawl()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline import paths
from pipeline.config import CrawlConfig
from pipeline.crawl.stage import CrawlSummary, crawl, discover, merge_shards
from pipeline.crawl.urls import HostShard, host_shard_of

__all__ = [
    "CrawlPlan",
    "DiscoveryJob",
    "FetchJob",
    "HostShard",
    "host_shard_of",
    "plan",
    "run_discovery_job",
    "run_fetch_job",
    "run_merge",
]


@dataclass(frozen=True)
class DiscoveryJob:
    """Find one class's candidates (walking its sources again if ``refresh``)."""

    class_name: str
    refresh: bool = False

    def __str__(self) -> str:
        return self.class_name + (" (refresh)" if self.refresh else "")


@dataclass(frozen=True)
class FetchJob:
    """Download one class's images, all hosts or one host shard's."""

    class_name: str
    host_shard: HostShard | None = None
    refresh: bool = False  # only without host shards: there discovery jobs walk

    def __str__(self) -> str:
        label = self.class_name
        if self.host_shard is not None:
            label += f" host shard {self.host_shard}"
        return label + (" (refresh)" if self.refresh else "")


@dataclass(frozen=True)
class CrawlPlan:
    """Run every discovery job, then every fetch job (each list in any order, or at once),
    then ``run_merge``."""

    discovery: tuple[DiscoveryJob, ...]
    fetch: tuple[FetchJob, ...]


def plan(class_names: Iterable[str], shard_count: int, refresh: bool = False) -> CrawlPlan:
    """The jobs of a crawl of ``class_names`` over ``shard_count`` host shards (1: none).

    Raises ValueError for a shard count below 1.
    """
    if shard_count < 1:
        raise ValueError(f"shard_count must be at least 1, got {shard_count}")
    names = list(class_names)
    if shard_count == 1:
        return CrawlPlan((), tuple(FetchJob(name, None, refresh) for name in names))
    return CrawlPlan(
        tuple(DiscoveryJob(name, refresh) for name in names),
        tuple(
            FetchJob(name, HostShard(index, shard_count))
            for name in names
            for index in range(shard_count)
        ),
    )


def run_discovery_job(
    cfg: CrawlConfig, job: DiscoveryJob, out: Path = paths.RAW, progress: bool = False
) -> int:
    """Run one discovery job; returns the class's number of candidates."""
    found = discover(cfg, out, classes=[job.class_name], progress=progress, refresh=job.refresh)
    return found[job.class_name]


def run_fetch_job(
    cfg: CrawlConfig,
    job: FetchJob,
    out: Path = paths.RAW,
    report: Path = paths.CRAWL_REPORT,
    progress: bool = False,
) -> CrawlSummary:
    """Run one fetch job (its class's discovery too, unless a discovery job did it)."""
    return crawl(
        cfg,
        out,
        report,
        classes=[job.class_name],
        host_shard=job.host_shard,
        progress=progress,
        refresh=job.refresh,
    )


def run_merge(
    cfg: CrawlConfig, out: Path = paths.RAW, report: Path = paths.CRAWL_REPORT
) -> CrawlSummary:
    """Merge every job's state into the manifest and report (``merge_shards``)."""
    return merge_shards(cfg, out, report)
