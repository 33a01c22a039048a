"""The per-image path: which format each normalised copy is written in, the reduced-scale JPEG
decode, and the shortcuts (pHash pair, histogram percentiles, log rows) against what they
replace."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps
from test_clean import config, encode, photo, run

from pipeline.clean.decode import DecodeSettings, decode, hash_to_hex, phashes
from pipeline.clean.quality import histogram_percentile
from pipeline.clean.records import Analysis, DecodedImage, QualityScores
from pipeline.config import CleanConfig
from pipeline.files import read_jsonl


def written(out: Path) -> dict[str, Image.Image]:
    """raw path → the normalised copy the manifest names, opened."""
    return {
        row["raw_path"]: Image.open(out / row["path"]) for row in read_jsonl(out / "manifest.jsonl")
    }


def test_by_default_a_jpeg_source_stays_jpeg_and_any_other_becomes_png(tmp_path: Path) -> None:
    files = [
        ("cat", "a.jpg", encode(photo(1, size=400), "JPEG", quality=90)),
        ("cat", "b.png", encode(photo(2, size=400))),
        ("cat", "c.gif", encode(photo(3, size=64), "GIF")),
    ]

    _, out = run(tmp_path, files)

    copies = written(out)
    assert {path: image.format for path, image in copies.items()} == {
        "cat/a.jpg": "JPEG",
        "cat/b.png": "PNG",
        "cat/c.gif": "PNG",
    }
    assert {image.mode for image in copies.values()} == {"RGB"}
    assert copies["cat/a.jpg"].size == copies["cat/b.png"].size == (256, 256)


def test_output_format_png_writes_every_copy_as_png(tmp_path: Path) -> None:
    files = [("cat", "a.jpg", encode(photo(1, size=300), "JPEG", quality=90))]

    _, out = run(tmp_path, files, config(output_format="png"))

    (copy,) = written(out).values()
    assert copy.format == "PNG" and copy.size == (256, 256)


def test_a_wide_jpeg_decodes_at_the_smallest_scale_its_long_side_allows(tmp_path: Path) -> None:
    path = tmp_path / "wide.jpg"
    photo(4, size=200).resize((1600, 600)).save(path, quality=90)
    settings = DecodeSettings.from_config(CleanConfig(max_side=256))

    decoded = decode(path, settings)

    # 1/4 keeps the long side at 400 >= 256 (1/8 would be 200); the short side does not count.
    assert decoded.image.size == (400, 150)
    assert decoded.original_size == (1600, 600)


@pytest.mark.parametrize("side", [40, 256])
def test_the_mirrored_phash_is_the_phash_of_the_mirrored_image(side: int) -> None:
    grey = photo(5, size=side).convert("L")

    phash, mirrored = phashes(grey, 16)

    assert phashes(ImageOps.mirror(grey), 16) == (mirrored, phash)
    if side < 64:  # enlarged to the DCT's 64 px: exactly imagehash's pHash
        assert phash == str(imagehash.phash(grey, hash_size=16))
    else:  # shrunk by area averaging: within a few bits of imagehash's LANCZOS
        reference = imagehash.phash(grey, hash_size=16)
        assert imagehash.hex_to_hash(phash) - reference <= 16


@pytest.mark.parametrize("hash_size", [6, 8, 16])
def test_hash_hex_is_imagehash_hex(hash_size: int) -> None:
    bits = np.random.default_rng(hash_size).random((hash_size, hash_size)) > 0.5

    assert hash_to_hex(bits) == str(imagehash.ImageHash(bits))


def test_histogram_percentiles_are_numpy_percentiles() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 784):
        values = rng.integers(0, 256, size)
        counts = np.bincount(values, minlength=256)
        for q in (0, 5, 37.5, 99, 100):
            assert histogram_percentile(counts, q) == pytest.approx(np.percentile(values, q))


def test_an_analysis_log_row_round_trips() -> None:
    scores = QualityScores(brightness_p99=0.9, brightness_p05=0.1, entropy=6.5, sharpness=40.0)
    image = DecodedImage("s", "p", "m", 300, 200, 256, 171, 1, "cat/s.jpg", "e", "me", scores)

    for analysis in (Analysis("k", "ok", image=image), Analysis("k2", "corrupt", "bad")):
        row = analysis.to_json("fp")
        assert row == {**dataclasses.asdict(analysis), "fingerprint": "fp"}
        assert Analysis.from_json(row) == analysis
