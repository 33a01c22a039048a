"""A refresh that finds nothing new leaves data/raw and the report byte for byte as they were,
so DVC sees no change (no clean rerun, no new dvc.lock commit); one that finds something
changes them, and the next no-change refresh again changes nothing."""

from __future__ import annotations

from pathlib import Path

from crawlkit import config, tree_hashes
from httpservers import LocalServer, Reply, html_page, png_bytes

from pipeline.crawl import crawl, discover, merge_shards

FIXTURES = Path(__file__).parent.parent / "fixtures" / "crawl"


def _serve(site: LocalServer, api: LocalServer, images: LocalServer, names: list[str]) -> None:
    for i in range(6):
        site.add(f"/g/{i}.png", png_bytes(seed=i))
    site.add("/g/index.html", html_page('<a href="sub.html">more</a><img src="0.png">'))
    site.add("/g/sub.html", html_page("".join(f'<img src="{n}">' for n in names)))
    images.add("/commons/thumb/cat1.png", png_bytes(seed=11))
    images.add("/commons/thumb/cat2.png", png_bytes(seed=12))

    def answer(count: int, path: str) -> Reply:
        page = "page2" if "gcmcontinue" in path else "page1"
        text = (FIXTURES / f"wikimedia_category_{page}.json").read_text()
        body = text.replace("{images}", images.url).encode()
        return Reply(200, body, content_type="application/json")

    api.add("/w/api.php", answer)


def _snapshot(tmp_path: Path) -> dict[str, str]:
    hashes = tree_hashes(tmp_path / "raw")
    hashes["<report>"] = tree_hashes(tmp_path)["report.json"]
    return hashes


def test_refresh_that_finds_nothing_new_changes_no_byte(tmp_path: Path) -> None:
    with LocalServer() as site, LocalServer("127.0.0.2") as api, LocalServer("127.0.0.3") as cdn:
        _serve(site, api, cdn, ["1.png", "2.png", "gone.png"])
        cfg = config(
            [{"name": "c", "seeds": [f"{site.url}/g/index.html"], "commons_category": "Cats"}],
            wikimedia_api=f"{api.url}/w/api.php",
        )
        out, report = tmp_path / "raw", tmp_path / "report.json"
        crawl(cfg, out, report, progress=False)
        before = _snapshot(tmp_path)

        for _ in range(2):
            crawl(cfg, out, report, progress=False, refresh=True)
            assert _snapshot(tmp_path) == before

        api_calls = sum(n for path, n in api.counts.items() if path.startswith("/w/api.php"))
        assert site.hits("/g/sub.html") == 3 and api_calls == 6


def test_refresh_that_finds_something_changes_raw_then_settles(tmp_path: Path) -> None:
    with LocalServer() as site, LocalServer("127.0.0.2") as api, LocalServer("127.0.0.3") as cdn:
        _serve(site, api, cdn, ["1.png"])
        cfg = config(
            [{"name": "c", "seeds": [f"{site.url}/g/index.html"]}],
            wikimedia_api=f"{api.url}/w/api.php",
        )
        out, report = tmp_path / "raw", tmp_path / "report.json"
        crawl(cfg, out, report, progress=False)
        before = _snapshot(tmp_path)
        site.add("/g/sub.html", html_page('<img src="1.png"><img src="2.png">'))

        crawl(cfg, out, report, progress=False, refresh=True)
        changed = _snapshot(tmp_path)
        crawl(cfg, out, report, progress=False, refresh=True)

        assert changed != before
        assert _snapshot(tmp_path) == changed
        assert site.hits("/g/2.png") == 1


def test_refresh_through_discover_and_shards_changes_no_byte(tmp_path: Path) -> None:
    with LocalServer() as site, LocalServer("127.0.0.2") as api, LocalServer("127.0.0.3") as cdn:
        _serve(site, api, cdn, ["1.png", "2.png"])
        cfg = config([{"name": "c", "seeds": [f"{site.url}/g/index.html"]}])
        out, report = tmp_path / "raw", tmp_path / "report.json"
        crawl(cfg, out, report, progress=False)
        before = _snapshot(tmp_path)

        discover(cfg, out, classes=["c"], progress=False, refresh=True)
        for index in range(2):
            crawl(cfg, out, report, host_shard=(index, 2), progress=False)
        merge_shards(cfg, out, report)

        assert _snapshot(tmp_path) == before
