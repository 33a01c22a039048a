"""The crawl-wide deadline and the no-progress watchdog: either ends the crawl with what it has
(manifest and report written, state kept), fails it naming the param, and a rerun resumes."""

from __future__ import annotations

from pathlib import Path

from crawlkit import bounded_crawl, config
from httpservers import LocalServer, Reply, png_bytes

from pipeline.config import StageError
from pipeline.files import read_jsonl


def _listing(tmp_path: Path, urls: list[str]) -> str:
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(urls) + "\n")
    return str(listing)


def test_deadline_ends_a_crawl_waiting_on_retry_after_and_a_rerun_resumes(tmp_path: Path) -> None:
    with LocalServer() as server:
        urls = [server.add(f"/i/{i}.png", png_bytes(seed=i)) for i in range(3)]
        limited = Reply(429, headers={"Retry-After": "3600"})
        server.add("/i/3.png", [limited, Reply(200, png_bytes(seed=3))])
        urls.append(f"{server.url}/i/3.png")
        classes = [{"name": "c", "image_urls": _listing(tmp_path, urls)}]

        finished = bounded_crawl(config(classes, deadline_s=1.0, retries=3), tmp_path)

        assert isinstance(finished.error, StageError)
        message = str(finished.error)
        assert "crawl.deadline_s" in message and "Retry-After" in message
        assert f"127.0.0.1:{server.port}" in message and "rerun" in message
        assert finished.elapsed_s < 4
        rows = read_jsonl(tmp_path / "raw" / "manifest.jsonl")
        assert sorted(r["url"] for r in rows) == sorted(urls[:3])
        assert finished.report["saved"] == 3

        again = bounded_crawl(config(classes), tmp_path)

        assert again.error is None and again.report["saved"] == 4
        assert [server.hits(f"/i/{i}.png") for i in range(4)] == [1, 1, 1, 2]


def test_stall_watchdog_ends_a_crawl_whose_requests_never_finish(tmp_path: Path) -> None:
    with LocalServer() as server:
        fast = server.add("/i/0.png", png_bytes(seed=0))
        slow = server.add("/i/1.png", Reply(200, png_bytes(seed=1), delay_s=5))
        classes = [{"name": "c", "image_urls": _listing(tmp_path, [fast, slow])}]
        cfg = config(classes, stall_timeout_s=0.5, timeout_s=30)

        finished = bounded_crawl(cfg, tmp_path)

        assert isinstance(finished.error, StageError)
        message = str(finished.error)
        assert "crawl.stall_timeout_s" in message
        assert f"1 request to host 127.0.0.1:{server.port}" in message
        assert finished.elapsed_s < 3
        assert [r["url"] for r in read_jsonl(tmp_path / "raw" / "manifest.jsonl")] == [fast]

        server.add("/i/1.png", png_bytes(seed=1))
        again = bounded_crawl(config(classes), tmp_path)

        assert again.error is None and again.report["saved"] == 2
        assert server.hits("/i/0.png") == 1


def test_deadline_during_discovery_fails_naming_the_param(tmp_path: Path) -> None:
    with LocalServer() as server:
        seed = server.add("/g/index.html", Reply(200, b"<img src='a.png'>", delay_s=5))
        cfg = config([{"name": "c", "seeds": [seed]}], deadline_s=0.5, timeout_s=30)

        finished = bounded_crawl(cfg, tmp_path)

        assert isinstance(finished.error, StageError)
        assert "crawl.deadline_s" in str(finished.error)
        assert finished.elapsed_s < 3
