"""The Prefect flow (flows/): promotion rule, params handling, and real flow runs on the tiny demo
under ``prefect_test_harness`` (a temporary Prefect server and database)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

# Prefect keeps its profile and local storage under PREFECT_HOME: never the user's ~/.prefect.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="crawl2model-prefect-"))

from conftest import copy_tracked, run_command, tiny_params

from flows import pipeline_flow
from flows.params import resolve_params, write_params
from flows.promote import promote
from pipeline.config import ParamsError, PromotionConfig, StageError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("baseline", "transfer_features", "transfer_finetuned")
TRAINING = ("train-baseline", "train-transfer")


# --------------------------------------------------------------------------------------------
# Helpers


def make_project(where: Path) -> Path:
    """A fresh git + DVC project like a clone of this repo, with tiny params committed."""
    where.mkdir(parents=True, exist_ok=True)
    copy_tracked(where)
    (where / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    run_command(["git", "init", "-q"], where)
    run_command(["git", "config", "user.email", "test@example.invalid"], where)
    run_command(["git", "config", "user.name", "test"], where)
    if not (where / ".dvc" / "config").exists():
        run_command([sys.executable, "-m", "dvc", "init", "-q"], where)
    run_command(["git", "add", "-A"], where)
    run_command(["git", "commit", "-qm", "tiny demo"], where)
    return where


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    # The temporary server starts in a subprocess; on 2 busy cores that can take a minute.
    with prefect_test_harness(server_startup_timeout=240):
        yield


def run_flow(project: Path, **parameters: Any) -> pipeline_flow.FlowSummary:
    with contextlib.chdir(project):
        return pipeline_flow.crawl2model(**parameters)


def write_metrics(metrics_dir: Path, accuracy: float) -> Path:
    """Evaluate's layout: one file per model in reports/metrics/models/."""
    metrics_dir.mkdir(parents=True, exist_ok=True)
    (metrics_dir / "transfer_finetuned.json").write_text(json.dumps({"accuracy": accuracy}))
    return metrics_dir


def write_model(models: Path, content: bytes) -> None:
    models.mkdir(parents=True, exist_ok=True)
    (models / "transfer_finetuned.keras").write_bytes(content)
    (models / "transfer_finetuned.json").write_text(json.dumps({"class_names": ["a", "b"]}))


# --------------------------------------------------------------------------------------------
# Promotion


def test_promotion_keeps_old_model_when_new_one_is_worse(tmp_path: Path) -> None:
    rule = PromotionConfig(max_drop=0.01)
    write_model(tmp_path / "models", b"old model")
    promote(rule, write_metrics(tmp_path / "m1", 0.90), tmp_path / "models", tmp_path / "best")
    write_model(tmp_path / "models", b"new model")

    decision = promote(
        rule, write_metrics(tmp_path / "m2", 0.85), tmp_path / "models", tmp_path / "best"
    )

    assert not decision.promoted
    assert "worse than the best 0.9000" in str(decision)
    assert (tmp_path / "best" / "model.keras").read_bytes() == b"old model"
    assert json.loads((tmp_path / "best" / "best.json").read_text())["value"] == 0.90


def test_promotion_replaces_best_when_drop_is_within_max_drop(tmp_path: Path) -> None:
    rule = PromotionConfig(max_drop=0.05)
    write_model(tmp_path / "models", b"old model")
    promote(rule, write_metrics(tmp_path / "m1", 0.90), tmp_path / "models", tmp_path / "best")
    write_model(tmp_path / "models", b"new model")

    decision = promote(
        rule, write_metrics(tmp_path / "m2", 0.88), tmp_path / "models", tmp_path / "best"
    )

    assert decision.promoted
    assert (tmp_path / "best" / "model.keras").read_bytes() == b"new model"
    assert json.loads((tmp_path / "best" / "best.json").read_text())["previous_value"] == 0.90


