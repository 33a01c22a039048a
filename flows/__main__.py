"""Command line for the Prefect flow: ``python -m flows run`` and ``python -m flows serve``.

No logic lives here: it parses arguments and calls the flow in flows/pipeline_flow.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from flows.params import resolve_params
from pipeline.config import DEFAULT_PARAMS, FlowConfig, ParamsError, StageError
from pipeline.stages import NAMES as STAGES


def parse_override(text: str) -> tuple[str, Any]:
    """``train.baseline.epochs=2`` -> ("train.baseline.epochs", 2); values are YAML, like
    ``dvc exp run -S``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        help="parameters file; another file replaces params.yaml for the run "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter, written into params.yaml (repeatable)",
    )
    dask = parser.add_mutually_exclusive_group()
    dask.add_argument(
        "--dask-address",
        help="run the crawl shards on this Dask scheduler, e.g. tcp://10.0.0.5:8786 "
        "(default: params flow.dask_address, else threads in this process)",
    )
    dask.add_argument(
        "--dask-workers",
        type=int,
        default=0,
        metavar="N",
        help="run the crawl shards on a local Dask cluster of N worker processes",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows",
        description="crawl2model as a Prefect flow: the same stages as `dvc repro`, with "
        "retries, logs, a schedule and crawl fan-out. Run it from the project root.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the pipeline once (no server needed: Prefect starts a temporary one)",
        description="Run the pipeline once. Without PREFECT_API_URL, Prefect starts a temporary "
        "local server for the run; with `prefect server start` running, the run shows in its UI.",
    )
    _add_common(run)
    run.add_argument(
        "--force-crawl", action="store_true", help="crawl again even if DVC says it is up to date"
    )
    run.add_argument(
        "--until", choices=STAGES, metavar="STAGE", help="stop after this stage, e.g. crawl"
    )
    serve = sub.add_parser(
        "serve",
        help="serve the flow on a cron schedule until stopped (Ctrl-C)",
        description="Create the deployment and run it on its schedule until stopped. Scheduled "
        "runs force a fresh crawl; DVC skips later stages whose inputs did not change.",
    )
    _add_common(serve)
    serve.add_argument("--cron", help="cron schedule (default: params flow.cron)")
    serve.add_argument("--name", help="deployment name (default: params flow.deployment_name)")
    return parser


# Prefect's default (20 s) for its temporary server to answer is too short on a busy 2-core
# machine; a user's own setting wins.
EPHEMERAL_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_STARTUP_S = 180


def _ephemeral_timeout(exc: BaseException) -> str | None:
    """A clear message for Prefect's "temporary server did not start" error, else None."""
    if "ephemeral Prefect API server" not in str(exc):
        return None
    waited = os.environ.get(EPHEMERAL_STARTUP_ENV, str(EPHEMERAL_STARTUP_S))
    return (
        f"Prefect's temporary server did not answer within {waited} s "
        f"({EPHEMERAL_STARTUP_ENV}). On a busy machine raise that, or start a server once with "
        "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
    )


def _serve(
    pipeline_flow: Any, args: argparse.Namespace, flow_cfg: FlowConfig, parameters: dict[str, Any]
) -> int:
    """Serve the flow on its cron schedule until stopped; needs a Prefect server."""
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print(
            "error: serve needs a Prefect server for its scheduler: run `prefect server "
            "start` in another terminal, then `prefect config set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api`",
            file=sys.stderr,
        )
        return 2
    cron = args.cron or flow_cfg.cron
    pipeline_flow.serve(
        name=args.name or flow_cfg.deployment_name,
        # Only the scheduled runs force a fresh crawl; a manual "Run" in the UI does not.
        schedules=[Cron(cron, timezone=flow_cfg.timezone, parameters={"force_crawl": True})],
        parameters=parameters,
        pause_on_shutdown=False,
        limit=1,  # one run at a time from this server (the run lock covers every other way)
        description="crawl2model: crawl, clean, split, augment, train, evaluate (DVC-backed)",
        tags=["crawl2model"],
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault(EPHEMERAL_STARTUP_ENV, str(EPHEMERAL_STARTUP_S))
    overrides = dict(args.overrides)
    try:
        _, cfg = resolve_params(args.params, overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Prefect takes seconds to import: only after the params are known to be good.
    from flows.pipeline_flow import crawl2model, with_dask

    address = args.dask_address or cfg.flow.dask_address
    pipeline_flow = crawl2model
    if address or args.dask_workers:
        pipeline_flow = with_dask(crawl2model, address=address, workers=args.dask_workers)
    parameters: dict[str, Any] = {"params_file": str(args.params), "overrides": overrides or None}

    if args.command == "serve":
        return _serve(pipeline_flow, args, cfg.flow, parameters)

    try:
        summary = pipeline_flow(**parameters, force_crawl=args.force_crawl, until=args.until)
    except KeyboardInterrupt:
        print("\nflow: interrupted; rerun to resume (DVC skips what is done)", file=sys.stderr)
        return 130
    except (ParamsError, StageError) as exc:
        print(f"error: flow: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        message = _ephemeral_timeout(exc)
        if message is None:
            raise
        print(f"error: flow: {message}", file=sys.stderr)
        return 1
    print(f"flow: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
