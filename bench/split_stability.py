"""Why split.py assigns groups itself: stratification error and stability vs scikit-learn.

Same synthetic clean manifests for every method (classes of different sizes, near-duplicate
groups of 1–4 images), split 60/20/20, then grown by --growth (a re-crawl) and split again.
For each method the script prints

- worst stratification error: max over class × split of |images − fraction × class size|;
- moved: share of the original images whose split changed after the growth (test-set churn).

Methods: pipeline.split (persisted assignment, greedy fill), scikit-learn StratifiedGroupKFold
(5 folds → 3 train / 1 val / 1 test), GroupShuffleSplit twice (train | rest, then val | test),
and a per-group hash (stable but only binomially stratified). Ends with the ratios
sklearn / ours for both numbers.

    python bench/split_stability.py                    # under a minute on 2 cores
    python bench/split_stability.py --images 20000 --growth 0.5
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from pipeline.config import SplitConfig
from pipeline.files import read_csv, write_jsonl
from pipeline.split import split

FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}
Row = dict[str, str]


def make_rows(images: int, classes: int, rng: np.random.Generator, start: int = 0) -> list[Row]:
    weights = np.linspace(1.0, 2.0, classes)
    rows: list[Row] = []
    g = start
    while len(rows) < images:
        label = f"class{rng.choice(classes, p=weights / weights.sum())}"
        for m in range(int(rng.choice([1, 1, 1, 1, 2, 2, 3, 4]))):
            rows.append({"path": f"{label}/{g:07d}_{m}.png", "class": label, "group": f"g{g}"})
        g += 1
    return rows


def ours(rows: list[Row], workdir: Path) -> dict[str, str]:
    write_jsonl(workdir / "clean" / "manifest.jsonl", rows)
    split(SplitConfig(), workdir / "clean", workdir / "split", workdir / "report.json")
    return {
        r["path"].removeprefix("../clean/"): name
        for name in FRACTIONS
        for r in read_csv(workdir / "split" / f"{name}.csv")
    }


def stratified_group_kfold(rows: list[Row], workdir: Path) -> dict[str, str]:
    labels = [r["class"] for r in rows]
    groups = [r["group"] for r in rows]
    folds = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=42)
    names = ["train", "train", "train", "val", "test"]
    out: dict[str, str] = {}
    for fold, (_, held) in enumerate(folds.split(np.zeros(len(rows)), labels, groups)):
        for i in held:
            out[rows[i]["path"]] = names[fold]
    return out


def group_shuffle_split(rows: list[Row], workdir: Path) -> dict[str, str]:
    groups = np.array([r["group"] for r in rows])
    first = GroupShuffleSplit(n_splits=1, train_size=0.6, random_state=42)
    train, rest = next(first.split(np.zeros(len(rows)), groups=groups))
    second = GroupShuffleSplit(n_splits=1, train_size=0.5, random_state=42)
    val, test = next(second.split(rest, groups=groups[rest]))
    out = {rows[i]["path"]: "train" for i in train}
    out.update({rows[rest[i]]["path"]: "val" for i in val})
    out.update({rows[rest[i]]["path"]: "test" for i in test})
    return out


def group_hash(rows: list[Row], workdir: Path) -> dict[str, str]:
    out = {}
    for r in rows:
        digest = hashlib.blake2b(f"42:{r['group']}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "little") / 2**64
        out[r["path"]] = "train" if u < 0.6 else "val" if u < 0.8 else "test"
    return out


def worst_error(rows: list[Row], assignment: dict[str, str]) -> float:
    sizes = Counter(r["class"] for r in rows)
    got = Counter((r["class"], assignment[r["path"]]) for r in rows)
    return max(
        abs(got[(label, name)] - fraction * n)
        for label, n in sizes.items()
        for name, fraction in FRACTIONS.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--growth", type=float, default=0.2, help="fraction of images added")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    before = make_rows(args.images, args.classes, rng)
    after = before + make_rows(int(args.images * args.growth), args.classes, rng, start=10**6)
    methods: dict[str, Callable[[list[Row], Path], dict[str, str]]] = {
        "pipeline.split (ours)": ours,
        "StratifiedGroupKFold": stratified_group_kfold,
        "GroupShuffleSplit x2": group_shuffle_split,
        "hash of group": group_hash,
    }
    print(
        f"{len(before)} images in {args.classes} classes, +{len(after) - len(before)} "
        f"after growth; 60/20/20 split"
    )
    print(f"  {'method':24s} {'worst error (images)':>22s} {'moved after growth':>20s}")
    results = {}
    for name, method in methods.items():
        with tempfile.TemporaryDirectory() as tmp:
            first = method(before, Path(tmp))
            second = method(after, Path(tmp))  # ours finds its persisted assignment here
        error = max(worst_error(before, first), worst_error(after, second))
        moved = sum(first[p] != second[p] for p in first) / len(first)
        results[name] = (error, moved)
        print(f"  {name:24s} {error:22.1f} {moved:19.1%}")
    best_error, best_moved = results["pipeline.split (ours)"]
    sk_error, sk_moved = results["StratifiedGroupKFold"]
    print(
        f"ratio StratifiedGroupKFold / ours: stratification error "
        f"{sk_error / max(best_error, 1e-9):.1f}x, images moved by growth "
        f"{sk_moved:.1%} vs {best_moved:.1%}"
    )


if __name__ == "__main__":
    main()
