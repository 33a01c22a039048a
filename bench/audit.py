"""Label audit, measured: does confident learning find the crawl's wrong labels and foreign images,
better than ranking by the model's own training loss, and does dropping them help?

Builds a noisy web site from Fashion-MNIST (Debian's dataset-fashion-mnist): three look-alike
classes (pullover, coat, shirt), each class's pages holding ``--wrong`` of their images from the
other two classes and ``--foreign`` from classes that are none of them (trouser, sneaker, bag,
sandal, ankle boot). Then, in a scratch project, the real stages: crawl (over HTTP) → clean →
split → audit, and prints against the truth (recorded per image URL):

- precision and recall of the audit's flagged set, separately for wrong labels and for foreign
  images, and the same for the naive ranking (the trained baseline's loss on its own training
  images, what fastai's ImageClassifierCleaner shows) at the same number of images flagged;
- what ``audit.action: drop`` removes from train/val (precision against the truth);
- test accuracy on the TRUE labels of the baseline trained with ``audit.action: flag`` and with
  ``audit.action: drop`` (foreign test images have no true class and are left out), each trained
  ``--trainings`` times with different training seeds on the same data (one from-scratch training
  on ~228 test images is too noisy to tell the two apart), as mean ± standard deviation.

    python bench/audit.py                      # 3 × 400 images, ~10 minutes on 2 CPU cores
    python bench/audit.py --also-drop-below 0.15   # also drop only the confident label issues
    python bench/audit.py --per-class 800 --work /tmp/bench-audit

Results are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "demo"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from build_site import CLASS_NAMES, build_class, page_html, read_idx  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("pullover", "coat", "shirt")
FOREIGN = ("trouser", "sneaker", "bag", "sandal", "ankle_boot")
FOREIGN_LABEL = "<foreign>"


# --- the noisy site ---------------------------------------------------------------------------


def build_noisy_site(
    out: Path, per_class: int, wrong: float, foreign: float, seed: int
) -> dict[str, str]:
    """Write the site; return the truth: image URL path (``<class>/img/NNNN.png``) → true class
    (one of CLASSES, or FOREIGN_LABEL)."""
    images, labels = read_idx(
        FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    )
    rng = np.random.default_rng(seed)
    pools = {
        name: list(rng.permutation(np.flatnonzero(labels == CLASS_NAMES.index(name))))
        for name in (*CLASSES, *FOREIGN)
    }
    truth: dict[str, str] = {}
    links = []
    for name in CLASSES:
        n_foreign = round(per_class * foreign)
        n_wrong = round(per_class * wrong)
        others = [c for c in CLASSES if c != name]
        sources = (
            [name] * (per_class - n_wrong - n_foreign)
            + [others[i % len(others)] for i in range(n_wrong)]
            + [FOREIGN[i % len(FOREIGN)] for i in range(n_foreign)]
        )
        sources = [sources[i] for i in rng.permutation(len(sources))]
        chosen = np.stack([images[pools[source].pop()] for source in sources])
        build_class(out, name, chosen, pages_dirt=False)
        for i, source in enumerate(sources):
            truth[f"{name}/img/{i:04d}.png"] = source if source in CLASSES else FOREIGN_LABEL
        links.append(f'<li><a href="{name}/index.html">{html.escape(name)}</a></li>')
    (out / "index.html").write_text(page_html("Knitwear", ["<ul>", *links, "</ul>"]))
    return truth


def true_class(url: str, truth: dict[str, str]) -> str:
    """The truth for a crawled URL (``{demo}/coat/img/0012-2x.png`` → coat/img/0012.png)."""
    match = re.search(r"([^/]+)/img/(\d{4})(?:-2x)?\.png$", url)
    if not match:
        raise ValueError(f"{url}: not one of the bench site's images")
    return truth[f"{match[1]}/img/{match[2]}.png"]


# --- the scratch project ----------------------------------------------------------------------


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def bench_params(site: Path, action: str, image_size: int, epochs: int) -> dict[str, Any]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["classes"] = [{"name": c, "seeds": [f"{{demo}}/{c}/index.html"]} for c in CLASSES]
    params["crawl"].update(serve_demo_site=str(site), max_images_per_class=0, max_per_host=8)
    params["train"]["fit"]["image_size"] = image_size
    params["train"]["baseline"]["epochs"] = epochs
    params["train"]["verbose"] = 0
    params.setdefault("audit", {})["action"] = action
    return params


@dataclass(frozen=True)
class Timed:
    seconds: float
    summary: Any


def run(stage: str, params: dict[str, Any], train_seed: int | None = None) -> Timed:
    """Run ``stage``; ``train_seed`` replaces the trainers' seed (weight init, shuffling,
    augmentation) and nothing else: the split and the audit keep the global seed's."""
    from pipeline.config import parse_params
    from pipeline.stages import run_stage

    cfg = parse_params(params, source="bench params")
    if train_seed is not None:
        augment = cfg.train.augment.model_copy(update={"seed": train_seed})
        train = cfg.train.model_copy(update={"seed": train_seed, "augment": augment})
        cfg = cfg.model_copy(update={"train": train})
    started = time.monotonic()
    summary = run_stage(stage, cfg)
    print(f"  {stage}: {summary}")
    return Timed(time.monotonic() - started, summary)


