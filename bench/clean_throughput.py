"""Throughput of the whole clean stage against fastdup and imagededup, in images per CPU-second.

Two sets: the demo site's images (``demo/build_site.py --full``: Fashion-MNIST, 28/56 px PNGs,
built into a temp folder; ``--limit`` takes the first N) and photos (``--photos`` JPEGs of
320–640 px cut and scaled from scikit-image's bundled photographs, a fifth of them re-encoded
copies). Per round, in turn, each in a fresh process on the same files: the clean stage with
pass 2 off, the clean stage with default params, fastdup (``fastdup.create(...).run()``,
connected components) and imagededup's ``PHash.find_duplicates`` (encode + search, its default
threshold). CPU-seconds are user + system time of the process and its children; the medians of
``--rounds`` interleaved rounds are printed, with the groups each tool found (images in groups,
largest group, and how many of our pairs the peer also pairs). Then a rerun of the stage on its
own output (decode must be reused) and the peak RSS of one worker analysing a picture just
under ``clean.max_image_pixels`` (PNG and JPEG).

    python bench/clean_throughput.py --peer-python /tmp/peers/bin/python
    python bench/clean_throughput.py --limit 5000 --photos 1500 --rounds 3 --peer-python ...
    python bench/clean_throughput.py --only photos --photos 1500 --tools off imagededup ...
    python bench/clean_throughput.py --only demo --rounds 1 --peer-limit 10000 ...  # 34k files

``--tools`` picks what is timed, ``--set key=json`` passes a clean param to our runs, and
``--peer-limit N`` runs the peers on a random N of the files (the full demo site's 33,953
takes fastdup and imagededup many minutes); their speed is then per image of that subset.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
OFF = {"second_pass": False}
NO_DENSE = {"dense_fallback": False}
TOOLS = {  # --tools name of each tool
    "crawl2model pass 2 off": "off",
    "crawl2model default": "default",
    "crawl2model no dense fallback": "nodense",
    "fastdup": "fastdup",
    "imagededup PHash": "imagededup",
}

OURS = r"""
import json, sys
from pathlib import Path
from pipeline.clean import clean
from pipeline.config import CleanConfig
if __name__ == "__main__":
    raw, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    cfg = CleanConfig(**{"min_images_per_class": 0, "near_duplicates": "group", **overrides})
    summary = clean(cfg, raw, out, out.parent / (out.name + "-report.json"))
    rows = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    print(json.dumps({"groups": {r["raw_path"]: r["group"] for r in rows},
                      "reused": summary.reused}))
"""

# imagededup imports torchvision for its CNN method; hashing needs none of it (bench/dedupe.py).
IMAGEDEDUP = r"""
import json, sys
from unittest import mock
for name in ["torchvision", "torchvision.models", "torchvision.models.vision_transformer",
             "torchvision.transforms", "torchvision.transforms.transforms"]:
    sys.modules[name] = mock.MagicMock()
import logging
logging.disable(logging.INFO)
from imagededup.methods import PHash
found = PHash(verbose=False).find_duplicates(image_dir=sys.argv[1])
print(json.dumps({"pairs": sorted({tuple(sorted((a, b))) for a, d in found.items() for b in d})}))
"""

FASTDUP = r"""
import json, sys, os
import fastdup
fd = fastdup.create(work_dir=sys.argv[2], input_dir=sys.argv[1])
fd.run(overwrite=True, verbose=False)
components = fd.connected_components()
frame = components[0] if isinstance(components, tuple) else components
groups = {}
for name, component in zip(frame["filename"], frame["component_id"]):
    groups.setdefault(int(component), []).append(os.path.relpath(name, sys.argv[1]))
