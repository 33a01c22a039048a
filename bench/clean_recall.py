"""Pair recall and precision of the clean stage on a labelled set of real photographs.

Builds the set from scikit-image's bundled photos (no download): from each photo, square crops
at several overlapping positions (the "originals", 160 px; neighbouring crops share 36–60 % of
their area, so they are different pictures that look alike, the hard case for precision), and
low-texture ones on purpose (moon, retina, cells, sky). Each original gets one copy per
transform: 10 % crop, horizontal flip, 10° rotation, JPEG q30, +20 % brightness, half size,
crop + JPEG, a small perspective change, a text watermark, colour jitter and letterboxing.

The real clean stage runs on the set (one class, ``near_duplicates: group``, so every image
keeps its group id). Ground truth: an original and its copies are one family; pair precision
and recall are over all pairs of images, "predicted" meaning the same group id. Per transform,
the recall of the (original, copy) pair, and of the pairs missed, how many pass 2 never proposed and
how many it proposed but did not confirm. With ``--groups-both`` it also groups the stage's
matched pairs both ways (connected components vs stars around a representative) and prints
precision, recall and the largest group of each.

    python bench/clean_recall.py                      # pass 1 + 2, default params
    python bench/clean_recall.py --set second_pass=false
    python bench/clean_recall.py --keep /tmp/recall   # keep the files to look at them
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.clean import clean  # noqa: E402
from pipeline.config import CleanConfig  # noqa: E402

SIDE = 160
TRANSFORMS = (
    "crop10",
    "flip",
    "rot10",
    "jpeg30",
    "bright20",
    "half",
    "crop_jpeg",
    "perspective",
    "text",
    "colour",
    "letterbox",
)
# (name, loader); grey photos become RGB. Low texture on purpose: moon, retina, cell, hubble.
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
    "brick",
    "clock",
    "cell",
    "page",
)


def photos() -> dict[str, np.ndarray]:
    import skimage.data

    loaded = {}
    for name in PHOTOS:
        array = getattr(skimage.data, name)()
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        loaded[name] = np.ascontiguousarray(array[..., :3])
    return loaded


def crop_boxes(height: int, width: int, per_photo: int) -> list[tuple[int, int, int]]:
    """Up to ``per_photo`` (top, left, side) squares of half the short side, stepping 40 %
    of the side: horizontal neighbours share 60 % of their area, diagonal ones 36 %."""
    side = min(height, width) // 2
    step = max(1, int(side * 0.4))
    boxes = [
        (top, left, side)
        for top in range(0, height - side + 1, step)
        for left in range(0, width - side + 1, step)
    ]
    picks = np.linspace(0, len(boxes) - 1, min(per_photo, len(boxes))).round().astype(int)
    return [boxes[i] for i in sorted(set(picks.tolist()))]


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def crop10(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Cut 10 % of the width and of the height, split at random between the two sides."""
    w, h = image.size
    dx, dy = int(w * 0.1), int(h * 0.1)
    left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return image.crop((left, top, left + w - dx, top + h - dy))