# --- scoring against the truth ----------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    path: Path  # as the split CSV resolves it
    sha256: str
    split: str
    given: str
    true: str  # one of CLASSES or FOREIGN_LABEL

    @property
    def wrong(self) -> bool:
        return self.true != FOREIGN_LABEL and self.true != self.given

    @property
    def foreign(self) -> bool:
        return self.true == FOREIGN_LABEL


def read_images(project: Path, truth: dict[str, str]) -> list[Image]:
    from pipeline.dataset import load_split
    from pipeline.files import read_jsonl

    rows = read_jsonl(project / "data/clean/manifest.jsonl")
    by_path = {r["path"]: r for r in rows}
    images = []
    for split in ("train", "val", "test"):
        rows_of = load_split(project / "data/split" / f"{split}.csv")
        for path, label in zip(rows_of.paths, rows_of.labels, strict=True):
            row = by_path[f"{label}/{path.name}"]
            images.append(Image(path, row["sha256"], split, label, true_class(row["url"], truth)))
    return images


def rates(flagged: set[str], images: list[Image]) -> dict[str, float]:
    """Precision of the flagged set (any true problem) and recall of each kind of problem."""
    hits = [i for i in images if i.sha256 in flagged]
    wrong = [i for i in images if i.wrong]
    foreign = [i for i in images if i.foreign]
    return {
        "flagged": len(hits),
        "precision": sum(i.wrong or i.foreign for i in hits) / max(len(hits), 1),
        "recall_wrong": sum(i.sha256 in flagged for i in wrong) / max(len(wrong), 1),
        "recall_foreign": sum(i.sha256 in flagged for i in foreign) / max(len(foreign), 1),
    }


def kind_rates(flagged: set[str], truth: set[str]) -> str:
    hits = len(flagged & truth)
    return (
        f"precision {hits / max(len(flagged), 1):.2f}, recall {hits / max(len(truth), 1):.2f} "
        f"({hits} of {len(flagged)} flagged, {len(truth)} true)"
    )


def model_losses(project: Path, images: list[Image]) -> dict[str, float]:
    """The trained baseline's loss on each image with its GIVEN label (the naive ranking)."""
    import json

    import keras

    from pipeline.dataset import load_images

    sidecar = json.loads((project / "models/baseline.json").read_text())
    names = sidecar["class_names"]
    model = keras.models.load_model(project / "models/baseline.keras")
    pixels = load_images([i.path for i in images], int(sidecar.get("image_size", 64)))
    probs = model.predict(pixels, verbose=0)
    given = np.array([names.index(i.given) for i in images])
    loss = -np.log(np.clip(probs[np.arange(len(images)), given], 1e-12, 1))
    return {i.sha256: float(x) for i, x in zip(images, loss, strict=True)}


