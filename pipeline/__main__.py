"""Command line: ``python -m pipeline <stage> [--params params.yaml]``.

No logic lives here: the subcommands come from the stage registry (pipeline/stages.py); each
loads params.yaml, runs its stage through the registry (which writes the stage's summary file)
and prints the stage's one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipeline import paths, stages
from pipeline.config import DEFAULT_PARAMS, ParamsError, StageConfigs, StageError, load_params
from pipeline.runlock import run_lock


def _add_crawl_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--refresh",
        action="store_true",
        help="walk the sources again for new images; already-fetched images are not refetched",
    )
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        metavar="NAME",
        help="crawl only this class (repeatable; default: every class in params.yaml)",
    )
    steps = p.add_mutually_exclusive_group()
    steps.add_argument(
        "--discover",
        dest="crawl_step",
        action="store_const",
        const="discover",
        help="sharded crawl, step 1: find each class's candidate images (no downloads)",
    )
    steps.add_argument(
        "--shard",
        metavar="I/N",
        help="sharded crawl, step 2: download host shard I of N (e.g. 2/4) of the candidates "
        "found by --discover; shards may run at the same time, on several machines sharing "
        "data/raw",
    )
    steps.add_argument(
        "--merge",
        dest="crawl_step",
        action="store_const",
        const="merge",
        help="sharded crawl, step 3: merge the shards into data/raw/manifest.jsonl and the report",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="crawl2model: crawl images, clean, split, audit labels, augment, train, "
        "evaluate and export. Each stage reads params.yaml and the previous stage's files; "
        "`dvc repro` runs them all in order and skips what is up to date.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in stages.STAGES:
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        p.add_argument(
            "--params",
            type=Path,
            default=DEFAULT_PARAMS,
            help="parameters file (default: %(default)s)",
        )
        if stage.name == "crawl":
            _add_crawl_options(p)
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
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="web app: try the model on your images, review the label audit's flagged images",
        description="Serve the predict page (/), the review page (/review), a JSON API "
        "(POST /predict, GET /health, GET /model) and its docs (/docs). Options default to "
        "params.yaml's serve section.",
    )
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS)
    p.add_argument("--model", help="best | a model name | models/best (default: serve.model)")
    p.add_argument("--host", help="address to bind (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: serve.port, 8000)")
    p.add_argument("--review-csv", type=Path, help="where decisions go (serve.review_csv)")
    p.add_argument("--audit-csv", type=Path, help="the audit's flagged images (serve.audit_csv)")


def _serve(args: argparse.Namespace, cfg: StageConfigs) -> int:
    """Run the app (pipeline.serve) with params.yaml's serve section and the CLI's overrides."""
    from pydantic import ValidationError

    from pipeline.config import ServeConfig
    from pipeline.serve import serve

    options = ("model", "host", "port", "review_csv", "audit_csv")
    given = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    try:
        settings = ServeConfig.model_validate({**cfg.serve.model_dump(), **given})
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: serve: {first['loc'][0]}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        serve(settings, cfg.export)
    except StageError as exc:
        print(f"error: serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Print ``pipeline.predict.predict_images``'s results: text or JSON Lines on stdout, each
    unreadable image on stderr. Exit 0 all classified, 1 some unreadable, 2 no model."""
    from pipeline.predict import ModelLoadError, predict_images

    if args.top < 1:
        print("error: predict: --top must be at least 1", file=sys.stderr)
        return 2
    try:
        report = predict_images(
            args.models_dir, args.model, args.images, args.top, args.batch_size, progress=True
        )
    except ModelLoadError as exc:
        print(f"error: predict: {exc}", file=sys.stderr)
        return 2
    for prediction in report.predictions:
        if args.json:
            top = [
                {"class": c.class_name, "probability": round(c.probability, 6)}
                for c in prediction.top
            ]
            print(json.dumps({"path": str(prediction.path), "model": report.model, "top": top}))
        else:
            ranked = ", ".join(f"{c.class_name} {c.probability:.3f}" for c in prediction.top)
            print(f"{prediction.path}: {ranked}")
    for error in report.errors:
        if args.json:
            row = {"path": str(error.path), "model": report.model, "error": error.message}
            print(json.dumps(row))
        print(f"error: {error.path}: {error.message}", file=sys.stderr)
    return 0 if report.complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.stage == "predict":
        return _predict(args)
    try:
        cfg = load_params(args.params)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.stage == "check":
        print(f"{args.params}: OK ({len(cfg.class_names)} classes: {', '.join(cfg.class_names)})")
        return 0
    if args.stage == "serve":
        return _serve(args, cfg)
    options = stages.StageOptions()
    if args.stage == "crawl":
        step = "fetch" if args.shard else (args.crawl_step or "all")
        options = stages.StageOptions(
            refresh=args.refresh, classes=tuple(args.classes), crawl_step=step, shard=args.shard
        )
    started = time.monotonic()
    try:
        with run_lock(Path.cwd(), f"python -m pipeline {args.stage}"):
            summary = stages.run_stage(args.stage, cfg, options)
    except KeyboardInterrupt:
        print(f"\n{args.stage}: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except (ParamsError, StageError, FileNotFoundError, ValueError) as exc:
        print(f"error: {args.stage}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.stage}: {summary} [{time.monotonic() - started:.1f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
