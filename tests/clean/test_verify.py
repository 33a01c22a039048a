"""Pass 2 on pictures ORB cannot judge (low texture): copies found by dense alignment, look-alikes
and overlapping crops kept apart; and candidates compared the way round their embeddings say."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_clean import config, encode, photo, run

from pipeline.clean import aligned, neighbours
from pipeline.clean.describe import SPARSE_KEYPOINTS, stored_grey
from pipeline.clean.embed import view_vectors
from pipeline.clean.kept import enter_run, forget_run
from pipeline.clean.neighbours import pair_similarities, view_neighbours
from pipeline.files import read_jsonl


def low_texture(
    seed: int, size: int = 320, grain_level: float = 6, grain_sigma: float = 1.5
) -> Image.Image:
    """A smooth shaded picture with faint fine grain (sky, cells): no ORB keypoints at ORB's
    default FAST threshold; fainter and coarser grain leaves none at the sparse one either."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (5, 5)).astype(np.float32)
    shade = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), grain_sigma)
    grey = 128 + 25 * shade / np.abs(shade).max() + grain_level * grain / grain.std()
    return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")


BLANK = {"grain_level": 2, "grain_sigma": 2.5}  # under SPARSE_KEYPOINTS even when sensitive


def keypoints(image: Image.Image, **orb: int) -> int:
    grey = cv2.resize(np.asarray(image.convert("L")), (256, 256), interpolation=cv2.INTER_AREA)
    return len(cv2.ORB_create(500, **orb).detect(grey))


def groups_by_path(out: Path) -> dict[str, str]:
    return {row["raw_path"]: row["group"] for row in read_jsonl(out / "manifest.jsonl")}


def test_the_fixtures_keypoints() -> None:
    sparse, blank = low_texture(1), low_texture(1, **BLANK)
    assert keypoints(sparse) < SPARSE_KEYPOINTS <= keypoints(sparse, fastThreshold=4)
    assert keypoints(blank, fastThreshold=4) < SPARSE_KEYPOINTS


@pytest.mark.parametrize(
    ("texture", "dense_fallback", "method"),
    [
        ({}, True, "orb"),  # sparse: described with the sensitive FAST threshold, ORB judges
        ({}, False, "orb"),
        # Next to nothing for ORB even then: the dense check judges (dense_fallback: false
        # keeps it for such pictures only).
        (BLANK, False, "ecc"),
    ],
)
def test_rotated_and_cropped_low_texture_copies_join_their_original_only(
    tmp_path: Path, texture: dict[str, float], dense_fallback: bool, method: str
) -> None:
    originals = {seed: low_texture(seed, **texture) for seed in (1, 2)}
    files = []
    for seed, image in originals.items():
        rotated = image.rotate(10, resample=Image.Resampling.BILINEAR)  # black corners
        files += [
            ("sky", f"{seed}-original.png", encode(image)),
            ("sky", f"{seed}-rotated.png", encode(rotated)),
            ("sky", f"{seed}-crop.png", encode(image.crop((16, 16, 304, 304)))),
        ]

    _, out = run(tmp_path, files, config(near_duplicates="group", dense_fallback=dense_fallback))

    groups = groups_by_path(out)
    for seed in (1, 2):
        assert groups[f"sky/{seed}-rotated.png"] == groups[f"sky/{seed}-original.png"]
        assert groups[f"sky/{seed}-crop.png"] == groups[f"sky/{seed}-original.png"]
    # Two rotated copies share their black corners; that alone must not make them one picture.
    assert groups["sky/1-original.png"] != groups["sky/2-original.png"]
    methods = {e["method"] for g in read_jsonl(out / "groups.jsonl") for e in g["edges"]}
    assert method in methods


def test_overlapping_low_texture_crops_stay_apart(tmp_path: Path) -> None:
    big = low_texture(3, size=480)
    # Horizontal neighbours share 60 % of their area: different pictures by orb_min_overlap.
    files = [
        ("sky", f"crop{n}.png", encode(big.crop((left, 0, left + 320, 320))))
        for n, left in enumerate((0, 128))
    ]

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    groups = groups_by_path(out)
    assert groups["sky/crop0.png"] != groups["sky/crop1.png"]


def test_a_mirrored_copy_is_closer_mirrored_than_as_it_is() -> None:
    grey = np.asarray(low_texture(4).convert("L"))
    flipped = np.ascontiguousarray(grey[:, ::-1])
    views = np.stack([view_vectors(grey), view_vectors(flipped)])
    mirrors = np.stack([view_vectors(flipped), view_vectors(grey)])

    plain, mirrored = pair_similarities(views, mirrors, np.array([[0, 1]]))

    assert mirrored[0] > 0.99 > plain[0]


def _similarity(rng: np.random.Generator, shift: float) -> np.ndarray:
    angle, scale = rng.normal(0, 0.1), rng.uniform(0.8, 1.25)
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    dx, dy = rng.uniform(-shift, shift, 2)
    transform = np.array([[cos, -sin, dx], [sin, cos, dy], [0, 0, 1]])
    transform[2, :2] = rng.normal(0, 5e-4, 2)  # a little perspective
    return transform