def test_promotion_of_a_loss_keeps_best_when_new_loss_is_higher(tmp_path: Path) -> None:
    rule = PromotionConfig(metric="log_loss", higher_is_better=False)
    models, best = tmp_path / "models", tmp_path / "best"
    write_model(models, b"old model")
    for run, loss in (("m1", 0.3), ("m2", 0.4)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "transfer_finetuned.json").write_text(json.dumps({"log_loss": loss}))
    promote(rule, tmp_path / "m1", models, best)
    write_model(models, b"new model")

    decision = promote(rule, tmp_path / "m2", models, best)

    assert not decision.promoted
    assert (best / "model.keras").read_bytes() == b"old model"


def test_promotion_names_the_missing_metric_key(tmp_path: Path) -> None:
    write_model(tmp_path / "models", b"model")
    metrics = write_metrics(tmp_path / "metrics", 0.9)

    with pytest.raises(StageError, match=r"transfer_finetuned\.macro_avg\.f1 not found"):
        promote(
            PromotionConfig(metric="macro_avg.f1"), metrics, tmp_path / "models", tmp_path / "b"
        )


# --------------------------------------------------------------------------------------------
# Parameters


def test_bad_override_fails_naming_the_key_before_any_work(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params()))

    with pytest.raises(ParamsError, match=r"train\.baseline\.epochs"):
        resolve_params(params, {"train.baseline.epochs": -1})


def test_override_is_written_into_params_yaml_keeping_comments(tmp_path: Path) -> None:
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")

    cfg = write_params(tmp_path, tmp_path / "params.yaml", {"train.baseline.epochs": 2})

    text = (tmp_path / "params.yaml").read_text()
    assert cfg.train.baseline.epochs == 2
    assert yaml.safe_load(text)["train"]["baseline"]["epochs"] == 2
    assert "# Global random seed" in text


# --------------------------------------------------------------------------------------------
# Real flow runs on the tiny demo


@pytest.fixture(scope="module")
def flow_project(
    tmp_path_factory: pytest.TempPathFactory, prefect_server: None
) -> tuple[Path, pipeline_flow.FlowSummary, Path]:
    """One full flow run on a fresh tiny project with a local DVC remote."""
    project = make_project(tmp_path_factory.mktemp("flow") / "project")
    remote = tmp_path_factory.mktemp("dvc-remote")
    run_command([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(remote)], project)
    run_command(["git", "commit", "-qam", "remote"], project)
    summary = run_flow(project)
    return project, summary, remote


@pytest.mark.slow
def test_flow_runs_every_stage_and_evaluates_every_model(
    flow_project: tuple[Path, pipeline_flow.FlowSummary, Path],
) -> None:
    project, summary, _ = flow_project

    scored = {p.stem for p in (project / "reports" / "metrics" / "models").glob("*.json")}

    assert summary.ran == list(pipeline_flow.STAGES)
    assert set(MODELS) <= scored


@pytest.mark.slow
def test_flow_leaves_dvc_lock_exactly_as_dvc_repro_would(
    flow_project: tuple[Path, pipeline_flow.FlowSummary, Path],
) -> None:
    project, _, _ = flow_project
    lock_after_flow = (project / "dvc.lock").read_bytes()

    repro = run_command([sys.executable, "-m", "dvc", "repro"], project)

    assert "Running stage" not in repro.stdout
    assert (project / "dvc.lock").read_bytes() == lock_after_flow
    assert set(yaml.safe_load(lock_after_flow)["stages"]) == set(pipeline_flow.STAGES)


@pytest.mark.slow
def test_flow_run_is_committed_to_git_and_pushed_to_the_dvc_remote(
    flow_project: tuple[Path, pipeline_flow.FlowSummary, Path],
) -> None:
    project, summary, remote = flow_project

    log = run_command(["git", "log", "-1", "--format=%s"], project).stdout
    dirty = run_command(
        ["git", "status", "--porcelain", "--", "dvc.lock", "reports"], project
    ).stdout

    assert summary.commit and log.startswith("crawl2model run ")
    assert dirty == ""
    assert summary.pushed and any(p.is_file() for p in remote.rglob("*"))