def true_accuracy(project: Path, images: list[Image]) -> float:
    """The baseline's test accuracy on the TRUE labels (foreign test images left out)."""
    import json

    import keras

    from pipeline.dataset import load_images

    test = [i for i in images if i.split == "test" and not i.foreign]
    sidecar = json.loads((project / "models/baseline.json").read_text())
    names = sidecar["class_names"]
    model = keras.models.load_model(project / "models/baseline.keras")
    probs = model.predict(load_images([i.path for i in test], int(sidecar.get("image_size", 64))))
    predicted = [names[k] for k in probs.argmax(axis=1)]
    return sum(p == i.true for p, i in zip(predicted, test, strict=True)) / len(test)


def flagged_by_audit(project: Path) -> dict[str, str]:
    """sha256 → issue ("label", "foreign", "label+foreign") of every suspect the audit listed."""
    from pipeline.files import read_csv

    rows = read_csv(project / "data/audit/label_issues.csv")
    return {r["sha256"]: r["issue"] for r in rows if r["issue"]}


# --- the run ----------------------------------------------------------------------------------


def compare_rankings(project: Path, images: list[Image]) -> None:
    """Audit vs the baseline's own training loss, on the training images, at the same count."""
    train = [i for i in images if i.split == "train"]
    audit_flagged = {s for s in flagged_by_audit(project) if s in {i.sha256 for i in train}}
    losses = model_losses(project, train)
    by_loss = sorted(losses, key=losses.__getitem__, reverse=True)
    naive = set(by_loss[: len(audit_flagged)])
    print(f"\ntrain split, {len(audit_flagged)} images flagged by each:")
    for name, flagged in (("audit (cleanlab)", audit_flagged), ("naive (own loss)", naive)):
        r = rates(flagged, train)
        print(
            f"  {name:18s} precision {r['precision']:.2f}  recall wrong {r['recall_wrong']:.2f}  "
            f"recall foreign {r['recall_foreign']:.2f}"
        )
    lookalike = [i for i in train if not i.foreign]
    ids = {i.sha256 for i in lookalike}
    wrong = {i.sha256 for i in lookalike if i.wrong}
    audit_la = audit_flagged & ids
    naive_la = set([s for s in by_loss if s in ids][: len(audit_la)])
    print(f"look-alike set only (foreign images left out), {len(audit_la)} flagged by each:")
    print(f"  audit (cleanlab)   wrong labels: {kind_rates(audit_la, wrong)}")
    print(f"  naive (own loss)   wrong labels: {kind_rates(naive_la, wrong)}")


def report_audit(project: Path, images: list[Image]) -> None:
    flagged = flagged_by_audit(project)
    label = {s for s, issue in flagged.items() if "label" in issue}
    foreign_flags = {s for s, issue in flagged.items() if "foreign" in issue}
    wrong = {i.sha256 for i in images if i.wrong}
    foreign = {i.sha256 for i in images if i.foreign}
    r = rates(set(flagged), images)
    counts = f"{len(images)} images, {len(wrong)} wrong, {len(foreign)} foreign"
    print(f"\naudit, all splits ({counts}):")
    print(
        f"  flagged {r['flagged']}: precision {r['precision']:.2f}, recall wrong labels "
        f"{r['recall_wrong']:.2f}, recall foreign images {r['recall_foreign']:.2f}"
    )
    print(f"  label-issue flags vs wrong labels:  {kind_rates(label, wrong)}")
    print(f"  label-issue flags vs wrong+foreign: {kind_rates(label, wrong | foreign)}")
    print(f"  foreign flags vs foreign images:    {kind_rates(foreign_flags, foreign)}")


def report_drop(project: Path, images: list[Image], name: str) -> None:
    """What ``action: drop`` (variant ``name``) removed from train/val, against the truth."""
    from pipeline.files import read_csv

    rows = read_csv(project / "data/audit/label_issues.csv")
    dropped = {r["sha256"] for r in rows if r["verdict"] == "drop"}
    kept = {r["sha256"] for r in rows if r["verdict"] == "flag" and r["split"] != "test"}
    pool = [i for i in images if i.split != "test"]
    bad = {i.sha256 for i in pool if i.wrong or i.foreign}
    print(
        f"\naction {name}, train+val ({len(pool)} images, {len(bad)} wrong or foreign): "
        f"removed {len(dropped)}: {kind_rates(dropped, bad)}; "
        f"{len(kept)} label issues kept and flagged (precision "
        f"{len(kept & bad) / max(len(kept), 1):.2f})"
    )


