"""Clean at scale: recall on crops/rotations/letterboxing, overlapping crops kept apart,
bounded decoding, kill-safe batched logs, and a Dask run identical to a local one."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from test_clean import config, encode, make_raw, photo, run

from pipeline.clean import clean, workers
from pipeline.clean.analysis import ANALYSIS
from pipeline.clean.decode import DecodeSettings, DecodeTask, analyse_image
from pipeline.clean.workers import worker_count
from pipeline.config import CleanConfig, StageError
from pipeline.files import read_jsonl


def groups_by_path(out: Path) -> dict[str, str]:
    return {row["raw_path"]: row["group"] for row in read_jsonl(out / "manifest.jsonl")}


def test_letterboxed_and_rotated_copies_join_their_original(tmp_path: Path) -> None:
    original = photo(7, size=160)
    boxed = Image.new("RGB", (213, 160), (0, 0, 0))
    boxed.paste(original, (26, 0))
    files = [
        ("cat", "original.png", encode(original)),
        ("cat", "boxed.png", encode(boxed)),
        ("cat", "rotated.png", encode(original.rotate(10, resample=Image.Resampling.BILINEAR))),
    ] + [("cat", f"other{n}.png", encode(photo(100 + n, size=160))) for n in range(6)]

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    groups = groups_by_path(out)
    assert groups["cat/boxed.png"] == groups["cat/original.png"]
    assert groups["cat/rotated.png"] == groups["cat/original.png"]
    assert len({groups[f"cat/other{n}.png"] for n in range(6)}) == 6


def test_overlapping_crops_of_one_photo_stay_apart(tmp_path: Path) -> None:
    big = photo(11, size=400)
    crops = [big.crop((x, 0, x + 200, 200)) for x in (0, 80, 160)]  # neighbours share 60%
    files = [("cat", f"crop{n}.png", encode(c)) for n, c in enumerate(crops)]

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    assert len(set(groups_by_path(out).values())) == 3


def test_star_groups_keep_only_images_matched_to_the_kept_one(tmp_path: Path) -> None:
    from pipeline.clean.grouping import star_labels

    labels = star_labels(4, [(0, 1), (1, 2), (2, 3)], order=[0, 1, 2, 3])

    assert labels.tolist() == [0, 0, 2, 2]


def test_large_jpeg_is_decoded_at_reduced_scale_but_reports_its_full_size(
    tmp_path: Path,
) -> None:
    (tmp_path / "raw").mkdir()
    path = tmp_path / "raw" / "big.jpg"
    photo(3, size=256).resize((2400, 1600)).save(path, quality=90)
    settings = DecodeSettings.from_config(CleanConfig())

    result = analyse_image(DecodeTask("k", path, "cat", tmp_path / "clean", settings))

    assert result.status == "ok" and result.image is not None
    assert (result.image.original_width, result.image.original_height) == (2400, 1600)
    assert max(result.image.width, result.image.height) == 256


def test_workers_are_capped_by_the_memory_an_image_at_the_pixel_limit_needs() -> None:
    greedy = CleanConfig(workers=64, max_image_pixels=10**12)  # 8 TB per worker

    assert worker_count(greedy) == 1


def test_rerun_survives_a_torn_log_line_followed_by_later_appends(tmp_path: Path) -> None:
    raw = make_raw(tmp_path, [("cat", f"{n}.png", encode(photo(n))) for n in range(3)])
    out, report = tmp_path / "clean", tmp_path / "report.json"
    clean(config(), raw, out, report)
    log = out / ANALYSIS
    lines = log.read_text().splitlines()
    log.write_text(lines[0] + "\n" + lines[1][:40] + "\n" + lines[2] + "\n")

    summary = clean(config(), raw, out, report)

    assert summary.kept == 3 and summary.reused == 2


def test_dask_cluster_gives_the_same_outputs_as_one_process(tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    image = photo(40)
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(41, 47)]
    files += [
        ("cat", "copy.jpg", encode(image, "JPEG", quality=50)),
        ("cat", "mirror.png", encode(ImageOps.mirror(image))),
        ("cat", "crop.png", encode(image.crop((10, 10, 120, 120)))),
        ("dog", "o.png", encode(image)),
    ]
    raw = make_raw(tmp_path, files)

    clean(config(), raw, tmp_path / "one", tmp_path / "r1.json")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
        cfg = config(dask_address=cluster.scheduler_address)
        clean(cfg, raw, tmp_path / "dask", tmp_path / "r2.json")

    for name in ("manifest.jsonl", "removed.jsonl", "groups.jsonl", "issues.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "dask" / name).read_text()
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["passes"] == json.loads((tmp_path / "r1.json").read_text())["passes"]


def test_an_unreachable_dask_scheduler_fails_the_stage_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("distributed")
    from pipeline import fanout

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(fanout, "CONNECT_TIMEOUT_S", 2.0)
    raw = make_raw(tmp_path, [("cat", f"{n}.png", encode(photo(n))) for n in range(3)])

    started = time.monotonic()
    with pytest.raises(StageError, match=rf"clean\.dask_address: .*127\.0\.0\.1:{port}"):
        clean(
            config(dask_address=f"tcp://127.0.0.1:{port}"),
            raw,
            tmp_path / "out",
            tmp_path / "r.json",
        )

    assert time.monotonic() - started < 15
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_a_rerun_verifies_only_pairs_it_has_not_judged(tmp_path: Path) -> None:
    image = photo(40)
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(41, 47)]
    files += [
        ("cat", "crop.png", encode(image.crop((10, 10, 120, 120)))),
        ("cat", "o.png", encode(image)),
    ]
    raw = make_raw(tmp_path, files)
    out, report = tmp_path / "clean", tmp_path / "r.json"

    clean(config(), raw, out, report)
    first = json.loads(report.read_text())["passes"]
    outputs = {
        n: (out / n).read_text() for n in ("manifest.jsonl", "groups.jsonl", ".verdicts.jsonl")
    }
    clean(config(), raw, out, report)
    again = json.loads(report.read_text())["passes"]

    assert first["orb_verified"] > 0 and first["orb_confirmed"] >= 1  # the crop, by ORB
    assert again["orb_verified"] == 0
    assert again["verdicts_reused"] == first["orb_verified"]
    assert again["orb_confirmed"] == first["orb_confirmed"]
    assert {n: (out / n).read_text() for n in outputs} == outputs

    # A new image: only pairs that involve it are verified.
    (raw / "cat" / "new.png").write_bytes(encode(photo(47)))
    rows = read_jsonl(raw / "manifest.jsonl")
    rows.append({**rows[-1], "path": "cat/new.png"})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    clean(config(), raw, out, report)
    grown = json.loads(report.read_text())["passes"]
    assert 0 < grown["orb_verified"] <= grown["orb_candidates"] - grown["verdicts_reused"]

    # Other verification settings: every pair is judged again.
    clean(config(orb_min_inliers=7), raw, out, report)
    assert json.loads(report.read_text())["passes"]["verdicts_reused"] == 0


def test_a_stuck_local_worker_is_an_error_not_a_hang(monkeypatch) -> None:
    """No task finishing in the local pool for TASK_TIMEOUT_S stops its processes and raises
    StageError naming clean.workers, instead of waiting forever."""
    monkeypatch.setattr(workers, "TASK_TIMEOUT_S", 2.0)
    pool = workers.WorkerPool(2)
    started = time.monotonic()
    with pytest.raises(StageError, match=r"clean\.workers: no 'sleep' task finished.*stuck"):
        list(pool.map(time.sleep, [600.0, 600.0], "sleep", "task"))
    pool.close()  # nothing left to wait for: the stuck processes were stopped

    assert time.monotonic() - started < 60
    assert pool._pool is None
