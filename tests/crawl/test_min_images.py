"""crawl.min_images_per_class: a class with too few images fails the stage after its outputs are
written, naming the class, its count and why; a cap below the minimum is a params error."""

from __future__ import annotations

from pathlib import Path

import pytest
from crawlkit import bounded_crawl, config
from httpservers import LocalServer, png_bytes

from pipeline.config import ParamsError, StageError, parse_params
from pipeline.crawl import crawl, discover, merge_shards
from pipeline.files import read_jsonl


def _two_classes(server: LocalServer, tmp_path: Path) -> list[dict[str, str]]:
    full = [server.add(f"/full/{i}.png", png_bytes(seed=i)) for i in range(3)]
    (tmp_path / "full.txt").write_text("\n".join(full))
    (tmp_path / "empty.txt").write_text(f"{server.url}/gone/a.png\n{server.url}/gone/b.png\n")
    return [
        {"name": "full", "image_urls": str(tmp_path / "full.txt")},
        {"name": "sandal", "image_urls": str(tmp_path / "empty.txt")},
    ]


def test_class_below_the_minimum_fails_after_writing_outputs(tmp_path: Path) -> None:
    with LocalServer() as server:
        cfg = config(_two_classes(server, tmp_path), min_images_per_class=2, retries=0)

        finished = bounded_crawl(cfg, tmp_path)

        assert isinstance(finished.error, StageError)
        message = str(finished.error)
        assert "crawl.min_images_per_class" in message
        assert "sandal: 0 images" in message and "http_404 2" in message
        assert "full:" not in message
        assert len(read_jsonl(tmp_path / "raw" / "manifest.jsonl")) == 3
        assert finished.report["classes"]["sandal"]["failed"] == {"http_404": 2}


def test_class_without_candidates_names_the_failed_pages(tmp_path: Path) -> None:
    cfg = config(
        [{"name": "sandal", "seeds": ["http://127.0.0.1:1/s/index.html"]}],
        min_images_per_class=1,
        retries=0,
    )

    finished = bounded_crawl(cfg, tmp_path)

    assert isinstance(finished.error, StageError)
    assert "sandal: 0 images" in str(finished.error)
    assert "robots_unreachable" in str(finished.error)


def test_merge_of_shards_checks_the_minimum(tmp_path: Path) -> None:
    with LocalServer() as server:
        cfg = config(_two_classes(server, tmp_path), min_images_per_class=2, retries=0)
        out, report = tmp_path / "raw", tmp_path / "r.json"
        for name in ("full", "sandal"):
            discover(cfg, out, classes=[name], progress=False)
        for index in range(2):
            crawl(cfg, out, report, host_shard=(index, 2), progress=False)

        with pytest.raises(StageError, match=r"sandal: 0 images"):
            merge_shards(cfg, out, report)
        assert (out / "manifest.jsonl").exists()


def _params(**crawl: object) -> dict[str, object]:
    return {
        "classes": [
            {"name": "a", "seeds": ["http://x.org/"], "max_images": 5},
            {"name": "b", "seeds": ["http://y.org/"]},
        ],
        "crawl": crawl,
    }


def test_class_cap_below_the_minimum_is_a_params_error_naming_both_keys() -> None:
    with pytest.raises(ParamsError, match=r"classes\.a\.max_images.*crawl\.min_images_per_class"):
        parse_params(_params(min_images_per_class=10))


def test_crawl_cap_below_the_minimum_is_a_params_error_naming_both_keys() -> None:
    params = _params(max_images_per_class=8, min_images_per_class=10)
    params["classes"][0].pop("max_images")  # type: ignore[index]
    with pytest.raises(
        ParamsError, match=r"crawl\.max_images_per_class.*crawl\.min_images_per_class"
    ):
        parse_params(params)


def test_clean_minimum_above_the_crawl_cap_is_a_params_error_naming_both_keys() -> None:
    params = _params(min_images_per_class=2)
    params["clean"] = {"min_images_per_class": 6}
    with pytest.raises(ParamsError, match=r"classes\.a\.max_images.*clean\.min_images_per_class"):
        parse_params(params)