@pytest.mark.slow
def test_first_run_promotes_its_model_into_models_best(
    flow_project: tuple[Path, pipeline_flow.FlowSummary, Path],
) -> None:
    project, summary, _ = flow_project

    record = json.loads((project / "models" / "best" / "best.json").read_text())

    assert summary.promotion is not None and summary.promotion.promoted
    assert record["model"] == "transfer_finetuned"
    assert (project / "models" / "best.dvc").exists()


@pytest.mark.slow
def test_second_run_with_nothing_changed_skips_training(
    flow_project: tuple[Path, pipeline_flow.FlowSummary, Path],
) -> None:
    project, _, _ = flow_project
    model = project / "models" / "baseline.keras"
    modified = model.stat().st_mtime_ns

    summary = run_flow(project)

    assert summary.ran == []
    assert set(TRAINING) <= set(summary.skipped)
    assert model.stat().st_mtime_ns == modified
    assert summary.promotion is not None and not summary.promotion.promoted


# --------------------------------------------------------------------------------------------
# Crawl: retries and fan-out


def test_crawl_task_failing_twice_then_succeeding_is_retried(
    tmp_path: Path, prefect_server: None
) -> None:
    project = make_project(tmp_path / "project")
    # A real fault: data/raw/.state is a file, so the crawl cannot write its state (as on a full
    # or unmounted disk). The task's on_running hook clears it before the third attempt.
    blocker = project / "data" / "raw" / ".state"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    attempts: Counter[str] = Counter()

    def before_attempt(task: Any, task_run: Any, state: Any) -> None:
        attempts[task_run.name] += 1
        if attempts[task_run.name] == 3:
            blocker.unlink(missing_ok=True)

    pipeline_flow.crawl_step.on_running_hooks.append(before_attempt)
    try:
        run_flow(project, until="crawl", overrides={"classes": tiny_params()["classes"][:2]})
    finally:
        pipeline_flow.crawl_step.on_running_hooks.remove(before_attempt)

    assert max(attempts.values()) == 3  # failed twice, succeeded on the second retry
    rows = (project / "data" / "raw" / "manifest.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 16


def test_crawl_task_failing_on_bad_input_is_not_retried(
    tmp_path: Path, prefect_server: None
) -> None:
    project = make_project(tmp_path / "project")
    attempts: list[str] = []

    def before_attempt(task: Any, task_run: Any, state: Any) -> None:
        attempts.append(task_run.name)

    pipeline_flow.crawl_step.on_running_hooks.append(before_attempt)
    try:
        with pytest.raises(StageError, match=r"crawl\.serve_demo_site"):
            run_flow(project, until="crawl", overrides={"crawl.serve_demo_site": "no/such/dir"})
    finally:
        pipeline_flow.crawl_step.on_running_hooks.remove(before_attempt)

    assert len(attempts) == len(tiny_params()["classes"])  # one attempt per class, no retries


def _manifest_without_fetch_times(project: Path) -> list[dict[str, Any]]:
    rows = [
        json.loads(line) for line in (project / "data/raw/manifest.jsonl").read_text().splitlines()
    ]
    return sorted(
        ({k: v for k, v in row.items() if k != "fetched_at"} for row in rows),
        key=lambda row: (row["class"], row["sha256"]),
    )


@pytest.mark.slow
def test_dask_fan_out_writes_the_same_manifest_as_a_single_process_crawl(
    tmp_path: Path, prefect_server: None
) -> None:
    pytest.importorskip("prefect_dask")
    single = make_project(tmp_path / "single")
    fanned = make_project(tmp_path / "fanned")
    overrides = {"flow.crawl_host_shards": 2}
    run_command([sys.executable, "-m", "pipeline", "crawl"], single)

    dask_flow = pipeline_flow.with_dask(pipeline_flow.crawl2model, workers=2)
    with contextlib.chdir(fanned):
        dask_flow(until="crawl", overrides=overrides)

    assert _manifest_without_fetch_times(fanned) == _manifest_without_fetch_times(single)
    assert len(list((fanned / "data/raw/.state").glob("fetch-*host*.jsonl"))) > 1