def spread(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    listed = ", ".join(f"{v:.3f}" for v in values)
    return f"{np.mean(values):.3f} ± {sd:.3f} [{listed}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=400)
    parser.add_argument("--wrong", type=float, default=0.15, help="share from the other classes")
    parser.add_argument("--foreign", type=float, default=0.05, help="share from no class")
    parser.add_argument("--epochs", type=int, default=15, help="baseline epochs")
    parser.add_argument("--image-size", type=int, default=64, help="the baseline's input")
    parser.add_argument(
        "--trainings", type=int, default=3, help="baseline trainings per action (training seeds)"
    )
    parser.add_argument(
        "--also-drop-below",
        type=float,
        nargs="*",
        default=[],
        help="also train with action drop at these audit.drop_below values",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/crawl2model-bench-audit"))
    args = parser.parse_args(argv)
    import json
    import shutil

    if args.trainings < 1:
        parser.error("--trainings must be at least 1")
    if args.work.exists():
        shutil.rmtree(args.work)
    site = args.work / "site"
    truth = build_noisy_site(site, args.per_class, args.wrong, args.foreign, args.seed)
    project = args.work / "project"
    flag = bench_params(site, "flag", args.image_size, args.epochs)
    drop = bench_params(site, "drop", args.image_size, args.epochs)
    variants = {"flag": flag, f"drop (drop_below {drop['audit']['drop_below']})": drop}
    for below in args.also_drop_below:
        extra = bench_params(site, "drop", args.image_size, args.epochs)
        extra["audit"]["drop_below"] = below
        variants[f"drop (drop_below {below})"] = extra
    base_seed = int(flag["seed"])
    train_seeds = [base_seed + n for n in range(args.trainings)]
    accuracy: dict[str, list[float]] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with inside(project):
        for stage in ("crawl", "clean", "split"):
            run(stage, flag)
        audit_run = run("audit", flag)
        images = read_images(project, truth)
        report_audit(project, images)
        noise = json.loads((project / "reports/audit_report.json").read_text())["noise_rate"]
        for name in CLASSES:
            pool = [i for i in images if i.given == name and i.split != "test"]
            actual = sum(i.wrong or i.foreign for i in pool) / len(pool)
            estimate = noise["train+val"][name]
            print(f"  {name}: estimated noise {estimate:.2f}, actual {actual:.2f} (train+val)")
        for name, params in variants.items():
            rerun = run("audit", params) if name != "flag" else audit_run
            if name != "flag":
                report_drop(project, images, name)
            for n, train_seed in enumerate(train_seeds):
                trained = run("train-baseline", params, train_seed)
                seconds[name].append(trained.seconds)
                if name == "flag" and n == 0:
                    compare_rankings(project, images)
                accuracy[name].append(true_accuracy(project, images))
    print(
        f"\nbaseline test accuracy on the TRUE labels, {args.trainings} training(s) per action "
        f"(training seeds {train_seeds[0]}..{train_seeds[-1]}, same data), mean ± sd:"
    )
    for name, values in accuracy.items():
        print(f"  action {name:26s} {spread(values)}")
    for name, values in accuracy.items():
        if name != "flag":
            difference = [d - f for f, d in zip(accuracy["flag"], values, strict=True)]
            print(f"  {name} − flag: {spread(difference)} (per training seed)")
    per_training = ", ".join(f"{np.mean(s):.0f} s ({name})" for name, s in seconds.items())
    print(
        f"time: audit {audit_run.seconds:.0f} s (features extracted), rerun with action drop "
        f"{rerun.seconds:.0f} s (features cached); baseline per training: {per_training}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
