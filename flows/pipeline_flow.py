"""The whole pipeline as one Prefect flow: crawl → clean → split → augment → train → evaluate.

Consumes the project directory it runs in (dvc.yaml, params.yaml, the stages in pipeline/) and
produces exactly what ``dvc repro`` produces, plus ``models/best/`` (promotion) and, in a git
repository, one commit per run. Nothing here decides what is stale or computes anything a stage
computes: DVC decides (see flows/versioning.py), the stage functions compute, and the flow adds
a schedule, retries, logs, fan-out and the run record.

- crawl: the crawl package's plan (``pipeline.crawl.plan``: discovery jobs, then fetch jobs per
  class × ``flow.crawl_host_shards`` host shards) mapped onto tasks with Prefect retries and
  exponential backoff; each job runs through the stage registry exactly as ``python -m pipeline
  crawl --discover/--shard I/N --class C`` would, then ``crawl --merge`` writes the one manifest
  and ``dvc commit crawl`` records it in dvc.lock. On a Dask cluster (``DaskTaskRunner``) the
  jobs run on the workers.
- every later stage: ``dvc repro --single-item <stage>`` when DVC says it is stale, no retries
  (they are deterministic: a retry would fail the same way); its one-line summary comes from the
  summary file the stage writes (``reports/summaries/<stage>.json``), never from its stdout.
- promotion into models/best/, then git commit of dvc.lock/params/metrics and ``dvc push``.

Prefect result caching stays off for every task (``NO_CACHE``): Prefect would cache on argument
values such as a path string, while DVC hashes file contents; two caches could disagree.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from flows import versioning
from flows.params import resolve_params, write_params
from flows.promote import Promotion, promote
from pipeline import paths, runlock, stages
from pipeline.config import (
    DEFAULT_PARAMS,
    FlowConfig,
    ParamsError,
    StageConfigs,
    StageError,
    load_params,
)
from pipeline.crawl import DiscoveryJob, FetchJob
from pipeline.crawl import plan as crawl_plan

BEST = paths.MODELS / "best"
NO_RESULT_CACHE: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


def run_name() -> str:
    """Flow-run name: the date and the classes, e.g. ``2026-11-23 sandal+sneaker+ankle_boot``."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters or {}
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    try:
        _, cfg = resolve_params(
            Path(parameters.get("params_file") or DEFAULT_PARAMS), parameters.get("overrides")
        )
    except (ParamsError, OSError):
        return f"{date} (invalid params)"
    names = cfg.class_names
    shown = "+".join(names) if len(names) <= 4 else "+".join(names[:3]) + f"+{len(names) - 3} more"
    fresh = " fresh-crawl" if parameters.get("force_crawl") else ""
    return f"{date} {shown}{fresh}"


# --------------------------------------------------------------------------------------------
# Tasks


@contextlib.contextmanager
def _in_project(root: Path) -> Iterator[None]:
    """Run in the project directory: params paths (demo/site, URL lists) are relative to it.

    Dask workers start elsewhere; in-process threads are already there and change nothing.
    """
    if Path.cwd().resolve() == root.resolve():
        yield
        return
    previous = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(previous)


def transient_only(task: Any, task_run: Any, state: State) -> bool:
    """Retry a crawl task unless it failed on bad input (StageError/ParamsError): those fail
    the same way every time, so retrying them only delays the error."""
    try:
        state.result(raise_on_failure=True)
    except (StageError, ParamsError):
        return False
    except Exception:
        return True
    return True


@task(name="crawl-step", retry_condition_fn=transient_only, **NO_RESULT_CACHE)
def crawl_step(root: str, job: DiscoveryJob | FetchJob) -> str:
    """One step of the crawl plan (discover a class, or fetch one class's host shard), run
    through the stage registry exactly as ``python -m pipeline crawl --discover/--shard`` runs
    it. Returns the step's one-line summary."""
    with _in_project(Path(root)):
        options = stages.crawl_job_options(job)
        summary = stages.run_stage("crawl", load_params(DEFAULT_PARAMS), options)
    text = f"{summary} candidate images" if isinstance(summary, int) else str(summary)
    get_run_logger().info(f"crawl {job}: {text}")
    return text


