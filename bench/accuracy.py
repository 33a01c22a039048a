"""The four-row Chollet table on real labelled photos, through our own training stages.

DLwP ch. 8 compares, on one data set: a small convnet from scratch, the same with augmentation,
a dense head on frozen VGG16 features, and that model fine-tuned. This script builds a split from
Fashion-MNIST (Zalando product photos, 28×28 grey; Debian's dataset-fashion-mnist at
/usr/share/datasets/fashion-mnist), writes it as PNGs + split CSVs exactly as the split stage
does, runs ``train_baseline`` (augment off, then on) and ``train_transfer`` on it, and scores each
saved model on the held-out test split. It also prints the ratio of each row to chance (1/N) and
the wall time of each stage, and the total training time of the demo-sized default run.

Default: the demo's shape (3 footwear classes × 300 images, 60/20/20, 64 px, params.yaml's
train section) — a few minutes on 2 CPU cores. Bigger:

    python bench/accuracy.py --classes 0,1,2,3,4,5,6,7,8,9 --per-class 1000 --image-size 96 \
        --weights imagenet   # (needs internet for the ImageNet download)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = (
    "tshirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_split(root: Path, classes: list[int], per_class: int, seed: int) -> Path:
    """PNGs under root/clean/<class>/ and root/split/{train,val,test}.csv (60/20/20 per class)."""
    images = read_idx(FASHION / "train-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    for label in classes:
        name = NAMES[label]
        (root / "clean" / name).mkdir(parents=True, exist_ok=True)
        chosen = rng.permutation(np.flatnonzero(labels == label))[:per_class]
        n_train, n_val = int(0.6 * len(chosen)), int(0.2 * len(chosen))
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


def test_accuracy(model_path: Path, split_dir: Path, image_size: int) -> float:
    import json

    import keras

    from pipeline.dataset import label_indices, load_split, make_dataset

    sidecar = json.loads(model_path.with_suffix(".json").read_text())
    rows = load_split(split_dir / "test.csv")
    model = keras.models.load_model(model_path, compile=False)
    ds = make_dataset(rows, sidecar["class_names"], image_size, 64, cache=False)
    predicted = model.predict(ds, verbose=0).argmax(axis=1)
    return float((predicted == label_indices(rows, sidecar["class_names"])).mean())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--classes", default="5,7,9", help="Fashion-MNIST labels (default: footwear)"
    )
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--baseline-epochs", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--feature-epochs", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="default: params.yaml")
    parser.add_argument("--weights", default=None, help="default: params.yaml (hed-bsds500)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument(
        "--rows", choices=("all", "baseline", "transfer"), default="all", help="which rows to run"
    )
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        print(f"needs {FASHION} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
        return 2

    from pipeline.config import load_params
    from pipeline.train import train_baseline, train_transfer

    cfg = load_params(ROOT / "params.yaml").train
    update: dict[str, object] = {"verbose": 2}
    if args.image_size:
        update["fit"] = cfg.fit.model_copy(update={"image_size": args.image_size})
    cfg = cfg.model_copy(update=update)
    baseline_update = {"epochs": args.baseline_epochs} if args.baseline_epochs else {}
    transfer_update: dict[str, object] = {}
    if args.feature_epochs:
        transfer_update["feature_epochs"] = args.feature_epochs
    if args.fine_tune_epochs is not None:
        transfer_update["fine_tune_epochs"] = args.fine_tune_epochs
    if args.weights:
        transfer_update["weights"] = args.weights
    classes = [int(c) for c in args.classes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="accuracy-"))
    split_dir = write_fashion_split(work, classes, args.per_class, cfg.seed)

    results: list[tuple[str, Path]] = []
    timings: dict[str, float] = {}
    for augment in (False, True) if args.rows != "transfer" else ():
        run_cfg = cfg.model_copy(
            update={
                "baseline": cfg.baseline.model_copy(update={**baseline_update, "augment": augment})
            }
        )
        models_dir = work / f"models_aug{int(augment)}"
        started = time.monotonic()
        print(train_baseline(run_cfg, split_dir, models_dir, work / f"dvclive_aug{int(augment)}"))
        timings[f"baseline augment={augment}"] = time.monotonic() - started
        label = "scratch + augmentation" if augment else "scratch (no augmentation)"
        results.append((label, models_dir / "baseline.keras"))
    if args.rows != "baseline":
        run_cfg = cfg.model_copy(
            update={"transfer": cfg.transfer.model_copy(update=transfer_update)}
        )
        started = time.monotonic()
        print(
            train_transfer(
                run_cfg, split_dir, work / "models_tl", work / "features", work / "dvclive_tl"
            )
        )
        timings["transfer"] = time.monotonic() - started
        results.append(
            (
                f"VGG16 features ({run_cfg.transfer.weights}, frozen)",
                work / "models_tl" / "transfer_features.keras",
            )
        )
        results.append(
            (
                f"VGG16 fine-tuned ({run_cfg.transfer.unfreeze})",
                work / "models_tl" / "transfer_finetuned.keras",
            )
        )

    chance = 1 / len(classes)
    print(
        f"\nFashion-MNIST labels {classes} ({', '.join(NAMES[c] for c in classes)}), "
        f"{args.per_class}/class (60/20/20), {cfg.fit.image_size} px, seed {cfg.seed}"
    )
    print("| model | test accuracy | ratio to chance |\n|---|---|---|")
    for label, path in results:
        accuracy = test_accuracy(path, split_dir, cfg.fit.image_size)
        print(f"| {label} | {accuracy:.3f} | {accuracy / chance:.2f}× |")
    for name, seconds in timings.items():
        print(f"train {name}: {seconds:.0f} s")
    demo = timings.get("baseline augment=True", 0) + timings.get("transfer", 0)
    print(f"demo-shaped training (baseline with augmentation + transfer): {demo:.0f} s "
          f"= {demo / 300:.2f}× the 300 s budget")  # fmt: skip
    print(f"files in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
