"""Command line: ``python -m pipeline <stage> [--params params.yaml]``.

No logic lives here: each subcommand loads params.yaml, calls its stage function with the paths
dvc.yaml declares, and prints the stage's one-line summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import paths
from pipeline.config import DEFAULT_PARAMS, ParamsError, StageConfigs, StageError, load_params

STAGES = (
    "crawl",
    "clean",
    "split",
    "augment",
    "train-baseline",
    "train-transfer",
    "evaluate",
)


def _crawl(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.crawl import crawl

    return crawl(cfg.crawl, paths.RAW, report=paths.CRAWL_REPORT, refresh=args.refresh)


def _clean(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.clean import clean

    return clean(cfg.clean, paths.RAW, paths.CLEAN, report=paths.CLEAN_REPORT)


def _split(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.split import split

    return split(cfg.split, paths.CLEAN, paths.SPLIT, report=paths.SPLIT_REPORT)


def _augment(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.augment import augment

    return augment(cfg.augment, paths.SPLIT, paths.AUGMENTED, preview=paths.AUGMENT_PREVIEW)


def _train_baseline(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.train import train_baseline

    return train_baseline(
        cfg.train,
        paths.SPLIT,
        paths.MODELS,
        live_dir=paths.DVCLIVE / "baseline",
        augmented_dir=paths.AUGMENTED,
    )


def _train_transfer(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.train import train_transfer

    return train_transfer(
        cfg.train,
        paths.SPLIT,
        paths.MODELS,
        features_dir=paths.FEATURES,
        live_dir=paths.DVCLIVE / "transfer",
        augmented_dir=paths.AUGMENTED,
    )


def _evaluate(cfg: StageConfigs, args: argparse.Namespace) -> object:
    from pipeline.evaluate import evaluate

    return evaluate(cfg.evaluate, paths.SPLIT, paths.MODELS, paths.REPORTS)


RUNNERS: dict[str, Callable[[StageConfigs, argparse.Namespace], object]] = {
    "crawl": _crawl,
    "clean": _clean,
    "split": _split,
    "augment": _augment,
    "train-baseline": _train_baseline,
    "train-transfer": _train_transfer,
    "evaluate": _evaluate,
}

HELP = {
    "crawl": "fetch images for each class into data/raw (resumes a killed crawl)",
    "clean": "validate, normalise and dedupe data/raw into data/clean",
    "split": "grouped, stratified train/val/test CSVs in data/split",
    "augment": "augmentation preview (and offline copies if augment.mode=offline)",
    "train-baseline": "train the small convnet from scratch into models/baseline.keras",
    "train-transfer": "VGG16 feature extraction, then fine-tuning, into models/",
    "evaluate": "test-set metrics, plots and model card for every model into reports/",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="crawl2model: crawl images, clean, split, augment, train and evaluate. "
        "Each stage reads params.yaml and the previous stage's files; `dvc repro` runs them "
        "all in order and skips what is up to date.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES:
        p = sub.add_parser(stage, help=HELP[stage], description=HELP[stage])
        p.add_argument(
            "--params",
            type=Path,
            default=DEFAULT_PARAMS,
            help="parameters file (default: %(default)s)",
        )
        if stage == "crawl":
            p.add_argument(
                "--refresh",
                action="store_true",
                help="walk the sources again for new images; already-fetched images are not "
                "refetched",
            )
    p = sub.add_parser("check", help="validate params.yaml and exit")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    p = sub.add_parser(
        "predict",
        help="classify images with a trained model",
        description="Print the top classes with probabilities for each image, using the same "
        "decode and resize as training. Exit 0 if all were classified, 1 if any image could "
        "not be read (the others are still printed), 2 if the model cannot be loaded.",
    )
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE_OR_DIR",
        help="image files, or folders searched recursively for png/jpg/jpeg/gif/bmp/webp files",
    )
    p.add_argument(
        "--model",
        default="transfer_finetuned",
        help="model name in --models-dir: baseline, transfer_features or transfer_finetuned "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--top", type=int, default=3, metavar="K", help="classes to show per image (default: 3)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per image and line (JSON Lines) instead of text",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=paths.MODELS,
        help="folder holding <model>.keras and <model>.json (default: %(default)s)",
    )
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.stage == "predict":
        from pipeline.evaluate import run_predict

        return run_predict(args)
    try:
        cfg = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stage == "check":
        print(f"{args.params}: OK ({len(cfg.class_names)} classes: {', '.join(cfg.class_names)})")
        return 0
    started = time.monotonic()
    try:
        summary = RUNNERS[args.stage](cfg, args)
    except KeyboardInterrupt:
        print(f"\n{args.stage}: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except (ParamsError, StageError, FileNotFoundError) as exc:
        print(f"error: {args.stage}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.stage}: {summary} [{time.monotonic() - started:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