@task(name="crawl-merge", **NO_RESULT_CACHE)
def merge_crawl(root: str) -> str:
    """Merge the steps into data/raw/manifest.jsonl (``python -m pipeline crawl --merge``) and
    record the crawl stage in dvc.lock."""
    with _in_project(Path(root)):
        stages.run_stage(
            "crawl", load_params(DEFAULT_PARAMS), stages.StageOptions(crawl_step="merge")
        )
    versioning.commit_stage(Path(root), "crawl")
    summary = stages.read_summary(Path(root), "crawl") or "merged"
    get_run_logger().info(f"crawl: {summary}")
    return summary


@task(name="stage", **NO_RESULT_CACHE)
def stage_task(root: str, stage: str) -> versioning.StageRun:
    """One DVC stage, run only when DVC says it is stale; logs its one-line summary."""
    result = versioning.repro_stage(Path(root), stage)
    get_run_logger().info(str(result))
    return result


STAGES = stages.NAMES  # the registry's order is dvc.yaml's
STAGE_TASKS = {
    stage: stage_task.with_options(name=stage, task_run_name=stage) for stage in STAGES[1:]
}


@task(name="promote", **NO_RESULT_CACHE)
def promote_task(root: str, cfg: FlowConfig, name: str) -> Promotion:
    """Copy the run's model into models/best/ if the params rule allows; log the decision."""
    root_path = Path(root)
    decision = promote(
        cfg.promote,
        root_path / paths.MODEL_METRICS,
        root_path / paths.MODELS,
        root_path / BEST,
        name,
    )
    logger = get_run_logger()
    if decision.promoted:
        with versioning.open_repo(root_path) as repo:
            repo.add(str(root_path / BEST))  # models/best.dvc: git history of every best model
        logger.info(f"promotion: {decision}")
    else:
        logger.warning(f"promotion: {decision}")
    return decision


@task(name="record-run", **NO_RESULT_CACHE)
def record_run(
    root: str, cfg: FlowConfig, message: str, before: dict[str, str]
) -> tuple[str | None, bool]:
    """End the run: git commit of exactly what the run changed since ``before`` (dvc.lock,
    metrics, plots, promoted models' .dvc files); ``dvc push`` to the remote.

    Returns (commit hash or None, pushed).
    """
    root_path = Path(root)
    logger = get_run_logger()
    stale = versioning.pipeline_changes(root_path)
    if stale:
        logger.warning(f"DVC still reports changes after the run: {sorted(stale)}")
    commit = None
    if cfg.git_commit and versioning.in_git_repo(root_path):
        commit = versioning.git_commit_run(root_path, message, before)
        logger.info(f"git: committed {commit}" if commit else "git: nothing new to commit")
    pushed = False
    if cfg.dvc_push:
        remote = versioning.default_remote(root_path)
        if remote is None:
            logger.info("dvc push: no default remote configured (dvc remote add -d ...), skipped")
        else:
            count = versioning.dvc_push(root_path)
            pushed = True
            logger.info(f"dvc push: {count} files pushed to remote {remote!r}")
    return commit, pushed


# --------------------------------------------------------------------------------------------
# The flow


