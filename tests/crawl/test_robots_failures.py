"""robots.txt that cannot be read: every way it fails ends the crawl in bounded time, and each
URL it blocks is reported with the true reason (RFC 9309: unreachable means disallow all)."""

from __future__ import annotations

from pathlib import Path

import pytest
from crawlkit import DribbleServer, bounded_crawl, config, page_reasons
from httpservers import LocalServer, Reply, png_bytes

UNREACHABLE = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused


def test_unreachable_host_with_default_retries_ends_with_the_reason(tmp_path: Path) -> None:
    seed = f"{UNREACHABLE}/sandal/index.html"
    cfg = config([{"name": "sandal", "seeds": [seed]}], retries=3)

    finished = bounded_crawl(cfg, tmp_path)

    assert finished.error is None
    assert page_reasons(finished.report) == {seed: "robots_unreachable: connection refused"}


def test_image_on_an_unreachable_host_is_reported_with_the_reason(tmp_path: Path) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"{UNREACHABLE}/a.png\n")
    cfg = config([{"name": "c", "image_urls": str(listing)}])

    finished = bounded_crawl(cfg, tmp_path)

    reason = "robots_unreachable: connection refused"
    assert finished.report["failed_urls"] == [
        {"url": f"{UNREACHABLE}/a.png", "class": "c", "reason": reason}
    ]


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (Reply(503), "robots_unreachable: http_503"),
        (Reply(500), "robots_unreachable: http_500"),
        (Reply(429), "robots_unreachable: http_429"),
        (Reply(429, headers={"Retry-After": "1"}), "robots_unreachable: http_429"),
        (Reply(503, headers={"Retry-After": "3600"}), "robots_unreachable: http_503"),
    ],
    ids=["503", "500", "429", "429-retry-after", "503-retry-after-capped"],
)
def test_robots_server_error_disallows_the_host_with_the_status_as_reason(
    tmp_path: Path, reply: Reply, reason: str
) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", reply)
        seed = server.add("/g/index.html", b"<img src='a.png'>")
        cfg = config([{"name": "c", "seeds": [seed]}], max_retry_after_s=1.0)

        finished = bounded_crawl(cfg, tmp_path)

        assert page_reasons(finished.report) == {seed: reason}
        assert server.hits("/robots.txt") == 2  # the first try and one retry
        assert server.hits("/g/index.html") == 0


def test_robots_timeout_is_the_reason(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", Reply(200, b"User-agent: *\n", delay_s=3))
        seed = server.add("/g/index.html", b"<img src='a.png'>")
        cfg = config([{"name": "c", "seeds": [seed]}], timeout_s=0.3)

        finished = bounded_crawl(cfg, tmp_path)

        assert page_reasons(finished.report)[seed].startswith("robots_unreachable: timeout")
        assert finished.elapsed_s < 5


@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_robots_dribbled_forever_ends_in_bounded_time(tmp_path: Path, headers: bool) -> None:
    with DribbleServer(headers=headers) as server:
        seed = f"{server.url}/g/index.html"
        cfg = config([{"name": "c", "seeds": [seed]}], timeout_s=0.2)

        finished = bounded_crawl(cfg, tmp_path)

        assert page_reasons(finished.report)[seed].startswith("robots_unreachable: timeout")
        assert server.connections == 2  # the first try and one retry, each cut off
        assert finished.elapsed_s < 6


def test_robots_that_answers_on_retry_lets_the_crawl_go_on(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", [Reply(503), Reply(200, b"User-agent: *\nDisallow:\n")])
        server.add("/g/a.png", png_bytes(seed=1))
        seed = server.add("/g/index.html", b"<img src='a.png'>")
        cfg = config([{"name": "c", "seeds": [seed]}])

        finished = bounded_crawl(cfg, tmp_path)

        assert finished.error is None and finished.report["saved"] == 1
        assert server.hits("/robots.txt") == 2