def test_the_geometric_overlap_shortcut_changes_no_correlation(monkeypatch) -> None:
    """Pairs rejected from their boxes' corners alone are ones the pixel test rejects too."""
    rng = np.random.default_rng(0)
    grey = np.asarray(low_texture(5, size=160).convert("L"))
    letterboxed = grey.copy()
    letterboxed[:20] = 0  # a bar: the content box is not the whole image
    pictures = [aligned.Picture.of(grey), aligned.Picture.of(letterboxed)]
    cases = [
        (pictures[n % 2], pictures[(n // 2) % 2], _similarity(rng, shift=60)) for n in range(200)
    ]
    fast = [aligned.picture_correlation(a, b, t, 0.7) for a, b, t in cases]
    monkeypatch.setattr(aligned, "overlap_bound", lambda a, b, t: 1.0)
    exact = [aligned.picture_correlation(a, b, t, 0.7) for a, b, t in cases]

    assert fast == exact
    rejected = sum(1 for whole, tiles in exact if whole == tiles == 0.0)
    assert 20 < rejected < 180  # both verdicts, near the threshold, were exercised


def test_the_tile_median_is_skipped_only_when_the_whole_overlap_decides() -> None:
    rng = np.random.default_rng(1)
    grey = np.asarray(low_texture(6, size=160).convert("L"))
    skipped = 0
    for _ in range(20):
        transform = _similarity(rng, shift=10)
        copy = cv2.warpPerspective(grey, transform, grey.shape[::-1])
        whole, tiles = aligned.aligned_correlation(grey, copy, transform, 0.5)
        enough = float(rng.uniform(whole - 0.1, whole + 0.1))
        quick = aligned.aligned_correlation(grey, copy, transform, 0.5, enough=enough)
        assert quick == ((whole, 0.0) if whole >= enough else (whole, tiles))
        skipped += whole >= enough
    assert 0 < skipped < 20


def test_pass_2_leaves_no_scratch_files_and_clears_a_killed_runs(tmp_path: Path) -> None:
    image = low_texture(4)
    files = [
        ("sky", "original.png", encode(image)),
        ("sky", "crop.png", encode(image.crop((16, 16, 304, 304)))),
    ]
    # What a run killed during pass 2 leaves of its describe store.
    torn = tmp_path / "clean" / ".pass2" / "0123456789ab" / "1.pkl"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"torn")

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    assert not (out / ".pass2").exists()
    groups = groups_by_path(out)
    assert groups["sky/original.png"] == groups["sky/crop.png"]


def test_flipped_crops_join_their_original_whichever_image_is_mirrored(tmp_path: Path) -> None:
    """Two flipped, cropped or rotated copies of one photo: both of their pairs with the
    original are compared mirrored first, and the original, the one image they share, is the
    one described mirrored (rounds._mirror_sides); the copies still join it, mirrored."""
    image = photo(31, 256)
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    files = [
        ("cat", "a-original.png", encode(image)),
        ("cat", "b-flipped-crop.png", encode(flipped.crop((24, 0, 256, 256)))),
        (
            "cat",
            "c-flipped-rotated.png",
            encode(flipped.rotate(8, resample=Image.Resampling.BICUBIC)),
        ),
    ]
    files += [("cat", f"other{n}.png", encode(photo(200 + n, 256))) for n in range(4)]

    _, out = run(tmp_path, files, config(near_duplicates="group"))

    groups = groups_by_path(out)
    assert groups["cat/b-flipped-crop.png"] == groups["cat/a-original.png"]
    assert groups["cat/c-flipped-rotated.png"] == groups["cat/a-original.png"]
    assert len({groups[f"cat/other{n}.png"] for n in range(4)}) == 4
    edges = [e for g in read_jsonl(out / "groups.jsonl") for e in g["edges"]]
    mirrored = {(e["a"], e["b"]) for e in edges if e["method"] == "orb" and e["mirrored"]}
    assert ("cat/a-original.png", "cat/c-flipped-rotated.png") in mirrored


def test_a_mirror_proposes_only_its_nearest_neighbour(monkeypatch) -> None:
    """view_neighbours proposes each image's k nearest neighbours and its mirror's nearest
    (neighbours.MIRROR_NEIGHBOURS), and marks the pairs a mirror's search found."""
    rng = np.random.default_rng(0)
    views = rng.normal(size=(6, 1, 16)).astype(np.float32)
    mirrors = rng.normal(size=(6, 1, 16)).astype(np.float32)
    mirrors[0, 0] = views[1, 0]  # image 1 is image 0 flipped
    views[2, 0] = views[1, 0] + 0.3 * rng.normal(size=16)  # and image 2 like image 1
    views /= np.linalg.norm(views, axis=2, keepdims=True)
    mirrors /= np.linalg.norm(mirrors, axis=2, keepdims=True)

    def marked() -> set[tuple[int, int]]:
        pairs, by_mirror = view_neighbours(views, mirrors, 1, -1.0)
        return {(int(i), int(j)) for (i, j), near in zip(pairs, by_mirror, strict=True) if near}

    assert (0, 1) in marked()
    assert (0, 2) not in marked()
    monkeypatch.setattr(neighbours, "MIRROR_NEIGHBOURS", 2)
    assert (0, 2) in marked()


def test_a_long_lived_worker_does_not_keep_an_earlier_runs_greys(tmp_path: Path) -> None:
    """A Dask worker serves many runs: a re-crawl may rewrite an image at the same path."""
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), np.full((32, 32), 10, np.uint8))
    enter_run("first")
    assert int(stored_grey(str(path))[0, 0]) == 10
    cv2.imwrite(str(path), np.full((32, 32), 200, np.uint8))
    assert int(stored_grey(str(path))[0, 0]) == 10  # kept within one run

    enter_run("second")

    assert int(stored_grey(str(path))[0, 0]) == 200
    forget_run()