def transformed(image: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    if name == "crop10":
        return crop10(image, rng)
    if name == "flip":
        return ImageOps.mirror(image)
    if name == "rot10":
        return image.rotate(10 * rng.choice([-1, 1]), resample=Image.Resampling.BILINEAR)
    if name == "jpeg30":
        return jpeg(image, 30)
    if name == "bright20":
        return ImageEnhance.Brightness(image).enhance(1.2)
    if name == "half":
        return image.resize((w // 2, h // 2), Image.Resampling.LANCZOS)
    if name == "crop_jpeg":
        return jpeg(crop10(image, rng), 30)
    if name == "perspective":
        d = 0.06 * w
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        moved = corners + rng.uniform(-d, d, size=(4, 2))
        coefficients = _perspective_coefficients(corners, moved)
        return image.transform(
            (w, h), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR
        )
    if name == "text":
        marked = image.copy()
        draw = ImageDraw.Draw(marked)
        top = int(rng.integers(h // 4, 3 * h // 4))
        draw.text((8, top), "(c) stockphotos.example", fill=(255, 255, 255))
        draw.text((9, top + 1), "(c) stockphotos.example", fill=(0, 0, 0))
        return marked
    if name == "colour":
        jittered = ImageEnhance.Color(image).enhance(float(rng.uniform(0.5, 1.5)))
        jittered = ImageEnhance.Contrast(jittered).enhance(float(rng.uniform(0.8, 1.2)))
        shift = rng.integers(-20, 21, size=3)
        pixels = np.asarray(jittered).astype(np.int16) + shift
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if name == "letterbox":
        framed = Image.new("RGB", (w * 4 // 3, h), (0, 0, 0))
        framed.paste(image, ((framed.width - w) // 2, 0))
        return framed
    raise ValueError(name)


def _perspective_coefficients(target: np.ndarray, source: np.ndarray) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(target, source, strict=True):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows), source.reshape(8))
    return solution.tolist()


def build_set(raw: Path, per_photo: int, seed: int) -> dict[str, tuple[str, str]]:
    """Write the raw files and manifest; returns {raw path: (family, transform or original)}."""
    rng = np.random.default_rng(seed)
    truth: dict[str, tuple[str, str]] = {}
    rows = []
    for name, array in photos().items():
        for number, (top, left, side) in enumerate(crop_boxes(*array.shape[:2], per_photo)):
            patch = Image.fromarray(array[top : top + side, left : left + side])
            original = patch.resize((SIDE, SIDE), Image.Resampling.LANCZOS)
            family = f"{name}-{number}"
            versions = [("original", original)] + [
                (t, transformed(original, t, rng)) for t in TRANSFORMS
            ]
            for kind, image in versions:
                path = f"photos/{family}-{kind}.png"
                (raw / path).parent.mkdir(parents=True, exist_ok=True)
                image.save(raw / path)
                truth[path] = (family, kind)
                rows.append({"class": "photos", "path": path, "url": f"https://example/{path}"})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return truth


def pair_scores(
    truth: dict[str, tuple[str, str]], group_of: dict[str, str]
) -> tuple[float, float, dict[str, float], int]:
    """(precision, recall, per-transform recall, largest group) of same-group pairs."""
    paths = sorted(truth)
    predicted = {
        (a, b)
        for a, b in itertools.combinations(paths, 2)
        if group_of.get(a) == group_of.get(b) and group_of.get(a) is not None
    }
    actual = {(a, b) for a, b in itertools.combinations(paths, 2) if truth[a][0] == truth[b][0]}
    hits = predicted & actual
    precision = len(hits) / len(predicted) if predicted else 1.0
    recall = len(hits) / len(actual)
    per_transform = {}
    originals = {truth[p][0]: p for p in paths if truth[p][1] == "original"}
    for kind in TRANSFORMS:
        copies = [p for p in paths if truth[p][1] == kind]
        found = [
            p
            for p in copies
            if group_of.get(p) is not None
            and group_of.get(p) == group_of.get(originals[truth[p][0]])
        ]
        per_transform[kind] = len(found) / len(copies)
    largest = max(Counter(group_of.values()).values())
    return precision, recall, per_transform, largest


def print_scores(label: str, scores: tuple[float, float, dict[str, float], int]) -> None:
    precision, recall, per_transform, largest = scores
    kinds = "  ".join(f"{k} {v:.2f}" for k, v in per_transform.items())
    print(f"{label}: precision {precision:.3f}  recall {recall:.3f}  largest group {largest}")
    print(f"    {kinds}")


def groups_from_manifest(clean_dir: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (clean_dir / "manifest.jsonl").read_text().splitlines()]
    return {row["raw_path"]: row["group"] for row in rows}


def missed_pairs(clean_dir: Path, truth: dict[str, tuple[str, str]], cfg: CleanConfig) -> None:
    """Per transform, the (original, copy) pairs left in different groups: never proposed by
    pass 2's neighbour search, or proposed and not confirmed (by ORB or dense alignment)."""
    from pipeline.clean.analysis import ANALYSIS
    from pipeline.clean.embed import decode_views
    from pipeline.clean.neighbours import view_neighbours

    group_of = groups_from_manifest(clean_dir)
    entries = [json.loads(line) for line in (clean_dir / ANALYSIS).read_text().splitlines()]
    images = {entry["key"].split("|")[1]: entry["image"] for entry in entries if entry["image"]}
    paths = sorted(p for p in images if p in group_of)
    index = {p: n for n, p in enumerate(paths)}
    views = np.stack([decode_views(images[p]["embedding"]) for p in paths])
    mirrors = np.stack([decode_views(images[p]["mirror_embedding"]) for p in paths])
    pairs, _ = view_neighbours(
        views, mirrors, cfg.second_pass_neighbours, cfg.second_pass_min_similarity
    )
    proposed = {(int(a), int(b)) for a, b in pairs}
    originals = {truth[p][0]: p for p in paths if truth[p][1] == "original"}
    missed: Counter[tuple[str, str]] = Counter()
    for path in paths:
        family, kind = truth[path]
        original = originals[family]
        if kind == "original" or group_of[path] == group_of[original]:
            continue
        pair = tuple(sorted((index[path], index[original])))
        missed[kind, "rejected" if pair in proposed else "not proposed"] += 1
    print(
        "missed (original, copy) pairs: "
        + (", ".join(f"{kind} {why} {n}" for (kind, why), n in sorted(missed.items())) or "none")
    )


def both_groupings(clean_dir: Path, truth: dict[str, tuple[str, str]]) -> None:
    """Connected components vs stars over the matched pairs the stage recorded."""
    from pipeline.clean.grouping import star_labels

    paths = sorted(truth)
    index = {p: n for n, p in enumerate(paths)}
    edges = set()
    for line in (clean_dir / "groups.jsonl").read_text().splitlines():
        for edge in json.loads(line)["edges"]:
            edges.add(tuple(sorted((index[edge["a"]], index[edge["b"]]))))
    from pipeline.clean.grouping import graph_groups

    connected = graph_groups(len(paths), sorted(edges))
    print_scores(
        "  as connected components",
        pair_scores(truth, {p: str(connected[index[p]]) for p in paths}),
    )
    order = list(range(len(paths)))  # every image is the same size here: manifest order decides
    star = star_labels(len(paths), sorted(edges), order)
    print_scores("  as stars", pair_scores(truth, {p: str(star[index[p]]) for p in paths}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-photo", type=int, default=8, help="originals per photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a clean param (JSON value), e.g. second_pass=false",
    )
    parser.add_argument(
        "--groups-both",
        action="store_true",
        help="also score the matched pairs as components and as stars",
    )
    parser.add_argument("--keep", type=Path, help="build the set here and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="clean-recall-"))
    try:
        raw = work / "raw"
        if raw.exists():
            shutil.rmtree(raw)
        truth = build_set(raw, args.per_photo, args.seed)
        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        cfg = CleanConfig(**{"near_duplicates": "group", "min_images_per_class": 0, **overrides})
        start = time.perf_counter()
        summary = clean(cfg, raw, work / "clean", work / "report.json")
        seconds = time.perf_counter() - start
        families = len({family for family, _ in truth.values()})
        print(
            f"{len(truth)} images ({families} originals × {len(TRANSFORMS)} copies + "
            f"themselves); clean took {seconds:.1f} s: {summary}"
        )
        passes = json.loads((work / "report.json").read_text())["passes"]
        print(f"passes: {passes}")
        print_scores("stage groups", pair_scores(truth, groups_from_manifest(work / "clean")))
        missed_pairs(work / "clean", truth, cfg)
        if args.groups_both:
            both_groupings(work / "clean", truth)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
