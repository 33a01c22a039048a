"""Crawl stage against real local HTTP servers: sources, politeness, safety, resume, shards."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from httpservers import LocalServer, Reply, html_page, png_bytes

from pipeline.config import DEFAULT_TRACKING_PARAMS, CrawlConfig, StageError, parse_params
from pipeline.crawl import crawl, discover, merge_shards
from pipeline.crawl.politeness import x_robots_opt_outs
from pipeline.crawl.sources.pages import largest_from_srcset
from pipeline.crawl.state import StateLog
from pipeline.crawl.urls import strip_tracking
from pipeline.files import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "crawl"


def config(classes: list[dict[str, Any]], **overrides: Any) -> CrawlConfig:
    settings: dict[str, Any] = {
        "user_agent": "crawl2model-test/1.0 (+mailto:tests@example.org)",
        "allow_private_addresses": True,
        "retries": 2,
        "backoff_s": 0.01,
        "timeout_s": 2.0,
        "concurrency": 4,
        "max_per_host": 2,
        "api_delay_s": 0.0,
        "min_images_per_class": 0,  # tiny sets; tests/crawl/test_min_images.py tests the minimum
    }
    settings.update(overrides)
    return CrawlConfig.model_validate({"classes": classes, **settings})


def run(cfg: CrawlConfig, tmp_path: Path, **kwargs: Any) -> tuple[list[dict], dict]:
    out = tmp_path / "raw"
    report = tmp_path / "crawl_report.json"
    crawl(cfg, out, report, progress=False, **kwargs)
    return read_jsonl(out / "manifest.jsonl"), json.loads(report.read_text())


def gallery(server: LocalServer, images: dict[str, bytes], folder: str = "/g") -> str:
    """Serve images under ``folder`` with an index page of <img> tags; return the page URL."""
    tags = []
    for name, data in images.items():
        server.add(f"{folder}/{name}", data)
        tags.append(f'<img src="{name}">')
    return server.add(f"{folder}/index.html", html_page("".join(tags)))


def failures(report: dict, name: str = "c") -> dict[str, int]:
    return report["classes"][name]["failed"]


# --- the bundled demo site -----------------------------------------------------------------


def test_demo_site_crawl_saves_hash_named_images_with_licence(tmp_path: Path) -> None:
    cfg = config(
        [
            {"name": "sandal", "seeds": ["{demo}/sandal/index.html"]},
            {"name": "sneaker", "seeds": ["{demo}/sneaker/index.html"]},
        ],
        serve_demo_site=str(ROOT / "demo" / "site"),
        max_images_per_class=12,
        max_per_host=4,
    )
    rows, report = run(cfg, tmp_path)
    assert report["saved"] == 24
    assert {r["class"] for r in rows} == {"sandal", "sneaker"}
    row = rows[0]
    assert row["url"].startswith("{demo}/") and row["page_url"].startswith("{demo}/")
    assert row["license"] == "https://opensource.org/licenses/MIT"
    assert "Zalando" in row["attribution"]
    assert row["path"] == f"{row['class']}/{row['sha256']}.png"
    assert (tmp_path / "raw" / row["path"]).stat().st_size == row["bytes"]


def test_demo_site_private_area_is_never_saved(tmp_path: Path) -> None:
    cfg = config(
        [
            {"name": "sandal", "seeds": ["{demo}/sandal/index.html"]},
            {"name": "sneaker", "seeds": ["{demo}/sneaker/index.html"]},
        ],
        serve_demo_site=str(ROOT / "demo" / "site"),
        max_images_per_class=5,
        max_per_host=4,
    )
    rows, report = run(cfg, tmp_path)
    assert not any("/private/" in r["url"] for r in rows)
    assert failures(report, "sandal")["robots_disallowed"] == 1


# --- page parsing ----------------------------------------------------------------------------


def test_srcset_picks_the_largest_candidate() -> None:
    assert largest_from_srcset("a.png 1x, b.png 3x, c.png 2x") == "b.png"
    assert largest_from_srcset("s.png 320w, l.png 1280w, m.png 640w") == "l.png"


def test_pages_yield_srcset_relative_and_linked_images_each_fetched_once(tmp_path: Path) -> None:
    with LocalServer() as server:
        for name, seed in [("small.png", 1), ("big.png", 2), ("linked.png", 3), ("og.png", 4)]:
            server.add(f"/site/img/{name}", png_bytes(seed=seed))
        server.add("/site/sub/page.html", html_page('<img src="../img/linked.png">'))
        server.add(
            "/site/index.html",
            html_page(
                '<img src="img/small.png" srcset="img/small.png 1x, img/big.png 2x">'
                '<a href="img/linked.png">download</a> <a href="./img/linked.png#x">again</a>'
                '<a href="sub/page.html">more</a> <a href="sub/page.html">more again</a>',
                head='<meta property="og:image" content="/site/img/og.png">',
            ),
        )
        rows, _ = run(config([{"name": "c", "seeds": [f"{server.url}/site/index.html"]}]), tmp_path)
        assert sorted(r["url"].rsplit("/", 1)[1] for r in rows) == [
            "big.png",
            "linked.png",
            "og.png",
        ]
        assert server.hits("/site/img/small.png") == 0
        assert server.hits("/site/img/linked.png") == 1
        assert server.hits("/site/sub/page.html") == 1


def test_decorated_image_link_is_fetched_once_under_its_plain_url(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/img/a.png", png_bytes(seed=1))
        server.add(
            "/g/index.html",
            html_page('<a href="/img/a.png?utm_source=x#frag">big</a><img src="/img/a.png">'),
        )
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert [r["url"] for r in rows] == [f"{server.url}/img/a.png"]
        assert server.hits("/img/a.png") == 1
        assert server.hits("/img/a.png?utm_source=x") == 0
        assert report["classes"]["c"]["duplicates"] == 0


def test_tracking_parameters_come_from_the_config(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/img/a.png", png_bytes(seed=1))
        server.add(
            "/g/index.html", html_page('<img src="/img/a.png?session=7"><img src="/img/a.png">')
        )
        cfg = config(
            [{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], tracking_params=["session"]
        )
        rows, _ = run(cfg, tmp_path)
        assert [r["url"] for r in rows] == [f"{server.url}/img/a.png"]
        assert server.hits("/img/a.png") == 1 and server.hits("/img/a.png?session=7") == 0


def test_tracking_parameters_and_fragments_are_stripped_others_kept() -> None:
    url = "http://x.org/a.png?v=2&utm_source=news&fbclid=1#top"
    assert strip_tracking(url, DEFAULT_TRACKING_PARAMS) == "http://x.org/a.png?v=2"
    assert strip_tracking(url, ["v"]) == "http://x.org/a.png?utm_source=news&fbclid=1"
    assert strip_tracking("{demo}/a.png?ref=home", DEFAULT_TRACKING_PARAMS) == "{demo}/a.png"
    assert strip_tracking("http://x.org/a.png?b=1&a=2", DEFAULT_TRACKING_PARAMS) == (
        "http://x.org/a.png?b=1&a=2"
    )


def test_links_are_followed_only_to_max_depth(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/d/p0.html", html_page('<a href="p1.html">1</a><img src="i0.png">'))
        server.add("/d/p1.html", html_page('<a href="p2.html">2</a><img src="i1.png">'))
        server.add("/d/p2.html", html_page('<img src="i2.png">'))
        for i in range(3):
            server.add(f"/d/i{i}.png", png_bytes(seed=i))
        cfg = config([{"name": "c", "seeds": [f"{server.url}/d/p0.html"]}], max_depth=1)
        rows, _ = run(cfg, tmp_path)
        assert sorted(r["url"][-6:] for r in rows) == ["i0.png", "i1.png"]
        assert server.hits("/d/p2.html") == 0


# --- politeness ------------------------------------------------------------------------------


def test_robots_txt_disallowed_urls_are_not_requested(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", b"User-agent: *\nDisallow: /secret/\n")
        server.add("/secret/x.png", png_bytes(seed=1))
        seed = gallery(server, {"ok.png": png_bytes(seed=2)})
        server.add("/g/index.html", html_page('<img src="ok.png"><img src="/secret/x.png">'))
        rows, report = run(config([{"name": "c", "seeds": [seed]}]), tmp_path)
        assert len(rows) == 1
        assert server.hits("/secret/x.png") == 0
        assert failures(report) == {"robots_disallowed": 1}


def test_robots_txt_server_error_disallows_the_whole_host(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", Reply(500))
        seed = gallery(server, {"a.png": png_bytes(seed=1)})
        rows, report = run(config([{"name": "c", "seeds": [seed]}], retries=0), tmp_path)
        assert rows == []
        assert server.hits("/g/index.html") == 0
        assert report["pages"]["failed"] == {"robots_unreachable": 1}
        assert report["pages"]["failed_urls"][0]["reason"] == "robots_unreachable: http_500"


def test_robots_txt_missing_allows_everything(tmp_path: Path) -> None:
    with LocalServer() as server:  # /robots.txt answers 404
        seed = gallery(server, {"a.png": png_bytes(seed=1)})
        rows, _ = run(config([{"name": "c", "seeds": [seed]}]), tmp_path)
        assert len(rows) == 1
        assert server.hits("/robots.txt") == 1


def test_crawl_delay_spaces_requests_to_a_host(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/robots.txt", b"User-agent: *\nCrawl-delay: 0.3\n")
        seed = gallery(server, {f"{i}.png": png_bytes(seed=i) for i in range(3)})
        run(config([{"name": "c", "seeds": [seed]}], max_per_host=4), tmp_path)
        starts = sorted(h.started for h in server.hit_log if h.path != "/robots.txt")
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert len(starts) == 4 and min(gaps) >= 0.28


def test_requests_carry_the_configured_user_agent(tmp_path: Path) -> None:
    with LocalServer() as server:
        seed = gallery(server, {"a.png": png_bytes(seed=1)})
        run(config([{"name": "c", "seeds": [seed]}]), tmp_path)
        assert {h.user_agent for h in server.hit_log} == {
            "crawl2model-test/1.0 (+mailto:tests@example.org)"
        }


def test_per_host_limit_holds_under_concurrency(tmp_path: Path) -> None:
    with LocalServer() as first, LocalServer(host="127.0.0.2") as second:
        urls = []
        for n, server in enumerate((first, second)):
            for i in range(8):
                reply = Reply(200, png_bytes(seed=10 * n + i), delay_s=0.05)
                urls.append(server.add(f"/{i}.png", reply))
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls))
        cfg = config([{"name": "c", "image_urls": str(listing)}], concurrency=8, max_per_host=2)
        rows, _ = run(cfg, tmp_path)
        assert len(rows) == 16
        for server in (first, second):
            assert max(server.peak_in_flight.values()) == 2


def test_429_retry_after_is_honoured_then_saved(tmp_path: Path) -> None:
    with LocalServer() as server:
        png = png_bytes(seed=1)
        server.add("/g/a.png", [Reply(429, headers={"Retry-After": "1"}), Reply(200, png)])
        server.add("/g/index.html", html_page('<img src="a.png">'))
        rows, _ = run(config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path)
        hits = [h.started for h in server.hit_log if h.path == "/g/a.png"]
        assert len(rows) == 1 and len(hits) == 2
        assert hits[1] - hits[0] >= 0.95


def test_server_error_then_success_is_retried_and_saved(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/a.png", [Reply(500), Reply(503), Reply(200, png_bytes(seed=1))])
        server.add("/g/index.html", html_page('<img src="a.png">'))
        rows, _ = run(config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path)
        assert len(rows) == 1 and server.hits("/g/a.png") == 3


def test_persistent_server_error_gives_up_after_retries(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/a.png", Reply(500))
        server.add("/g/index.html", html_page('<img src="a.png">'))
        cfg = config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], retries=2)
        rows, report = run(cfg, tmp_path)
        assert rows == [] and server.hits("/g/a.png") == 3
        assert failures(report) == {"http_500": 1}


def test_not_found_is_recorded_and_not_retried(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/index.html", html_page('<img src="gone.png">'))
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert rows == [] and server.hits("/g/gone.png") == 1
        assert failures(report) == {"http_404": 1}


def test_x_robots_tag_opt_out_skips_the_image(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/a.png", Reply(200, png_bytes(seed=1), headers={"X-Robots-Tag": "noimageai"}))
        server.add(
            "/g/b.png",
            Reply(200, png_bytes(seed=2), headers={"X-Robots-Tag": "otherbot: noindex"}),
        )
        server.add("/g/index.html", html_page('<img src="a.png"><img src="b.png">'))
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert [r["url"][-5:] for r in rows] == ["b.png"]
        assert failures(report) == {"x_robots_tag": 1}


def test_x_robots_tag_directives_scoped_to_other_crawlers_are_ignored() -> None:
    ua = "crawl2model/0.1"
    assert x_robots_opt_outs(["noai, noimageai"], ua) == {"noai", "noimageai"}
    assert x_robots_opt_outs(["googlebot: noindex"], ua) == set()
    assert x_robots_opt_outs(["crawl2model: noindex", "unavailable_after: 2020"], ua) == {"noindex"}


# --- safety ----------------------------------------------------------------------------------


def test_wrong_content_type_and_non_image_bodies_are_refused(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/page.jpg", Reply(200, html_page("oops"), content_type="text/html"))
        server.add("/g/fake.png", Reply(200, html_page("not a png"), content_type="image/png"))
        server.add("/g/index.html", html_page('<img src="page.jpg"><img src="fake.png">'))
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert rows == []
        assert failures(report) == {"content_type": 1, "not_an_image": 1}
        assert list((tmp_path / "raw").glob("c/*")) == []


def test_report_lists_each_failed_url_with_what_came_back(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/page.jpg", Reply(200, html_page("oops"), content_type="text/html"))
        png = png_bytes(seed=1)
        server.add("/g/cut.png", Reply(200, png[: len(png) // 2], content_type="image/png"))
        server.add("/g/index.html", html_page('<img src="page.jpg"><img src="cut.png">'))
        server.add("/g/more.html", html_page('<img src="gone.png">'))
        seeds = [f"{server.url}/g/index.html", f"{server.url}/g/more.html"]
        rows, report = run(config([{"name": "c", "seeds": seeds}]), tmp_path)
        assert rows == []
        assert report["failed_urls"] == [
            {"url": f"{server.url}/g/page.jpg", "class": "c", "reason": "content_type: text/html"},
            {
                "url": f"{server.url}/g/cut.png",
                "class": "c",
                "reason": "not_an_image: truncated PNG",
            },
            {"url": f"{server.url}/g/gone.png", "class": "c", "reason": "http_404"},
        ]
        assert report["failed"] == {"content_type": 1, "http_404": 1, "not_an_image": 1}


def test_truncated_body_is_retried_then_refused(tmp_path: Path) -> None:
    with LocalServer() as server:
        png = png_bytes(seed=1)
        server.add("/g/cut.png", Reply(200, png, truncate_to=len(png) // 2))
        server.add("/g/index.html", html_page('<img src="cut.png">'))
        cfg = config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], retries=1)
        rows, report = run(cfg, tmp_path)
        assert rows == [] and server.hits("/g/cut.png") == 2
        assert failures(report) == {"truncated": 1}


def test_huge_bodies_are_refused_without_downloading_them(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/declared.png", Reply(200, b"\0" * 300_000))
        server.add("/g/endless.png", Reply(200, chunked_forever=True))
        server.add("/g/index.html", html_page('<img src="declared.png"><img src="endless.png">'))
        cfg = config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], max_bytes=100_000)
        rows, report = run(cfg, tmp_path)
        assert rows == [] and failures(report) == {"too_large": 2}
        assert server.sent["/g/endless.png"] < 5_000_000


def test_tiny_images_are_refused(tmp_path: Path) -> None:
    with LocalServer() as server:
        seed = gallery(server, {"icon.png": png_bytes(size=8), "ok.png": png_bytes(size=32)})
        rows, report = run(config([{"name": "c", "seeds": [seed]}]), tmp_path)
        assert len(rows) == 1 and failures(report) == {"too_small": 1}


def test_slow_server_times_out(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/slow.png", Reply(200, png_bytes(seed=1), delay_s=1.5))
        server.add("/g/index.html", html_page('<img src="slow.png">'))
        cfg = config(
            [{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], timeout_s=0.3, retries=0
        )
        rows, report = run(cfg, tmp_path)
        assert rows == [] and failures(report) == {"timeout": 1}


def test_redirect_loop_is_detected(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/a.png", Reply(302, headers={"Location": "/g/b.png"}))
        server.add("/g/b.png", Reply(301, headers={"Location": "/g/a.png"}))
        server.add("/g/index.html", html_page('<img src="a.png">'))
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert rows == [] and failures(report) == {"redirect_loop": 1}
        assert server.hits("/g/a.png") == 1


def test_redirect_to_another_host_is_followed_with_its_own_robots(tmp_path: Path) -> None:
    with LocalServer() as site, LocalServer(host="127.0.0.2") as cdn:
        cdn.add("/robots.txt", b"User-agent: *\nDisallow: /private/\n")
        cdn.add("/img/a.png", png_bytes(seed=1))
        cdn.add("/private/b.png", png_bytes(seed=2))
        site.add("/g/a.png", Reply(302, headers={"Location": f"{cdn.url}/img/a.png"}))
        site.add("/g/b.png", Reply(302, headers={"Location": f"{cdn.url}/private/b.png"}))
        site.add("/g/index.html", html_page('<img src="a.png"><img src="b.png">'))
        rows, report = run(config([{"name": "c", "seeds": [f"{site.url}/g/index.html"]}]), tmp_path)
        assert [r["url"] for r in rows] == [f"{site.url}/g/a.png"]
        assert cdn.hits("/img/a.png") == 1 and cdn.hits("/private/b.png") == 0
        assert failures(report) == {"robots_disallowed": 1}


def test_redirect_to_a_non_http_scheme_is_refused(tmp_path: Path) -> None:
    with LocalServer() as server:
        server.add("/g/a.png", Reply(302, headers={"Location": "file:///etc/passwd"}))
        server.add("/g/index.html", html_page('<img src="a.png">'))
        rows, report = run(
            config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}]), tmp_path
        )
        assert rows == [] and failures(report) == {"bad_scheme": 1}


def test_private_addresses_are_refused_unless_allowed(tmp_path: Path) -> None:
    with LocalServer() as server:
        url = server.add("/a.png", png_bytes(seed=1))
        listing = tmp_path / "urls.txt"
        listing.write_text(url + "\n")
        cfg = config([{"name": "c", "image_urls": str(listing)}], allow_private_addresses=False)
        rows, report = run(cfg, tmp_path)
        assert rows == [] and server.hits() == 0
        assert failures(report) == {"private_address": 1}


# --- sources ---------------------------------------------------------------------------------


def test_url_list_csv_carries_licence_and_skips_non_http(tmp_path: Path) -> None:
    with LocalServer() as server:
        url = server.add("/a.png", png_bytes(seed=1))
        listing = tmp_path / "urls.csv"
        listing.write_text(
            f"url,license,attribution\n{url},CC BY 4.0,Ada\nftp://example.org/b.png,CC0,Bob\n"
        )
        rows, _ = run(config([{"name": "c", "image_urls": str(listing)}]), tmp_path)
        assert [(r["source"], r["license"], r["attribution"]) for r in rows] == [
            ("urls", "CC BY 4.0", "Ada")
        ]


def test_missing_url_list_names_the_file(tmp_path: Path) -> None:
    cfg = config([{"name": "c", "image_urls": str(tmp_path / "nope.txt")}])
    with pytest.raises(StageError, match=r"nope\.txt"):
        run(cfg, tmp_path)


def _fixture(name: str, images: str) -> bytes:
    return (FIXTURES / name).read_text().replace("{images}", images).encode()


def test_wikimedia_commons_category_pages_through_continue(tmp_path: Path) -> None:
    with LocalServer() as api, LocalServer(host="127.0.0.2") as images:
        images.add("/commons/thumb/cat1.png", png_bytes(seed=1))
        images.add("/commons/thumb/cat2.png", png_bytes(seed=2))
        seen: list[dict[str, list[str]]] = []

        def answer(count: int, path: str) -> Reply:
            query = parse_qs(urlsplit(path).query)
            seen.append(query)
            page = "page2" if "gcmcontinue" in query else "page1"
            body = _fixture(f"wikimedia_category_{page}.json", images.url)
            return Reply(200, body, content_type="application/json")

        api.add("/w/api.php", answer)
        api.add("/robots.txt", b"User-agent: *\nDisallow: /w/\n")  # as on Wikimedia's sites
        cfg = config(
            [{"name": "cat", "commons_category": "Felis silvestris catus"}],
            wikimedia_api=f"{api.url}/w/api.php",
        )
        rows, _ = run(cfg, tmp_path)
        assert seen[0]["gcmtitle"] == ["Category:Felis silvestris catus"]
        assert seen[0]["prop"] == ["imageinfo"] and "extmetadata" in seen[0]["iiprop"][0]
        assert seen[1]["gcmcontinue"] == ["file|43415420322e4a5047|90002"]
        by_url = {r["url"].rsplit("/", 1)[1]: r for r in rows}
        assert sorted(by_url) == ["cat1.png", "cat2.png"]  # the SVG is not an accepted type
        assert by_url["cat1.png"]["license"] == "CC BY-SA 4.0"
        assert by_url["cat1.png"]["attribution"] == "Example Photographer"
        assert by_url["cat2.png"]["attribution"] == "Jane Doe from Berlin"
        assert by_url["cat2.png"]["page_url"] == "https://commons.wikimedia.org/wiki/File:Cat_2.jpg"
        assert all(r["source"] == "wikimedia_commons" for r in rows)
        assert api.hits("/robots.txt") == 0  # API calls are not crawling


def test_openverse_query_pages_skips_mature_and_respects_rate_limit(tmp_path: Path) -> None:
    with LocalServer() as api, LocalServer(host="127.0.0.2") as images:
        images.add("/openverse/tabby.png", png_bytes(seed=1))
        images.add("/openverse/kitten.png", png_bytes(seed=2))
        images.add("/openverse/mature.png", png_bytes(seed=3))

        calls: list[str] = []

        def answer(count: int, path: str) -> Reply:
            calls.append(path)
            if len(calls) == 2:  # the API throttles once
                return Reply(429, b'{"detail": "throttled"}', headers={"Retry-After": "1"})
            page = parse_qs(urlsplit(path).query)["page"][0]
            body = _fixture(f"openverse_page{page}.json", images.url)
            return Reply(200, body, content_type="application/json")

        api.add("/v1/images/", answer)
        cfg = config(
            [{"name": "cat", "query": "cat"}],
            query_sources=["openverse"],
            openverse_api=f"{api.url}/v1/images/",
            api_delay_s=0.2,
        )
        rows, _ = run(cfg, tmp_path)
        assert sorted((r["url"].rsplit("/", 1)[1], r["license"]) for r in rows) == [
            ("kitten.png", "CC0 1.0"),
            ("tabby.png", "CC BY 2.0"),
        ]
        assert {r["page_url"] for r in rows} >= {
            "https://www.flickr.com/photos/example/51234567890"
        }
        assert images.hits("/openverse/mature.png") == 0
        starts = [h.started for h in api.hit_log if h.path.startswith("/v1/")]
        assert len(starts) == 3 and starts[2] - starts[1] >= 0.95
        query = parse_qs(urlsplit(api.hit_log[-1].path).query)
        assert query["q"] == ["cat"] and query["license_type"] == ["all-cc"]


# --- resume, no-op reruns, shards ------------------------------------------------------------


def _image_site(server: LocalServer, count: int, delay_s: float = 0.0) -> list[str]:
    return [
        server.add(f"/i/{i}.png", Reply(200, png_bytes(seed=i), delay_s=delay_s))
        for i in range(count)
    ]


def test_rerun_of_a_finished_crawl_makes_no_requests(tmp_path: Path) -> None:
    with LocalServer() as server:
        seed = gallery(server, {f"{i}.png": png_bytes(seed=i) for i in range(5)})
        cfg = config([{"name": "c", "seeds": [seed]}])
        first, _ = run(cfg, tmp_path)
        before = server.hits()
        second, _ = run(cfg, tmp_path)
        assert server.hits() == before
        assert [r["sha256"] for r in second] == [r["sha256"] for r in first]


def test_crawl_resumes_after_kill_without_refetching(tmp_path: Path) -> None:
    with LocalServer() as server:
        count = 40
        urls = _image_site(server, count, delay_s=0.05)
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls))
        cfg = config([{"name": "c", "image_urls": str(listing)}], concurrency=2, max_per_host=2)
        out, report = tmp_path / "raw", tmp_path / "report.json"
        script = (
            "import sys; from pathlib import Path; from pipeline.config import CrawlConfig;"
            "from pipeline.crawl import crawl;"
            "crawl(CrawlConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]),"
            " Path(sys.argv[3]), progress=False)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script, cfg.model_dump_json(), str(out), str(report)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        deadline = time.monotonic() + 60
        while server.hits() < 15 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = {row["url"] for row in read_jsonl(out / ".state" / "fetch-all.jsonl")}
        assert 0 < len(done) < count and not (out / "manifest.jsonl").exists()

        crawl(cfg, out, report, progress=False)

        rows = read_jsonl(out / "manifest.jsonl")
        assert len(rows) == count
        assert all(server.hits(urlsplit(url).path) == 1 for url in done)
        assert sum(server.hits(f"/i/{i}.png") for i in range(count)) <= count + 2


def test_shards_and_merge_write_the_same_manifest_as_one_crawl(tmp_path: Path) -> None:
    with LocalServer() as first, LocalServer(host="127.0.0.2") as second:
        classes = []
        for name in ("a", "b"):
            urls = []
            for i in range(6):
                server = first if i % 2 else second
                data = png_bytes(seed=ord(name) * 10 + i)
                if i == 1:
                    data = b"broken"  # a failure inside the capped prefix
                urls.append(server.add(f"/{name}/{i}.png", data))
            urls.append(urls[0])  # a duplicate URL
            listing = tmp_path / f"{name}.txt"
            listing.write_text("\n".join(urls))
            classes.append({"name": name, "image_urls": str(listing)})
        cfg = config(classes, max_images_per_class=4)

        single, _ = run(cfg, tmp_path / "single")

        out, report = tmp_path / "sharded" / "raw", tmp_path / "sharded" / "report.json"
        for name in ("a", "b"):
            discover(cfg, out, classes=[name], progress=False)
        for index in range(2):
            crawl(cfg, out, report, host_shard=(index, 2), progress=False)
        merge_shards(cfg, out, report)
        sharded = read_jsonl(out / "manifest.jsonl")

        def strip(rows: list[dict]) -> list[dict]:
            return [{k: v for k, v in r.items() if k != "fetched_at"} for r in rows]

        assert len(single) == 8
        assert strip(sharded) == strip(single)


def test_unknown_class_in_a_shard_request_is_an_error(tmp_path: Path) -> None:
    cfg = config([{"name": "c", "seeds": ["http://127.0.0.1:9/x.html"]}])
    with pytest.raises(StageError, match="no class named nope"):
        crawl(cfg, tmp_path / "raw", tmp_path / "r.json", classes=["nope"], progress=False)


# --- params ----------------------------------------------------------------------------------


def test_bad_crawl_params_name_the_key() -> None:
    params = {
        "classes": [{"name": "a", "seeds": ["http://x/"]}, {"name": "b", "seeds": ["http://y/"]}],
        "crawl": {"max_per_host": 0},
    }
    with pytest.raises(ValueError, match=r"crawl\.max_per_host"):
        parse_params(params)


def test_class_without_a_source_is_rejected() -> None:
    params = {"classes": [{"name": "a"}, {"name": "b", "query": "b"}]}
    with pytest.raises(ValueError, match="needs at least one source"):
        parse_params(params)


def test_cap_keeps_the_first_images_in_order_and_stops_fetching(tmp_path: Path) -> None:
    with LocalServer() as server:
        urls = _image_site(server, 10)
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(urls))
        cfg = config(
            [{"name": "c", "image_urls": str(listing)}],
            max_images_per_class=3,
            concurrency=1,
            max_per_host=1,
        )
        rows, report = run(cfg, tmp_path)
        assert sorted(r["url"] for r in rows) == sorted(urls[:3])
        assert sum(server.hits(f"/i/{i}.png") for i in range(10)) == 3
        assert report["classes"]["c"]["not_needed"] == 7


def test_rebuilt_demo_site_is_crawled_afresh(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "c").mkdir(parents=True)
    (site / "c" / "a.png").write_bytes(png_bytes(seed=1))
    (site / "c" / "index.html").write_bytes(html_page('<img src="a.png">'))
    cfg = config([{"name": "c", "seeds": ["{demo}/c/index.html"]}], serve_demo_site=str(site))
    run(cfg, tmp_path)
    (site / "c" / "b.png").write_bytes(png_bytes(seed=2))
    (site / "c" / "index.html").write_bytes(html_page('<img src="a.png"><img src="b.png">'))
    rows, _ = run(cfg, tmp_path)
    assert sorted(r["url"] for r in rows) == ["{demo}/c/a.png", "{demo}/c/b.png"]


def test_state_log_torn_by_a_kill_is_repaired_on_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "fetch-all.jsonl"
    path.write_text('{"n": 1}\n{"n": 2}\n{"n": 3, "tor')  # killed mid-line
    log = StateLog(path)
    log.append({"n": 4})
    log.close()
    assert read_jsonl(path) == [{"n": 1}, {"n": 2}, {"n": 4}]


def test_api_error_answer_is_recorded_as_a_failed_call(tmp_path: Path) -> None:
    with LocalServer() as api:
        error = {"error": {"code": "badvalue", "info": "Unrecognized value for parameter"}}
        api.add(
            "/w/api.php", Reply(200, json.dumps(error).encode(), content_type="application/json")
        )
        cfg = config(
            [{"name": "cat", "commons_search": "cat"}], wikimedia_api=f"{api.url}/w/api.php"
        )
        rows, report = run(cfg, tmp_path)
        assert rows == [] and report["pages"]["failed"] == {"api_error": 1}


def test_summary_line_names_classes_without_images(tmp_path: Path) -> None:
    with LocalServer() as server:
        seed = gallery(server, {"a.png": png_bytes(seed=1)})
        cfg = config(
            [
                {"name": "full", "seeds": [seed]},
                {"name": "empty", "seeds": [f"{server.url}/none/x.html"]},
            ]
        )
        summary = crawl(cfg, tmp_path / "raw", tmp_path / "r.json", progress=False)
        assert "1 images saved (full 1, empty 0)" in str(summary)
        assert "NO IMAGES for empty" in str(summary)


def test_summary_line_counts_duplicate_downloads(tmp_path: Path) -> None:
    with LocalServer() as server:
        same = png_bytes(seed=1)
        seed = gallery(server, {"a.png": same, "copy.png": same, "b.png": png_bytes(seed=2)})
        summary = crawl(
            config([{"name": "c", "seeds": [seed]}]),
            tmp_path / "raw",
            tmp_path / "r.json",
            progress=False,
        )
        assert summary.duplicates == 1
        assert "2 images saved (c 2) from 1 pages; 1 duplicate downloads discarded;" in str(summary)


def test_missing_demo_site_names_the_params_key(tmp_path: Path) -> None:
    cfg = config(
        [{"name": "c", "seeds": ["{demo}/c/index.html"]}], serve_demo_site=str(tmp_path / "gone")
    )
    with pytest.raises(StageError, match=r"crawl\.serve_demo_site"):
        run(cfg, tmp_path)


# --- refresh: walk the sources again for new images ---------------------------------------


def _image_hits(server: LocalServer) -> dict[str, int]:
    return {path: n for path, n in server.counts.items() if path.endswith(".png")}


def _gallery_page(server: LocalServer, names: list[str]) -> None:
    server.add("/g/index.html", html_page("".join(f'<img src="{n}">' for n in names)))


def test_refresh_fetches_only_images_added_since_the_last_crawl(tmp_path: Path) -> None:
    with LocalServer() as server:
        for i in range(5):
            server.add(f"/g/{i}.png", png_bytes(seed=i))
        _gallery_page(server, ["0.png", "1.png", "gone.png"])  # gone.png answers 404
        cfg = config([{"name": "c", "seeds": [f"{server.url}/g/index.html"]}])
        run(cfg, tmp_path)
        _gallery_page(server, ["3.png", "0.png", "1.png", "gone.png", "4.png"])
        before = _image_hits(server)

        run(cfg, tmp_path)  # a plain rerun does not look again
        assert _image_hits(server) == before and server.hits("/g/index.html") == 1

        rows, report = run(cfg, tmp_path, refresh=True)

        assert server.hits("/g/index.html") == 2
        assert _image_hits(server) == {**before, "/g/3.png": 1, "/g/4.png": 1}
        assert sorted(r["url"][-5:] for r in rows) == ["0.png", "1.png", "3.png", "4.png"]
        assert failures(report) == {"http_404": 1}


def test_refresh_at_the_cap_keeps_old_images_and_fills_free_places(tmp_path: Path) -> None:
    with LocalServer() as server:
        for i in range(6):
            server.add(f"/g/{i}.png", png_bytes(seed=i))
        _gallery_page(server, ["0.png", "1.png", "2.png"])
        cfg = config(
            [{"name": "c", "seeds": [f"{server.url}/g/index.html"]}], max_images_per_class=4
        )
        first, _ = run(cfg, tmp_path)
        # new images listed before the old ones must not push those out of the data set
        _gallery_page(server, ["5.png", "4.png", "3.png", "0.png", "1.png", "2.png"])

        rows, report = run(cfg, tmp_path, refresh=True)

        assert {r["sha256"] for r in first} < {r["sha256"] for r in rows}
        assert sorted(r["url"][-5:] for r in rows) == ["0.png", "1.png", "2.png", "5.png"]
        assert server.hits("/g/4.png") == server.hits("/g/3.png") == 0
        assert all(server.hits(f"/g/{i}.png") == 1 for i in (0, 1, 2, 5))
        assert (report["classes"]["c"]["candidates"], report["classes"]["c"]["not_needed"]) == (
            6,
            2,
        )


def test_refresh_through_discover_then_host_shards_merges_old_and_new(tmp_path: Path) -> None:
    with LocalServer() as first, LocalServer(host="127.0.0.2") as second:
        for i in range(4):
            (first if i % 2 else second).add(f"/g/{i}.png", png_bytes(seed=i))
        page = "".join(f'<img src="{s.url}/g/{i}.png">' for i, s in ((0, second), (1, first)))
        first.add("/g/index.html", html_page(page))
        cfg = config([{"name": "c", "seeds": [f"{first.url}/g/index.html"]}])
        out, report = tmp_path / "raw", tmp_path / "report.json"
        crawl(cfg, out, report, progress=False)
        page += "".join(f'<img src="{s.url}/g/{i}.png">' for i, s in ((2, second), (3, first)))
        first.add("/g/index.html", html_page(page))

        discover(cfg, out, classes=["c"], progress=False, refresh=True)
        for index in range(2):
            crawl(cfg, out, report, host_shard=(index, 2), progress=False)
        merge_shards(cfg, out, report)

        rows = read_jsonl(out / "manifest.jsonl")
        assert sorted(r["url"][-5:] for r in rows) == ["0.png", "1.png", "2.png", "3.png"]
        assert [first.hits(f"/g/{i}.png") + second.hits(f"/g/{i}.png") for i in range(4)] == [1] * 4
        assert first.hits("/g/index.html") == 2


def test_refresh_in_a_host_shard_is_refused(tmp_path: Path) -> None:
    cfg = config([{"name": "c", "seeds": ["http://127.0.0.1:9/x.html"]}])
    with pytest.raises(StageError, match="refresh: not with host_shard"):
        crawl(cfg, tmp_path / "raw", tmp_path / "r.json", host_shard=(0, 2), refresh=True)


def test_killed_refresh_resumes_its_walk_without_refetching_pages(tmp_path: Path) -> None:
    with LocalServer() as server:
        pages = 12
        links = "".join(f'<a href="p{i}.html">{i}</a>' for i in range(pages))
        server.add("/s/index.html", html_page(links))
        for i in range(pages):
            server.add(f"/s/p{i}.html", html_page(f'<img src="{i}.png">'))
            server.add(f"/s/{i}.png", png_bytes(seed=i))
        cfg = config(
            [{"name": "c", "seeds": [f"{server.url}/s/index.html"]}],
            concurrency=1,
            max_per_host=1,
        )
        out, report = tmp_path / "raw", tmp_path / "report.json"
        crawl(cfg, out, report, progress=False)
        for i in range(pages):  # the pages now answer slowly, so the refresh can be stopped
            body = html_page(f'<img src="{i}.png"><img src="new{i}.png">')
            server.add(f"/s/p{i}.html", Reply(200, body, delay_s=0.05))
            server.add(f"/s/new{i}.png", png_bytes(seed=100 + i))
        script = (
            "import sys; from pathlib import Path; from pipeline.config import CrawlConfig;"
            "from pipeline.crawl import crawl;"
            "crawl(CrawlConfig.model_validate_json(sys.argv[1]), Path(sys.argv[2]),"
            " Path(sys.argv[3]), progress=False, refresh=True)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", script, cfg.model_dump_json(), str(out), str(report)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

        def walked() -> int:  # subpage requests since the first crawl
            return sum(server.hits(f"/s/p{i}.html") - 1 for i in range(pages))

        deadline = time.monotonic() + 60
        while walked() < 4 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        done = walked()
        assert 0 < done < pages

        crawl(cfg, out, report, progress=False, refresh=True)

        assert walked() <= pages + 1  # the page in flight at the kill may be asked twice
        assert server.hits("/s/index.html") == 2
        rows = read_jsonl(out / "manifest.jsonl")
        assert len(rows) == 2 * pages
