"""The shard API: host shards in text, the crawl plan, and running a plan job by job."""

from __future__ import annotations

from pathlib import Path

import pytest
from httpservers import LocalServer, png_bytes

from pipeline.config import CrawlConfig, StageError
from pipeline.crawl import (
    CrawlPlan,
    DiscoveryJob,
    FetchJob,
    HostShard,
    crawl,
    plan,
    run_discovery_job,
    run_fetch_job,
    run_merge,
)
from pipeline.files import read_jsonl


def test_host_shard_text_is_one_based() -> None:
    shard = HostShard.parse("2/4")
    assert shard == HostShard(index=1, count=4)
    assert str(shard) == "2/4"


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "2/0"])
def test_bad_host_shard_text_is_named_in_the_error(text: str) -> None:
    with pytest.raises(ValueError, match=f"host shard '{text}'"):
        HostShard.parse(text)


def test_plan_without_host_shards_fetches_each_class_with_its_own_discovery() -> None:
    assert plan(["a", "b"], 1, refresh=True) == CrawlPlan(
        discovery=(),
        fetch=(FetchJob("a", None, refresh=True), FetchJob("b", None, refresh=True)),
    )


def test_plan_with_host_shards_discovers_each_class_first_and_refreshes_only_there() -> None:
    crawl_plan = plan(["a", "b"], 2, refresh=True)
    assert crawl_plan.discovery == (
        DiscoveryJob("a", refresh=True),
        DiscoveryJob("b", refresh=True),
    )
    assert crawl_plan.fetch == (
        FetchJob("a", HostShard(0, 2)),
        FetchJob("a", HostShard(1, 2)),
        FetchJob("b", HostShard(0, 2)),
        FetchJob("b", HostShard(1, 2)),
    )
    assert not any(job.refresh for job in crawl_plan.fetch)


def test_crawl_rejects_a_host_shard_tuple_out_of_range(tmp_path: Path) -> None:
    cfg = CrawlConfig.model_validate({"classes": [{"name": "c", "seeds": ["http://x.org/"]}]})
    with pytest.raises(StageError, match=r"host_shard: index must be in 0\.\.1, got 2"):
        crawl(cfg, tmp_path / "raw", tmp_path / "r.json", host_shard=(2, 2), progress=False)


def test_running_a_sharded_plan_writes_the_same_manifest_as_one_crawl(tmp_path: Path) -> None:
    with LocalServer() as first, LocalServer(host="127.0.0.2") as second:
        urls = [
            (first if i % 2 else second).add(f"/i/{i}.png", png_bytes(seed=i)) for i in range(6)
        ]
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls))
        cfg = CrawlConfig.model_validate(
            {
                "classes": [{"name": "c", "image_urls": str(listing)}],
                "allow_private_addresses": True,
                "max_images_per_class": 4,
                "min_images_per_class": 0,
            }
        )
        crawl(cfg, tmp_path / "one" / "raw", tmp_path / "one" / "r.json", progress=False)

        out, report = tmp_path / "sharded" / "raw", tmp_path / "sharded" / "r.json"
        crawl_plan = plan(["c"], 2)
        for discovery_job in crawl_plan.discovery:
            assert run_discovery_job(cfg, discovery_job, out) == 6
        for fetch_job in crawl_plan.fetch:
            run_fetch_job(cfg, fetch_job, out, report)
        summary = run_merge(cfg, out, report)

        def strip(rows: list[dict]) -> list[dict]:
            return [{k: v for k, v in r.items() if k != "fetched_at"} for r in rows]

        assert summary.saved == {"c": 4}
        assert strip(read_jsonl(out / "manifest.jsonl")) == strip(
            read_jsonl(tmp_path / "one" / "raw" / "manifest.jsonl")
        )
