"""End to end: `dvc repro` on a copy of this repo with tiny params, like a user would run it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import copy_tracked, run_command, tiny_params

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("baseline", "transfer_features", "transfer_finetuned")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git clone-alike of the project: tracked files only, tiny params committed."""
    repo = copy_tracked(tmp_path_factory.mktemp("repo"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(images_per_class=24)))
    run_command(["git", "init", "-q"], repo)
    run_command(["git", "config", "user.email", "test@example.invalid"], repo)
    run_command(["git", "config", "user.name", "test"], repo)
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "tiny demo"], repo)
    return repo


def test_dvc_repro_runs_every_stage_and_reports_both_models(repo: Path) -> None:
    run_command(["dvc", "repro"], repo, timeout=900)

    for model in MODELS:
        metrics = json.loads((repo / "reports/metrics/models" / f"{model}.json").read_text())
        predictions = (repo / "reports/predictions" / f"{model}.csv").read_text().splitlines()
        rows = [line.split(",") for line in predictions[1:]]
        header = predictions[0].split(",")
        actual, predicted = header.index("actual"), header.index("predicted")
        right = sum(row[actual] == row[predicted] for row in rows)
        # The reported accuracy is the share of test predictions that are right.
        assert metrics["accuracy"] == pytest.approx(right / len(rows))
    assert (repo / "dvc.lock").exists()
    assert (repo / "reports" / "model_card.md").exists()


def test_second_repro_has_nothing_to_do(repo: Path) -> None:
    result = run_command(["dvc", "repro"], repo)

    assert "Running stage" not in result.stdout
    assert "up to date" in result.stdout


def test_metrics_diff_shows_a_changed_param(repo: Path) -> None:
    run_command(["git", "add", "-A"], repo)
    run_command(["git", "commit", "-qm", "first run"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["baseline"]["learning_rate"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    repro = run_command(["dvc", "repro"], repo, timeout=900)
    diff = json.loads(run_command(["dvc", "metrics", "diff", "--json"], repo).stdout)
    params_diff = json.loads(run_command(["dvc", "params", "diff", "--json"], repo).stdout)

    assert "Running stage 'train-baseline'" in repro.stdout
    assert "Running stage 'crawl'" not in repro.stdout
    changed = {path for path, keys in diff.items() if keys}
    assert any("baseline" in path for path in changed), diff
    assert params_diff["params.yaml"]["train.baseline.learning_rate"]["new"] == 0.01
