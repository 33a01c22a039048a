"""DVC and git for the flow: run a stage the way `dvc repro` does, and record each run.

DVC is the one cache of truth: it decides whether a stage is stale (content hashes of deps,
params and outs against dvc.lock) and writes dvc.lock. Prefect only orders, retries and logs.

How a stage runs (measured in bench/flow_noop.py): an in-process ``dvc status <stage>`` first;
only a stale (or forced) stage pays for a ``dvc repro --single-item <stage>`` subprocess, which
runs the stage's own dvc.yaml command, records dvc.lock and streams the stage's progress. A run
with nothing changed therefore imports DVC once instead of starting seven DVC processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import stages
from pipeline.config import StageError

TAIL_LINES = 40


@dataclass(frozen=True)
class StageRun:
    """One stage task's outcome; ``str()`` is the line the flow logs."""

    stage: str
    ran: bool
    summary: str
    elapsed_s: float

    def __str__(self) -> str:
        return f"{self.stage}: {self.summary}"


@contextlib.contextmanager
def open_repo(root: Path) -> Iterator[Any]:
    """DVC's Repo for ``root``; raises StageError when ``root`` is not a DVC project."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    # DVC resolves some output paths against the working directory, as its CLI runs in the
    # project: do the same (a no-op in the flow, which runs there).
    with contextlib.chdir(root):
        try:
            repo = Repo(str(root))
        except NotDvcRepoError:
            raise StageError(f"{root}: not a DVC project (run `dvc init` there)") from None
        try:
            yield repo
        finally:
            repo.close()


def stage_changes(root: Path, stage: str) -> list[Any]:
    """Return what DVC says changed for ``stage`` (empty when it is up to date)."""
    with open_repo(root) as repo:
        status = repo.status(targets=[stage])
    return [change for changes in status.values() for change in changes]


def pipeline_changes(root: Path) -> dict[str, Any]:
    """Return ``dvc status`` for the whole pipeline (empty when everything is up to date)."""
    with open_repo(root) as repo:
        return repo.status()


def commit_stage(root: Path, stage: str) -> None:
    """Record ``stage``'s current deps, params and outs in dvc.lock (``dvc commit -f <stage>``)."""
    with open_repo(root) as repo:
        repo.commit(stage, force=True)


def _dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    # The stage commands are `python -m pipeline ...`: make `python` this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def repro_stage(root: Path, stage: str, force: bool = False, echo: bool = True) -> StageRun:
    """Bring ``stage`` up to date through DVC, like ``dvc repro --single-item <stage>``.

    Skips the subprocess when DVC reports no change (and ``force`` is false). The stage's own
    output streams to stdout when ``echo``; its one-line summary is read from the summary file
    the stage wrote (``reports/summaries/<stage>.json``, see pipeline/stages.py). Raises
    StageError with the output's last lines when the stage fails.
    """
    started = time.monotonic()
    if not force and not stage_changes(root, stage):
        return StageRun(stage, False, "unchanged, skipped (DVC: up to date)", 0.0)
    args = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    if force:
        args.append("--force")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(
        args,
        cwd=root,
        env=_dvc_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            # Progress bars redraw with \r: the last segment is what a terminal would show.
            shown = line.rstrip("\n").split("\r")[-1]
            tail.append(shown)
    if process.returncode != 0:
        output = "\n".join(tail)
        raise StageError(
            f"dvc repro --single-item {stage} failed ({process.returncode}):\n{output}"
        )
    # Also right when DVC restored the outputs from its run cache instead of running the
    # command: the summary file is one of the stage's outputs.
    summary = stages.read_summary(root, stage) or "done"
    return StageRun(stage, True, summary, time.monotonic() - started)


def _git(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=check)


def in_git_repo(root: Path) -> bool:
    try:
        result = _git(root, "rev-parse", "--show-toplevel", check=False)
    except FileNotFoundError:  # no git installed
        return False
    return result.returncode == 0 and Path(result.stdout.strip()).resolve() == root.resolve()


def _record_candidates(root: Path) -> list[Path]:
    """Files a run may change that git (not the DVC cache) keeps: dvc.lock, params.yaml, the
    ``cache: false`` outs (metrics, plots, reports; folders expanded), every ``*.dvc`` file and
    the .gitignore files DVC writes beside them."""
    with open_repo(root) as repo:
        git_kept = [Path(out.fs_path) for out in repo.index.outs if not out.use_cache]
    found: list[Path] = [root / "dvc.lock", root / "params.yaml"]
    for path in git_kept:
        found += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    # Tracked or new (not ignored) *.dvc and .gitignore files; git skips ignored folders such
    # as .venv and the DVC-tracked data.
    listed = _git(
        root,
        "ls-files",
        "-z",
        "--cached",
        "--others",
        "--exclude-standard",
        "--",
        "*.dvc",
        "*.gitignore",
    ).stdout
    found += [root / name for name in filter(None, listed.split("\0"))]
    return found


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file a run may commit (see ``_record_candidates``), by relative path.

    Taken before and after a run, the difference is exactly what the run produced."""
    root = root.resolve()
    digests: dict[str, str] = {}
    for path in _record_candidates(root):
        if path.is_file():
            digests[path.relative_to(root).as_posix()] = hashlib.sha256(
                path.read_bytes()
            ).hexdigest()
    return digests


def run_record_paths(root: Path, before: dict[str, str]) -> list[str]:
    """What this run produced: the record files whose content changed since ``before``.

    params.yaml counts when the run wrote it (overrides) or when dvc.lock changed and params.yaml
    differs from HEAD: the lock file records the params it ran with, so they belong together.
    """
    after = snapshot(root)
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    if "dvc.lock" in changed and "params.yaml" not in changed:
        differs = _git(root, "diff", "--quiet", "HEAD", "--", "params.yaml", check=False)
        if differs.returncode != 0:
            changed.append("params.yaml")
    return changed


def git_commit_run(root: Path, message: str, before: dict[str, str]) -> str | None:
    """Commit exactly what the run produced (see run_record_paths), nothing the user changed or
    staged before it. Returns the new commit's short hash, or None when the run changed nothing.
    Raises StageError when git refuses (e.g. no user.email configured)."""
    paths = run_record_paths(root, before)
    if not paths:
        return None
    # -A also records files the run deleted; the pathspec limits it to the run's files.
    _git(root, "add", "-A", "--", *paths)
    staged = _git(root, "diff", "--cached", "--quiet", "--", *paths, check=False)
    if staged.returncode == 0:
        return None
    result = _git(root, "commit", "-q", "-m", message, "--", *paths, check=False)
    if result.returncode != 0:
        raise StageError(f"git commit in {root} failed: {result.stderr.strip() or result.stdout}")
    return _git(root, "rev-parse", "--short", "HEAD").stdout.strip()


def default_remote(root: Path) -> str | None:
    """The DVC default remote's name (``dvc remote add -d``), or None."""
    with open_repo(root) as repo:
        return repo.config.get("core", {}).get("remote") or None


def dvc_push(root: Path) -> int:
    """``dvc push`` to the default remote; returns how many files were pushed."""
    with open_repo(root) as repo:
        return int(repo.push())
