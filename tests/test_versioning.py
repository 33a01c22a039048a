"""The flow's git record: each run commits exactly what it produced, nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_command

from flows import versioning


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC project with one stage whose metric is kept in git (cache: false)."""
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  score:\n    cmd: echo\n    metrics:\n      - reports/score.json:\n"
        "          cache: false\n"
    )
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "score.json").write_text('{"accuracy": 0.5}\n')
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "notes.txt").write_text("mine\n")
    for args in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "test@example.invalid"],
        ["git", "config", "user.name", "test"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "config", "core.autostage", "true"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "start"],
    ):
        run_command(args, tmp_path)
    return tmp_path


def _committed(project: Path) -> set[str]:
    shown = run_command(["git", "show", "--name-only", "--format=", "HEAD"], project).stdout
    return set(shown.split())


def test_a_run_commits_only_the_files_it_changed(project: Path) -> None:
    (project / "notes.txt").write_text("an edit of the user's, before the run\n")
    (project / "params.yaml").write_text("seed:   1   # reformatted by the user\n")
    before = versioning.snapshot(project)
    (project / "reports" / "score.json").write_text('{"accuracy": 0.9}\n')

    commit = versioning.git_commit_run(project, "run 1", before)

    assert commit is not None
    assert _committed(project) == {"reports/score.json"}
    status = run_command(["git", "status", "--porcelain"], project).stdout
    assert "notes.txt" in status and "params.yaml" in status  # still the user's, uncommitted


def test_a_run_that_changed_nothing_makes_no_commit(project: Path) -> None:
    (project / "notes.txt").write_text("unrelated edit\n")
    head = run_command(["git", "rev-parse", "HEAD"], project).stdout
    before = versioning.snapshot(project)

    commit = versioning.git_commit_run(project, "run 2", before)

    assert commit is None
    assert run_command(["git", "rev-parse", "HEAD"], project).stdout == head


def test_a_dvc_file_the_run_added_and_staged_is_committed(project: Path) -> None:
    before = versioning.snapshot(project)
    (project / "models" / "best").mkdir(parents=True)
    (project / "models" / "best" / "model.keras").write_bytes(b"weights")
    # Like the promotion step: `dvc add` with core.autostage stages models/best.dvc itself.
    run_command([sys.executable, "-m", "dvc", "add", "models/best"], project)

    versioning.git_commit_run(project, "promote", before)

    assert {"models/best.dvc", "models/.gitignore"} <= _committed(project)
    assert run_command(["git", "status", "--porcelain", "--", "models"], project).stdout == ""