print(json.dumps({"groups": [sorted(g) for g in groups.values() if len(g) > 1]}))
"""


def timed(command: list[str], cwd: Path | None = None) -> tuple[float, float, dict]:
    """(CPU-seconds of the process and its children, wall seconds, its JSON stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall, json.loads(done.stdout.strip().splitlines()[-1])


def flat_dir(raw: Path, flat: Path, limit: int = 0, seed: int = 0) -> set[str]:
    """The raw images in one folder (links) for the peers, named class__file; with ``limit``,
    a random ``limit`` of them (seeded). Returns the names linked."""
    flat.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (raw / "manifest.jsonl").read_text().splitlines()]
    if 0 < limit < len(rows):
        picked = np.random.default_rng(seed).choice(len(rows), limit, replace=False)
        rows = [rows[i] for i in sorted(picked)]
    names = set()
    for row in rows:
        target = flat / row["path"].replace("/", "__")
        if not target.exists():
            target.symlink_to(raw / row["path"])
        names.add(target.name)
    return names


def demo_set(work: Path, limit: int) -> Path:
    site = work / "site"
    subprocess.run(
        [sys.executable, str(ROOT / "demo/build_site.py"), "--full", "--out", str(site)],
        check=True,
        capture_output=True,
    )
    raw = work / "demo-raw"
    rows = []
    for path in sorted(site.rglob("*.png"))[:limit] if limit else sorted(site.rglob("*.png")):
        rows.append({"class": path.relative_to(site).parts[0], "path": str(path.relative_to(site))})
    raw.mkdir(parents=True, exist_ok=True)
    for part in {Path(r["path"]).parts[0] for r in rows}:
        (raw / part).symlink_to(site / part)
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw


