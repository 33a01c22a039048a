"""End to end: `dvc repro` on a copy of this repo with tiny params, like a user would run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("baseline", "transfer_features", "transfer_finetuned")

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tiny_params(source: Path) -> dict[str, Any]:
    """The shipped params with the demo shrunk to seconds: few images, 32 px, 1 epoch."""
    params = yaml.safe_load(source.read_text())
    params["crawl"]["max_images_per_class"] = 24
    params["train"]["image_size"] = 32
    params["train"]["batch_size"] = 16
    params["train"]["baseline"]["epochs"] = 1
    params["train"]["transfer"]["feature_epochs"] = 1
    params["train"]["transfer"]["fine_tune_epochs"] = 1
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git clone-alike of the project: tracked files only, tiny params committed."""
    repo = tmp_path_factory.mktemp("repo")
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        target = repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    (repo / "dvc.lock").unlink(missing_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(ROOT / "params.yaml")))
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "test@example.invalid"], repo)
    _run(["git", "config", "user.name", "test"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny demo"], repo)
    return repo


def test_dvc_repro_runs_every_stage_and_reports_both_models(repo: Path) -> None:
    _run(["dvc", "repro"], repo, timeout=900)

    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    for model in MODELS:
        assert 0.0 <= metrics[model]["accuracy"] <= 1.0
    assert (repo / "dvc.lock").exists()
    assert (repo / "reports" / "model_card.md").exists()


def test_second_repro_has_nothing_to_do(repo: Path) -> None:
    result = _run(["dvc", "repro"], repo)

    assert "Running stage" not in result.stdout
    assert "up to date" in result.stdout


def test_metrics_diff_shows_a_changed_param(repo: Path) -> None:
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["baseline"]["learning_rate"] = 0.01
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    repro = _run(["dvc", "repro"], repo, timeout=900)
    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], repo).stdout)
    params_diff = json.loads(_run(["dvc", "params", "diff", "--json"], repo).stdout)

    assert "Running stage 'train-baseline'" in repro.stdout
    assert "Running stage 'crawl'" not in repro.stdout
    changed = {key for path in diff.values() for key in path}
    assert any(key.startswith("baseline") for key in changed), diff
    assert params_diff["params.yaml"]["train.baseline.learning_rate"]["new"] == 0.01
