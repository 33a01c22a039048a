"""Shared test helpers: running a command the way a user would, and the tiny demo params."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_command(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in ``cwd`` with this interpreter's ``python``/``dvc`` first on PATH; fail
    the test with its output when it exits non-zero."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def tiny_params(images_per_class: int = 16) -> dict[str, Any]:
    """The shipped params shrunk to seconds: few images, 32 px, 1 epoch, instant retries."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["crawl"]["max_images_per_class"] = images_per_class
    # so few images would fail the crawl's and clean's minimum per class (params error)
    params["crawl"]["min_images_per_class"] = 1
    params["clean"]["min_images_per_class"] = 1
    params["train"]["fit"]["image_size"] = 32
    params["train"]["fit"]["batch_size"] = 16
    params["train"]["baseline"]["epochs"] = 1
    params["train"]["transfer"]["feature_epochs"] = 1
    params["train"]["transfer"]["fine_tune_epochs"] = 1
    params.setdefault("flow", {}).update(crawl_retries=2, crawl_retry_backoff_s=0)
    return params


def copy_tracked(dest: Path) -> Path:
    """Copy the files git tracks in this repo into ``dest`` — what a fresh clone holds — less
    ``dvc.lock``, so DVC runs every stage there. Returns ``dest``."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest


# Headless Debian chromium on this kind of machine: root needs --no-sandbox, and with no network
# the background fetches would only fail (and slow every start).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