def photo_set(work: Path, count: int, seed: int = 0) -> Path:
    """JPEG photos 320–640 px: random crops and scales of scikit-image's photos; a fifth are
    re-encoded, resized or cropped copies of an earlier one."""
    sys.path.insert(0, str(ROOT / "bench"))
    from clean_recall import photos

    rng = np.random.default_rng(seed)
    sources = list(photos().values())
    raw = work / "photo-raw"
    (raw / "photos").mkdir(parents=True, exist_ok=True)
    rows, made = [], []
    for number in range(count):
        if made and rng.random() < 0.2:
            image = Image.open(made[int(rng.integers(len(made)))]).convert("RGB")
            w, h = image.size
            d = int(w * 0.05)
            image = image.crop((d, d, w - d, h - d)).resize((int(w * 0.8), int(h * 0.8)))
        else:
            array = sources[int(rng.integers(len(sources)))]
            h, w = array.shape[:2]
            side = int(min(h, w) * rng.uniform(0.4, 0.9))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            target = int(rng.integers(320, 641))
            aspect = rng.uniform(0.75, 1.33)
            crop = array[top : top + side, left : left + int(min(w - left, side * aspect))]
            image = Image.fromarray(crop).resize(
                (target, int(target * crop.shape[0] / crop.shape[1]))
            )
        path = raw / "photos" / f"{number:05d}.jpg"
        image.save(path, format="JPEG", quality=int(rng.integers(70, 96)))
        made.append(path)
        rows.append({"class": "photos", "path": f"photos/{path.name}"})
    (raw / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return raw


def pairs_of_groups(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {pair for g in groups for pair in itertools.combinations(sorted(g), 2)}


def describe_groups(label: str, groups: list[list[str]], ours: set[tuple[str, str]]) -> str:
    """Images and groups a tool found, and how its pairs overlap ``ours``; counted without
    listing a peer's pairs (fastdup can join thousands of tiny images into one group)."""
    group_of = {member: n for n, group in enumerate(groups) for member in group}
    common = sum(1 for a, b in ours if a in group_of and group_of.get(b) == group_of[a])
    total = sum(len(g) * (len(g) - 1) // 2 for g in groups)
    shared = common / len(ours) if ours else 1.0
    largest = max((len(g) for g in groups), default=0)
    return (
        f"{label}: {sum(len(g) for g in groups)} images in {len(groups)} groups "
        f"(largest {largest}); pairs ours also has: {common} of {total}; "
        f"of our pairs it has {shared:.2f}"
    )


def run_set(name: str, raw: Path, work: Path, args: argparse.Namespace) -> None:
    flat = work / f"{name}-flat"
    subset = flat_dir(raw, flat, args.peer_limit)
    n = len((raw / "manifest.jsonl").read_text().splitlines())
    sizes = {tool: n for tool in TOOLS}
    if len(subset) < n:
        sizes.update({"fastdup": len(subset), "imagededup PHash": len(subset)})
    tools = {
        "crawl2model pass 2 off": lambda r: _ours(raw, work / f"{name}-off-{r}", args.set | OFF),
        "crawl2model default": lambda r: _ours(raw, work / f"{name}-on-{r}", args.set),
        "crawl2model no dense fallback": lambda r: _ours(
            raw, work / f"{name}-nodense-{r}", args.set | NO_DENSE
        ),
    }
    if args.peer_python:
        tools["fastdup"] = lambda r: _peer(args.peer_python, FASTDUP, flat, work / f"fd-{name}-{r}")
        tools["imagededup PHash"] = lambda r: _peer(args.peer_python, IMAGEDEDUP, flat, None)
    tools = {tool: run for tool, run in tools.items() if TOOLS[tool] in args.tools}
    speeds: dict[str, list[float]] = {t: [] for t in tools}
    walls: dict[str, list[float]] = {t: [] for t in tools}
    found: dict[str, list[list[str]]] = {}
    for round_ in range(args.rounds):
        for tool, function in tools.items():
            cpu, wall, groups = function(round_)
            speeds[tool].append(sizes[tool] / cpu)
            walls[tool].append(wall)
            found[tool] = groups
    print(f"\n== {name}: {n} images, medians of {args.rounds} interleaved rounds ==")
    if len(subset) < n and {"fastdup", "imagededup PHash"} & set(tools):
        print(
            f"(fastdup and imagededup ran on a random {len(subset)} of the {n} files, "
            "--peer-limit; their speeds are per image of that subset, and groups are compared "
            "on it)"
        )
    for tool in tools:
        print(
            f"{tool:30s} {statistics.median(speeds[tool]):7.1f} images/CPU-s "
            f"(rounds: {', '.join(f'{s:.0f}' for s in speeds[tool])}); "
            f"wall {statistics.median(walls[tool]):.1f} s"
        )
    medians = {tool: statistics.median(speeds[tool]) for tool in tools}
    for ours_tool in (
        "crawl2model pass 2 off",
        "crawl2model default",
        "crawl2model no dense fallback",
    ):
        for peer in ("imagededup PHash", "fastdup"):
            if ours_tool in medians and peer in medians:
                print(f"  {ours_tool} / {peer}: {medians[ours_tool] / medians[peer]:.2f}x")
    reference = "crawl2model default" if "crawl2model default" in found else next(iter(found))
    ours = {pair for pair in pairs_of_groups(found[reference]) if set(pair) <= subset}
    for tool, groups in found.items():
        inside = ([m for m in g if m in subset] for g in groups)
        found[tool] = [g for g in inside if len(g) > 1]
    print(f"  pairs compared with {reference}'s")
    for tool, groups in found.items():
        print("  " + describe_groups(tool, groups, ours))
    if "off" not in args.tools and "default" not in args.tools:
        return
    overrides, suffix = (args.set, "on") if "default" in args.tools else (args.set | OFF, "off")
    cpu, wall, result = _ours_raw(raw, work / f"{name}-{suffix}-0", overrides)
    print(
        f"rerun on the same output: {wall:.1f} s wall, {cpu:.1f} CPU-s, reused {result['reused']}"
    )


def _ours_raw(raw: Path, out: Path, overrides: dict) -> tuple[float, float, dict]:
    command = [sys.executable, "-c", OURS, str(raw), str(out), json.dumps(overrides)]
    return timed(command, cwd=ROOT)


def _ours(raw: Path, out: Path, overrides: dict) -> tuple[float, float, list[list[str]]]:
    cpu, wall, result = _ours_raw(raw, out, overrides)
    by_group: dict[str, list[str]] = {}
    for path, group in result["groups"].items():
        by_group.setdefault(group, []).append(path.replace("/", "__"))
    return cpu, wall, [g for g in by_group.values() if len(g) > 1]


def _peer(python: str, script: str, flat: Path, work: Path | None) -> tuple[float, float, list]:
    command = [python, "-c", script, str(flat)] + ([str(work)] if work else [])
    cpu, wall, result = timed(command)
    if "pairs" in result:  # imagededup: pairs → connected groups, as the clean stage forms them
        from pipeline.clean.grouping import graph_groups

        names = sorted({name for pair in result["pairs"] for name in pair})
        index = {name: n for n, name in enumerate(names)}
        edges = [(index[a], index[b]) for a, b in result["pairs"]]
        members: dict[int, list[str]] = {}
        for name, label in zip(names, graph_groups(len(names), edges), strict=True):
            members.setdefault(int(label), []).append(name)
        return cpu, wall, [g for g in members.values() if len(g) > 1]
    return cpu, wall, result["groups"]


PEAK = r"""
import sys
from pathlib import Path
from pipeline.clean.decode import DecodeSettings, DecodeTask, analyse_image
from pipeline.config import CleanConfig
settings = DecodeSettings.from_config(CleanConfig())
result = analyse_image(DecodeTask("k", Path(sys.argv[1]), "big", Path(sys.argv[2]), settings))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(result.status, int(hwm) // 1024)
"""


def peak_rss(work: Path) -> None:
    """Peak RSS of a fresh process analysing one picture just under clean.max_image_pixels.

    Read from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec, so a child of
    this (big) process would report this process's peak.
    """
    side = 7000  # 49 Mpx, just under clean.max_image_pixels (50 Mpx)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    for fmt in ("PNG", "JPEG"):
        Image.fromarray(pixels).save(work / f"big.{fmt.lower()}", format=fmt)
    del pixels, ramp
    hwm = "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    baseline = (
        int(
            subprocess.run(
                [sys.executable, "-c", "import pipeline.clean.decode\n" + hwm],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            ).stdout
        )
        // 1024
    )
    for fmt in ("PNG", "JPEG"):
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(work / f"big.{fmt.lower()}"), str(work / "big-out")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        status, megabytes = done.stdout.split()
        print(
            f"peak RSS analysing one {side}x{side} {fmt} ({status}): {megabytes} MB "
            f"(after importing decode.py alone: {baseline} MB)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="demo images (0 = all 30,000)")
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--peer-limit",
        type=int,
        default=0,
        help="run fastdup and imagededup on a random subset of this many files (0 = all)",
    )
    parser.add_argument("--peer-python", help="a Python with fastdup and imagededup installed")
    parser.add_argument("--only", choices=["demo", "photos", "memory"])
    parser.add_argument(
        "--tools",
        nargs="+",
        choices=list(TOOLS.values()),
        default=list(TOOLS.values()),
        help="which tools to time (default: all; fastdup and imagededup need --peer-python)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a clean param for crawl2model's runs, e.g. --set output_format='\"png\"'",
    )
    args = parser.parse_args()
    args.set = {key: json.loads(value) for key, _, value in (s.partition("=") for s in args.set)}
    with tempfile.TemporaryDirectory(prefix="clean-throughput-") as tmp:
        work = Path(tmp)
        if args.only in (None, "memory"):
            peak_rss(work)
        if args.only in (None, "photos"):
            run_set("photos", photo_set(work, args.photos), work, args)
        if args.only in (None, "demo"):
            run_set("demo", demo_set(work, args.limit), work, args)


if __name__ == "__main__":
    main()
