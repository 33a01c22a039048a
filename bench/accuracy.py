"""The Chollet table per backbone, at crawl-sized data, with 95 % intervals over seeds.

DLwP ch. 8 compares, on one data set: a small convnet from scratch, the same with augmentation,
a dense head on frozen pretrained features, and that model fine-tuned. This script runs those
rows through our own training stages (``train_baseline`` with augmentation off and on,
``train_transfer`` once per backbone section of params.yaml: ``train.transfer`` and
``train.compare``), at several training-set sizes and seeds, and scores every saved model on a
held-out test set. Data: Fashion-MNIST (Zalando product photos, 28×28 grey; Debian's
dataset-fashion-mnist at /usr/share/datasets/fashion-mnist), written as PNGs + split CSVs exactly
as the split stage does.

Per size n (training images per class) and seed: n train, max(10, n/3) val and a fixed 100 test
images per class, drawn disjointly by that seed. Consumes params.yaml's train section (epochs,
learning rates, backbones, image sizes); produces one JSON line per (n, seed, model) in
``--results`` (appended, so a killed run resumes where it stopped) and prints the table: mean
test accuracy and its 95 % t-interval over the seeds.

    python bench/accuracy.py                              # demo classes, n = 30,100,300, 3 seeds
    python bench/accuracy.py --classes 5,7,9 --sizes 300      # footwear
    python bench/accuracy.py --report bench/accuracy.jsonl    # only print the table
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, stdev
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if TYPE_CHECKING:
    from pipeline.config import TrainConfig
    from pipeline.train import TransferSection

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = (
    "t_shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
TEST_PER_CLASS = 100


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_split(root: Path, classes: list[int], n_train: int, seed: int) -> Path:
    """PNGs under root/clean/<class>/ and root/split/{train,val,test}.csv: ``n_train`` train,
    max(10, n_train // 3) val and TEST_PER_CLASS test images per class, disjoint."""
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    n_val = max(10, n_train // 3)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for label in classes:
        name = NAMES[label]
        (root / "clean" / name).mkdir(parents=True, exist_ok=True)
        chosen = rng.permutation(np.flatnonzero(labels == label))[
            : n_train + n_val + TEST_PER_CLASS
        ]
        for i, index in enumerate(chosen):
            Image.fromarray(images[index]).save(root / "clean" / name / f"{index}.png")
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rows[split].append(
                {"path": f"../clean/{name}/{index}.png", "class": name, "group": str(index)}
            )
    (root / "split").mkdir(exist_ok=True)
    for split, split_rows in rows.items():
        with open(root / "split" / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "class", "group"])
            writer.writeheader()
            writer.writerows(split_rows)
    return root / "split"


def test_accuracy(model_path: Path, split_dir: Path) -> float:
    """Accuracy of a saved model on split_dir/test.csv, at the size its sidecar records."""
    import keras

    from pipeline.dataset import label_indices, load_split, make_dataset

    sidecar = json.loads(model_path.with_suffix(".json").read_text())
    rows = load_split(split_dir / "test.csv")
    model = keras.models.load_model(model_path, compile=False)
    ds = make_dataset(rows, sidecar["class_names"], sidecar["image_size"], 64, cache=False)
    predicted = model.predict(ds, verbose=0).argmax(axis=1)
    return float((predicted == label_indices(rows, sidecar["class_names"])).mean())


def run_one(
    cfg: TrainConfig, split_dir: Path, work: Path, sections: list[TransferSection]
) -> list[dict[str, object]]:
    """Every row for one split: (row label, test accuracy, training seconds)."""
    import keras

    from pipeline.train import train_baseline, train_transfer

    out: list[dict[str, object]] = []
    for augment in (False, True):
        baseline = cfg.baseline.model_copy(update={"augment": augment})
        run_cfg = cfg.model_copy(update={"baseline": baseline})
        models_dir = work / f"models_aug{int(augment)}"
        started = time.monotonic()
        train_baseline(run_cfg, split_dir, models_dir, work / f"live_aug{int(augment)}")
        label = "scratch + augmentation" if augment else "scratch"
        seconds = time.monotonic() - started
        out.append(
            {
                "model": label,
                "accuracy": test_accuracy(models_dir / "baseline.keras", split_dir),
                "seconds": seconds,
            }
        )
        keras.backend.clear_session()
    for section in sections:
        tcfg = cfg.compare if section == "compare" else cfg.transfer
        started = time.monotonic()
        models_dir = work / f"models_{section}"
        train_transfer(
            cfg,
            split_dir,
            models_dir,
            work / f"features_{section}",
            work / f"live_{section}",
            section=section,
        )
        seconds = time.monotonic() - started
        for phase, suffix in (
            ("features", "features"),
            (f"fine-tuned {tcfg.unfreeze}", "finetuned"),
        ):
            accuracy = test_accuracy(models_dir / f"{section}_{suffix}.keras", split_dir)
            out.append(
                {
                    "model": f"{tcfg.backbone} ({tcfg.weights}) {phase}",
                    "accuracy": accuracy,
                    "seconds": seconds,
                }
            )
        keras.backend.clear_session()
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    if len(values) < 2:
        return mean(values), 0.0
    from scipy.stats import t

    return mean(values), float(t.ppf(0.975, len(values) - 1)) * stdev(values) / math.sqrt(
        len(values)
    )


def print_table(results: Path) -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    sizes = sorted({r["n"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    print("| model | " + " | ".join(f"n = {n}/class" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for model in models:
        cells = []
        for n in sizes:
            values = [r["accuracy"] for r in rows if r["model"] == model and r["n"] == n]
            if not values:
                cells.append("—")
                continue
            m, h = interval(values)
            cells.append(f"{m:.3f} ± {h:.3f} ({len(values)})")
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("(mean test accuracy ± half-width of the 95 % t-interval over seeds (count))\n")
    print("Paired by seed (same images), each model minus scratch:\n")
    print("| model − scratch | " + " | ".join(f"n = {n}/class" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    by_key = {(r["model"], r["n"], r["seed"]): r["accuracy"] for r in rows}
    for model in models[1:]:
        cells = []
        for n in sizes:
            seeds = [s for (m, k, s) in by_key if m == model and k == n]
            diffs = [
                by_key[(model, n, s)] - by_key[("scratch", n, s)]
                for s in seeds
                if ("scratch", n, s) in by_key
            ]
            m, h = interval(diffs) if diffs else (float("nan"), 0.0)
            cells.append(f"{m:+.3f} ± {h:.3f}" if diffs else "—")
        print(f"| {model} | " + " | ".join(cells) + " |")
    for n in sizes:
        # both rows of one transfer run carry that run's time: count it once
        seconds = {(r["seed"], r["seconds"]) for r in rows if r["n"] == n}
        print(f"n = {n}: {sum(t for _, t in seconds):.0f} s of training over all seeds")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--classes",
        default="0,2,6",
        help="Fashion-MNIST labels (default: T-shirt/top, pullover, shirt)",
    )
    parser.add_argument("--sizes", default="30,100,300", help="training images per class")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--sections", default="transfer,compare", help="train.<section> backbones to run"
    )
    parser.add_argument("--baseline-epochs", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "accuracy.jsonl")
    parser.add_argument(
        "--report", type=Path, default=None, help="print the table of a results file"
    )
    args = parser.parse_args()
    if args.report:
        print_table(args.report)
        return 0
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        print(f"needs {FASHION} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2

    from pipeline.config import load_params

    base_cfg = load_params(ROOT / "params.yaml").train.model_copy(update={"verbose": 0})
    if args.baseline_epochs:
        base_cfg = base_cfg.model_copy(
            update={
                "baseline": base_cfg.baseline.model_copy(update={"epochs": args.baseline_epochs})
            }
        )
    classes = [int(c) for c in args.classes.split(",")]
    done = set()
    if args.results.is_file():
        done = {
            (r["n"], r["seed"]) for r in map(json.loads, args.results.read_text().splitlines()) if r
        }
    for n in (int(s) for s in args.sizes.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            if (n, seed) in done:
                continue
            work = Path(tempfile.mkdtemp(prefix=f"accuracy-n{n}-s{seed}-"))
            split_dir = write_fashion_split(work, classes, n, seed)
            cfg = base_cfg.model_copy(update={"seed": seed})
            started = time.monotonic()
            sections = cast("list[TransferSection]", args.sections.split(","))
            rows = run_one(cfg, split_dir, work, sections)
            with open(args.results, "a") as fh:
                for row in rows:
                    fh.write(json.dumps({"n": n, "seed": seed, "classes": classes, **row}) + "\n")
            print(f"n={n} seed={seed}: {time.monotonic() - started:.0f} s", flush=True)
    print_table(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
