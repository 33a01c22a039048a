"""Tests for the clean stage: real image files built with Pillow, the real stage function."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageFilter

from pipeline.clean import CleanSummary, clean, hamming_pairs, hashes_to_bits
from pipeline.config import CleanConfig, ParamsError, StageError, parse_params
from pipeline.files import read_csv, read_jsonl


def config(**overrides: Any) -> CleanConfig:
    """One process and no per-class minimum (fixture sets are tiny); tests name what differs."""
    return CleanConfig(**{"workers": 1, "min_images_per_class": 0, **overrides})


FAST = config()


# ------------------------------------------------------------------------------------------
# Fixture images


def photo(seed: int, size: int = 128) -> Image.Image:
    """A textured 'photo': random coloured shapes over smooth noise, distinct for each seed."""
    rng = random.Random(seed)
    noise = np.random.default_rng(seed).integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(size), rng.randrange(size)
        x1, y1 = x0 + rng.randrange(8, size // 2), y0 + rng.randrange(8, size // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0))
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour, outline=(255, 255, 255))
    return image.filter(ImageFilter.SMOOTH)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def make_raw(root: Path, files: list[tuple[str, str, bytes | None]]) -> Path:
    """A data/raw like the crawl writes: files per class and manifest.jsonl (None = not on disk)."""
    raw = root / "raw"
    rows = []
    for class_name, name, data in files:
        rel = f"{class_name}/{name}"
        if data is not None:
            (raw / class_name).mkdir(parents=True, exist_ok=True)
            (raw / rel).write_bytes(data)
        rows.append(
            {
                "class": class_name,
                "path": rel,
                "url": f"http://127.0.0.1/{rel}",
                "page_url": f"http://127.0.0.1/{class_name}/index.html",
                "source": "test",
                "license": "MIT",
                "attribution": "test fixture",
                "fetched_at": "2026-11-23T00:00:00Z",
                "status": "saved",
            }
        )
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw


def run(tmp_path: Path, files: list[tuple[str, str, bytes | None]], cfg: CleanConfig = FAST):
    raw = make_raw(tmp_path, files)
    out = tmp_path / "clean"
    summary = clean(cfg, raw, out, tmp_path / "reports" / "clean_report.json")
    return summary, out


def removed_reasons(out: Path) -> dict[str, str]:
    return {row["path"]: row["reason"] for row in read_jsonl(out / "removed.jsonl")}


def kept_raw_paths(out: Path) -> set[str]:
    return {row["raw_path"] for row in read_jsonl(out / "manifest.jsonl")}


# ------------------------------------------------------------------------------------------
# Kept images, manifest and files


def test_distinct_images_are_all_kept_each_in_its_own_group(tmp_path: Path) -> None:
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(4)]
    files += [("dog", f"{n}.png", encode(photo(n))) for n in range(10, 14)]

    summary, out = run(tmp_path, files)

    manifest = read_jsonl(out / "manifest.jsonl")
    assert summary.kept == 8
    assert read_jsonl(out / "removed.jsonl") == []
    assert read_jsonl(out / "groups.jsonl") == []
    assert all(row["group"] == row["sha256"][:16] for row in manifest)


def test_manifest_rows_name_real_files_and_carry_provenance(tmp_path: Path) -> None:
    _, out = run(tmp_path, [("cat", "a.png", encode(photo(1))), ("dog", "b.png", encode(photo(2)))])

    row = next(r for r in read_jsonl(out / "manifest.jsonl") if r["class"] == "cat")
    assert row["path"] == f"cat/{row['sha256']}.png"
    assert Image.open(out / row["path"]).mode == "RGB"
    assert row["url"] == "http://127.0.0.1/cat/a.png"
    assert row["license"] == "MIT" and row["attribution"] == "test fixture"
    assert len(row["phash"]) == 64  # 16×16 bits in hex


def test_only_manifest_images_remain_on_disk(tmp_path: Path) -> None:
    original = photo(3)
    files = [
        ("cat", "a.png", encode(original)),
        ("cat", "small.png", encode(original.resize((64, 64)))),
        ("cat", "b.png", encode(photo(4))),
    ]

    _, out = run(tmp_path, files)

    on_disk = {str(p.relative_to(out)) for p in out.glob("*/*.png")}
    assert on_disk == {row["path"] for row in read_jsonl(out / "manifest.jsonl")}
    assert len(on_disk) == 2


def test_large_images_are_shrunk_to_max_side(tmp_path: Path) -> None:
    _, out = run(
        tmp_path,
        [("cat", "wide.png", encode(photo(5, 128).resize((400, 200))))],
        config(max_side=100),
    )

    (row,) = read_jsonl(out / "manifest.jsonl")
    assert Image.open(out / row["path"]).size == (100, 50)


# ------------------------------------------------------------------------------------------
# Validation: every bad file is removed with its reason


def truncated_jpeg() -> bytes:
    data = encode(photo(6), "JPEG", quality=90)
    return data[: len(data) // 2]


SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64"/></svg>'
)


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("truncated.jpg", truncated_jpeg(), "corrupt"),
        ("empty.png", b"", "corrupt"),
        ("drawing.svg", SVG, "not_an_image"),
        ("page.jpg", b"<!doctype html><html><body>404</body></html>", "not_an_image"),
        ("icon.png", encode(Image.new("RGB", (8, 8), "red")), "too_small"),
        ("banner.png", encode(Image.new("RGB", (400, 20), "red")), "bad_aspect_ratio"),
        ("gone.png", None, "missing"),
    ],
)
def test_bad_file_is_removed_with_its_reason(
    tmp_path: Path, name: str, data: bytes | None, reason: str
) -> None:
    files = [("cat", "good.png", encode(photo(7))), ("cat", name, data)]

    summary, out = run(tmp_path, files)

    assert removed_reasons(out) == {f"cat/{name}": reason}
    assert summary.kept == 1


@pytest.mark.parametrize(
    "side", [1200, 1800]
)  # past Pillow's error limit (2x) and its warning (1x)
def test_decompression_bomb_is_removed(tmp_path: Path, side: int) -> None:
    bomb = encode(Image.new("L", (side, side), 0))  # a few kB of PNG, side² pixels once decoded
    files = [("cat", "good.png", encode(photo(8))), ("cat", "bomb.png", bomb)]

    _, out = run(tmp_path, files, config(max_image_pixels=1_000_000))

    assert removed_reasons(out) == {"cat/bomb.png": "decompression_bomb"}


def test_decompression_bomb_detail_quotes_the_configured_limit(tmp_path: Path) -> None:
    bomb = encode(Image.new("L", (1200, 1200), 0))
    files = [("cat", "good.png", encode(photo(8))), ("cat", "bomb.png", bomb)]

    _, out = run(tmp_path, files, config(max_image_pixels=1_000_000))

    (row,) = read_jsonl(out / "removed.jsonl")
    assert row["reason"] == "decompression_bomb"
    assert "1440000 > clean.max_image_pixels 1000000" in row["detail"]


def test_clean_leaves_the_callers_pillow_settings_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345_678)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    files = [("cat", "good.png", encode(photo(7))), ("cat", "truncated.jpg", truncated_jpeg())]

    run(tmp_path, files, config(max_image_pixels=1_000_000))

    assert Image.MAX_IMAGE_PIXELS == 12_345_678
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_truncated_file_is_corrupt_even_if_the_caller_lets_pillow_load_truncated_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    files = [("cat", "good.png", encode(photo(7))), ("cat", "truncated.jpg", truncated_jpeg())]

    _, out = run(tmp_path, files)

    assert removed_reasons(out) == {"cat/truncated.jpg": "corrupt"}


def test_pixel_limit_is_clean_max_image_pixels_not_pillows_global(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [("cat", "a.png", encode(photo(1))), ("cat", "b.png", encode(photo(2)))]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow alone would refuse 128²

    summary, out = run(tmp_path, files)

    assert summary.kept == 2
    assert read_jsonl(out / "removed.jsonl") == []


# ------------------------------------------------------------------------------------------
# Normalisation


def kept_pixels(out: Path) -> np.ndarray:
    (row,) = read_jsonl(out / "manifest.jsonl")
    image = Image.open(out / row["path"])
    assert image.mode == "RGB"
    return np.asarray(image)


def test_transparent_palette_png_is_composited_onto_white(tmp_path: Path) -> None:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=1)
    data = encode(image, transparency=0)

    _, out = run(tmp_path, [("cat", "logo.png", data)])

    pixels = kept_pixels(out)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[32, 32]) == (200, 0, 0)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp))

    _, out = run(tmp_path, [("cat", "deep.png", data)])

    grey = kept_pixels(out)[0, :, 0]
    assert grey[0] == 0 and grey[-1] == 255
    assert 120 <= grey[32] <= 135  # mid-grey, not white


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    data = encode(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=95)

    _, out = run(tmp_path, [("cat", "print.jpg", data)])

    red, green, blue = kept_pixels(out)[32, 32]
    assert red > 200 and green < 60 and blue < 60


def test_animated_gif_keeps_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)

    _, out = run(tmp_path, [("cat", "anim.gif", buffer.getvalue())])

    red, _, blue = kept_pixels(out)[32, 32]
    assert red > 200 and blue < 60


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (80, 40), "white")
    ImageDraw.Draw(image).rectangle((0, 0, 19, 39), fill="black")  # black on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())

    _, out = run(tmp_path, [("cat", "phone.jpg", data)])

    pixels = kept_pixels(out)
    assert pixels.shape[:2] == (80, 40)  # portrait after rotation
    assert pixels[5, 20].mean() < 60  # the black band is now at the top


# ------------------------------------------------------------------------------------------
# Duplicates


def test_same_pixels_in_different_encodings_are_exact_duplicates(tmp_path: Path) -> None:
    image = photo(9)
    files = [
        ("cat", "a.png", encode(image, compress_level=1)),
        ("cat", "b.png", encode(image, compress_level=9)),
        ("cat", "c.bmp", encode(image, "BMP")),
    ]

    _, out = run(tmp_path, files)

    assert sorted(removed_reasons(out).values()) == ["exact_duplicate", "exact_duplicate"]
    assert len(read_jsonl(out / "manifest.jsonl")) == 1


def test_resized_reencoded_cropped_flipped_rotated_copies_form_one_group(tmp_path: Path) -> None:
    image = photo(10, 160)
    copies = {
        "original.png": encode(image),
        "half.png": encode(image.resize((80, 80), Image.Resampling.LANCZOS)),
        "lossy.jpg": encode(image, "JPEG", quality=40),
        "crop.png": encode(image.crop((8, 8, 152, 152))),
        "flip.png": encode(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "rotate.png": encode(image.rotate(10, resample=Image.Resampling.BICUBIC)),
    }
    files = [("cat", name, data) for name, data in copies.items()]
    files += [("cat", f"other{n}.png", encode(photo(100 + n, 160))) for n in range(6)]

    _, out = run(tmp_path, files)

    (group,) = read_jsonl(out / "groups.jsonl")
    assert {m["path"] for m in group["members"]} == {f"cat/{name}" for name in copies}
    assert group["kept"] == [f"cat/{group['members'][0]['sha256']}.png"] or len(group["kept"]) == 1
    assert {f"cat/other{n}.png" for n in range(6)} <= kept_raw_paths(out)


def test_duplicate_groups_are_drawn_into_a_png_beside_the_report(tmp_path: Path) -> None:
    image = photo(21)
    files = [("cat", "a.png", encode(image)), ("cat", "b.jpg", encode(image, "JPEG", quality=40))]

    run(tmp_path, files)

    sheet = Image.open(tmp_path / "reports" / "clean_duplicates.png")
    assert sheet.width >= 2 * 96 and sheet.height >= 96


def test_near_duplicate_removal_names_what_it_duplicates_and_how_close(tmp_path: Path) -> None:
    image = photo(11)
    files = [
        ("cat", "big.png", encode(image)),
        ("cat", "lossy.jpg", encode(image, "JPEG", quality=40)),
    ]

    _, out = run(tmp_path, files, config(second_pass=False))

    (row,) = read_jsonl(out / "removed.jsonl")
    assert row["path"] == "cat/lossy.jpg"
    assert row["reason"] == "near_duplicate"
    assert row["dup_of"] == "cat/big.png"
    assert row["method"] == "phash" and 0 < row["distance"] <= 24


def test_group_mode_keeps_near_duplicates_under_one_group_id(tmp_path: Path) -> None:
    image = photo(12)
    files = [("cat", "a.png", encode(image)), ("cat", "b.jpg", encode(image, "JPEG", quality=40))]

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    groups = {row["group"] for row in read_jsonl(out / "manifest.jsonl")}
    assert len(read_jsonl(out / "manifest.jsonl")) == 2
    assert len(groups) == 1


def test_label_conflict_is_dropped_from_both_classes(tmp_path: Path) -> None:
    shared = encode(photo(13))
    files = [
        ("cat", "x.png", shared),
        ("dog", "x.png", shared),
        ("dog", "y.png", encode(photo(14))),
    ]

    summary, out = run(tmp_path, files)

    assert removed_reasons(out) == {"cat/x.png": "label_conflict", "dog/x.png": "label_conflict"}
    assert summary.removed["label_conflict"] == 2


def test_label_conflict_keep_first_keeps_the_first_class(tmp_path: Path) -> None:
    shared = encode(photo(15))
    files = [
        ("cat", "x.png", shared),
        ("dog", "x.png", shared),
        ("dog", "y.png", encode(photo(16))),
    ]

    _, out = run(tmp_path, files, config(label_conflicts="keep_first"))

    assert removed_reasons(out) == {"dog/x.png": "label_conflict"}
    assert "cat/x.png" in kept_raw_paths(out)


# ------------------------------------------------------------------------------------------
# Quality flags and the report


def test_dark_image_is_flagged_in_issues_csv_but_kept_by_default(tmp_path: Path) -> None:
    dark = Image.fromarray((np.asarray(photo(17)) * 0.1).astype(np.uint8))
    files = [("cat", "dark.png", encode(dark)), ("cat", "ok.png", encode(photo(18)))]

    _, out = run(tmp_path, files)

    flags = {row["raw_path"]: row["flags"] for row in read_csv(out / "issues.csv")}
    assert "dark" in flags["cat/dark.png"].split(";")
    assert flags["cat/ok.png"] == ""
    assert "cat/dark.png" in kept_raw_paths(out)


def test_drop_flags_param_removes_flagged_images(tmp_path: Path) -> None:
    dark = Image.fromarray((np.asarray(photo(17)) * 0.1).astype(np.uint8))
    files = [("cat", "dark.png", encode(dark)), ("cat", "ok.png", encode(photo(18)))]

    _, out = run(tmp_path, files, config(drop_flags=["dark"]))

    assert removed_reasons(out) == {"cat/dark.png": "quality"}


def test_report_counts_per_class_and_reason(tmp_path: Path) -> None:
    files = [
        ("cat", "a.png", encode(photo(19))),
        ("cat", "icon.png", encode(Image.new("RGB", (4, 4)))),
        ("dog", "b.png", encode(photo(20))),
        ("dog", "empty.png", b""),
    ]

    run(tmp_path, files)

    report = json.loads((tmp_path / "reports" / "clean_report.json").read_text())
    assert report["kept"] == 2 and report["removed"] == 2
    assert report["per_class"]["cat"]["removed"] == {"too_small": 1}
    assert report["per_class"]["dog"]["removed"] == {"corrupt": 1}


# ------------------------------------------------------------------------------------------
# Errors, reruns, parallelism


def test_missing_raw_manifest_is_a_stage_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"raw/manifest\.jsonl"):
        clean(FAST, tmp_path / "raw", tmp_path / "clean", tmp_path / "report.json")


def test_no_surviving_image_is_a_stage_error_after_writing_the_reasons(tmp_path: Path) -> None:
    raw = make_raw(
        tmp_path, [("cat", "empty.png", b""), ("dog", "icon.png", encode(Image.new("L", (4, 4))))]
    )

    with pytest.raises(StageError, match="no image survived"):
        clean(FAST, raw, tmp_path / "clean", tmp_path / "report.json")

    assert set(removed_reasons(tmp_path / "clean").values()) == {"corrupt", "too_small"}


def test_rerun_after_kill_reuses_finished_analyses_and_gives_the_same_result(
    tmp_path: Path,
) -> None:
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(30, 36)]
    _, out = run(tmp_path, files)
    first = (out / "manifest.jsonl").read_text()
    # What a kill leaves: no manifest yet, the analysis log torn mid-line.
    (out / "manifest.jsonl").unlink()
    with open(out / ".analysis.jsonl", "a") as log:
        log.write('{"key": "cat|30.png|tor')

    summary = clean(FAST, tmp_path / "raw", out, tmp_path / "reports" / "clean_report.json")

    assert summary.reused == 6
    assert (out / "manifest.jsonl").read_text() == first


def test_rerun_with_a_new_per_image_param_reanalyses_but_a_dedupe_param_does_not(
    tmp_path: Path,
) -> None:
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(30, 33)]
    raw = make_raw(tmp_path, files)
    out, report = tmp_path / "clean", tmp_path / "report.json"
    clean(FAST, raw, out, report)

    dedupe_only = clean(config(near_dup_max_distance=10), raw, out, report)
    per_image = clean(config(max_side=64), raw, out, report)

    assert dedupe_only.reused == 3
    assert per_image.reused == 0


def test_process_pool_gives_the_same_manifest_as_one_process(tmp_path: Path) -> None:
    image = photo(40)
    files = [("cat", f"{n}.png", encode(photo(n))) for n in range(41, 45)]
    files += [
        ("cat", "copy.jpg", encode(image, "JPEG", quality=50)),
        ("cat", "o.png", encode(image)),
    ]
    raw = make_raw(tmp_path, files)

    clean(config(), raw, tmp_path / "one", tmp_path / "r1.json")
    clean(config(workers=2), raw, tmp_path / "pool", tmp_path / "r2.json")

    assert (tmp_path / "one" / "manifest.jsonl").read_text() == (
        tmp_path / "pool" / "manifest.jsonl"
    ).read_text()


def test_distance_of_half_the_hash_or_more_is_rejected_naming_the_key() -> None:
    with pytest.raises(ParamsError, match=r"clean\.near_dup_max_distance"):
        parse_params(
            {
                "classes": [
                    {"name": "a", "seeds": ["http://a.test/"]},
                    {"name": "b", "seeds": ["http://b.test/"]},
                ],
                "clean": {"near_dup_hash_size": 8, "near_dup_max_distance": 32},
            }
        )


def test_hamming_search_finds_exactly_the_brute_force_pairs() -> None:
    rng = random.Random(0)
    values = [rng.getrandbits(64) for _ in range(300)]
    values += [v ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for v in values[:100]]
    hashes = [f"{v:016x}" for v in values]
    expected = {
        (i, j)
        for i in range(len(values))
        for j in range(i + 1, len(values))
        if (values[i] ^ values[j]).bit_count() <= 4
    }

    i, j, _ = hamming_pairs(hashes_to_bits(hashes), 4)

    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected


def test_summary_is_a_frozen_json_serialisable_record_with_a_one_line_str() -> None:
    summary = CleanSummary(
        raw=5,
        kept=3,
        removed={"corrupt": 1, "near_duplicate": 2},
        groups=1,
        classes=2,
        reused=4,
        flagged=1,
    )

    assert json.loads(json.dumps(dataclasses.asdict(summary)))["removed"] == {
        "corrupt": 1,
        "near_duplicate": 2,
    }
    assert str(summary) == (
        "kept 3 of 5 images in 2 classes; removed 3 (2 near_duplicate, 1 corrupt); "
        "1 duplicate groups; 1 flagged in issues.csv; reused 4 analyses from a previous run"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.kept = 0  # type: ignore[misc]


def test_class_below_the_minimum_fails_after_writing_outputs_naming_why(tmp_path: Path) -> None:
    shoes = [("shoe", f"{i}.png", encode(photo(i))) for i in range(3)]
    copies = [("sandal", "a.png", encode(photo(50)))]
    copies += [("sandal", f"copy{i}.png", encode(photo(50).rotate(90 * i))) for i in (1, 2)]
    copies.append(("sandal", "tiny.png", encode(Image.new("RGB", (8, 8), "red"))))

    with pytest.raises(StageError) as failed:
        run(tmp_path, shoes + copies, config(min_images_per_class=2))

    message = str(failed.value)
    assert "clean.min_images_per_class" in message and "sandal: kept 1 of 4" in message
    assert "too_small 1" in message and "shoe:" not in message
    kept = read_jsonl(tmp_path / "clean" / "manifest.jsonl")
    assert len(kept) == 4 and len(read_jsonl(tmp_path / "clean" / "removed.jsonl")) == 3