@dataclass
class FlowSummary:
    """What one flow run did; ``str()`` is its one-line summary."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stage_lines: list[str] = field(default_factory=list)
    promotion: Promotion | None = None
    commit: str | None = None
    pushed: bool = False
    elapsed_s: float = 0.0
    busy: str | None = None  # set when the run was skipped: another run held the project

    def __str__(self) -> str:
        if self.busy is not None:
            return f"skipped: {self.busy} [{self.elapsed_s:.1f}s]"
        parts = [
            f"ran {', '.join(self.ran) or 'nothing'}",
            f"skipped {len(self.skipped)} unchanged",
        ]
        if self.promotion is not None:
            parts.append(str(self.promotion))
        if self.commit:
            parts.append(f"git commit {self.commit}")
        if self.pushed:
            parts.append("dvc pushed")
        return "; ".join(parts) + f" [{self.elapsed_s:.1f}s]"


def _crawl(root: Path, cfg: StageConfigs, force: bool, summary: FlowSummary) -> None:
    logger = get_run_logger()
    if not force and not versioning.stage_changes(root, "crawl"):
        summary.skipped.append("crawl")
        summary.stage_lines.append("crawl: unchanged, skipped (DVC: up to date)")
        logger.info("crawl: unchanged, skipped (DVC: up to date)")
        return
    retry = {
        "retries": cfg.flow.crawl_retries,
        # Doubling waits (like urllib3's Retry): a site that is down for minutes gets time.
        "retry_delay_seconds": [
            cfg.flow.crawl_retry_backoff_s * 2**attempt for attempt in range(cfg.flow.crawl_retries)
        ],
        "retry_jitter_factor": 0.5 if cfg.flow.crawl_retry_backoff_s else None,
    }
    # The plan (which classes and host shards, and which step walks the sources again on a
    # forced crawl) is the crawl package's; the flow only maps it onto tasks, wave by wave.
    plan = crawl_plan(cfg.class_names, cfg.flow.crawl_host_shards, refresh=force)
    for wave in (plan.discovery, plan.fetch):
        if not wave:
            continue
        futures = crawl_step.with_options(**retry).map(unmapped(str(root)), list(wave))
        wait(list(futures))
        for future in futures:
            future.result()  # the first failed step fails the flow, after its retries
    summary.stage_lines.append("crawl: " + merge_crawl(str(root)))
    summary.ran.append("crawl")


@flow(
    name="crawl2model",
    flow_run_name=run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=4),
    persist_result=False,
)
def crawl2model(
    params_file: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    force_crawl: bool = False,
    until: str | None = None,
) -> FlowSummary:
    """Run the pipeline in the current directory (the project root), like ``dvc repro``.

    params_file: the parameters to run with (copied over params.yaml if it is another file).
    overrides: dotted keys to change for this run, e.g. {"train.baseline.epochs": 2}.
    force_crawl: crawl again even if DVC says the crawl is up to date (scheduled runs do).
    until: stop after this stage (e.g. "crawl").

    Returns a FlowSummary. Raises ParamsError/StageError naming the key, file or stage.
    """
    started = time.monotonic()
    logger = get_run_logger()
    root = Path.cwd()
    if not (root / "dvc.yaml").exists():
        raise StageError(f"{root}: no dvc.yaml here; run the flow from the project root")
    if until is not None and until not in STAGES:
        raise ParamsError(f"until: {until!r} is not a stage ({', '.join(STAGES)})")
    _, checked = resolve_params(Path(params_file), overrides)  # bad params fail before waiting
    from prefect.runtime import flow_run

    name = flow_run.name or run_name()
    wait_s = checked.flow.busy_wait_s if checked.flow.when_busy == "wait" else 0.0
    try:
        with runlock.run_lock(root, f"flow run {name}", wait_s=wait_s, check_dvc=True):
            summary = _run_stages(root, params_file, overrides, force_crawl, until, name)
    except runlock.ProjectBusy as busy:
        if checked.flow.when_busy == "wait":
            raise
        logger.warning(f"crawl2model: skipped this run (flow.when_busy: skip): {busy}")
        return FlowSummary(busy=str(busy), elapsed_s=time.monotonic() - started)
    summary.elapsed_s = time.monotonic() - started
    logger.info(f"crawl2model: {summary}")
    return summary


def _run_stages(
    root: Path,
    params_file: str,
    overrides: dict[str, Any] | None,
    force_crawl: bool,
    until: str | None,
    name: str,
) -> FlowSummary:
    """The run itself, while it holds the project: params, stages, promotion, git record."""
    # What git keeps, before this run touches anything: the run commits only what differs.
    before = versioning.snapshot(root) if versioning.in_git_repo(root) else {}
    cfg = write_params(root, Path(params_file), overrides)
    last = STAGES.index(until) if until else len(STAGES) - 1
    summary = FlowSummary()

    _crawl(root, cfg, force_crawl, summary)
    for stage in STAGES[1 : last + 1]:
        result = STAGE_TASKS[stage](str(root), stage)
        (summary.ran if result.ran else summary.skipped).append(stage)
        summary.stage_lines.append(str(result))

    if last == len(STAGES) - 1:
        summary.promotion = promote_task(str(root), cfg.flow, name)
    message = f"crawl2model run {name}: ran {', '.join(summary.ran) or 'nothing'}"
    if summary.promotion is not None:
        message += f"\n\n{summary.promotion}"
    summary.commit, summary.pushed = record_run(str(root), cfg.flow, message, before)
    return summary


def with_dask(pipeline_flow: Any, address: str | None = None, workers: int = 0) -> Any:
    """The flow with its mapped crawl tasks on Dask: an existing cluster at ``address``
    (``tcp://host:8786``) or a LocalCluster of ``workers`` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(
            cluster_kwargs={"n_workers": max(workers, 1), "threads_per_worker": 1}
        )
    return pipeline_flow.with_options(task_runner=runner)
