"""How long a flow run takes when nothing changed, against `dvc repro` doing nothing.

Claim (README, "Schedule it"): a scheduled run with nothing new finishes in seconds, because each
stage task asks DVC in-process whether the stage is stale and starts a `dvc repro --single-item`
subprocess only when it is. This bench builds a tiny copy of the project, runs the pipeline once
(setup, not timed), then times with nothing changed:

  A. `dvc repro`                                   (baseline: DVC alone, one process)
  B. seven `dvc repro --single-item <stage>`       (the naive "one subprocess per task" design)
  C. the flow's check: in-process DVC status of the seven stages (flows.versioning)
  D. the whole Prefect flow run (`crawl2model()`, temporary Prefect server already up)

and prints B/C (what the in-process check saves) and D/A (the flow's cost over plain DVC).

    python bench/flow_noop.py                 # tiny demo: setup ~2-5 min on 2 cores
    python bench/flow_noop.py --project DIR   # an existing, already-reproduced project
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from clone_like import copy_tracked  # bench/clone_like.py, beside this script

from pipeline import stages

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = stages.NAMES


def sh(args: list[str], cwd: Path) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    started = time.perf_counter()
    subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def tiny_project(where: Path) -> Path:
    copy_tracked(where)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["crawl"]["max_images_per_class"] = 16
    params["crawl"]["min_images_per_class"] = 1
    params["clean"]["min_images_per_class"] = 1
    params["train"]["fit"].update(image_size=32, batch_size=16)
    params["train"]["baseline"]["epochs"] = 1
    params["train"]["transfer"].update(feature_epochs=1, fine_tune_epochs=1)
    (where / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "init", "-q"], where)
    sh(["git", "config", "user.email", "bench@example.invalid"], where)
    sh(["git", "config", "user.name", "bench"], where)
    sh(["git", "add", "-A"], where)
    sh(["git", "commit", "-qm", "bench"], where)
    return where


def best_of(repeats: int, measure: Callable[[], float]) -> float:
    return min(measure() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, help="existing project (default: a tiny demo)")
    parser.add_argument("--repeats", type=int, default=3, help="take the best of N (default 3)")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    with tempfile.TemporaryDirectory(prefix="flow-noop-") as tmp:
        project = args.project or tiny_project(Path(tmp))
        print(f"project: {project}; setup `dvc repro` (not timed) ...", flush=True)
        setup = sh([sys.executable, "-m", "dvc", "repro"], project)
        print(f"setup took {setup:.0f}s", flush=True)

        from prefect.testing.utilities import prefect_test_harness

        from flows import versioning
        from flows.pipeline_flow import crawl2model

        a = best_of(args.repeats, lambda: sh([sys.executable, "-m", "dvc", "repro"], project))
        b = best_of(
            args.repeats,
            lambda: sum(
                sh([sys.executable, "-m", "dvc", "repro", "--single-item", s], project)
                for s in STAGES
            ),
        )

        def in_process() -> float:
            started = time.perf_counter()
            stale = [s for s in STAGES if versioning.stage_changes(project, s)]
            assert not stale, f"stages unexpectedly stale: {stale}"
            return time.perf_counter() - started

        in_process()  # the first call pays DVC's import, once per flow run
        c = best_of(args.repeats, in_process)
        with prefect_test_harness(server_startup_timeout=240), contextlib.chdir(project):
            # git_commit/dvc_push stay as in params: with nothing new there is nothing to commit.
            crawl2model()  # warm: Prefect's first run in a process registers the flow

            def flow_run() -> float:
                started = time.perf_counter()
                summary = crawl2model()
                assert summary.ran == [], summary
                return time.perf_counter() - started

            d = best_of(args.repeats, flow_run)

    print(f"A  dvc repro, nothing to do:              {a:6.2f} s")
    print(f"B  7 x dvc repro --single-item:           {b:6.2f} s")
    print(f"C  7 x in-process DVC status (the flow):  {c:6.2f} s")
    print(f"D  whole Prefect flow run, nothing to do: {d:6.2f} s")
    print(f"ratio B/C (subprocess per stage vs in-process check): {b / c:.1f}x")
    print(f"ratio D/A (no-change flow run vs no-op dvc repro):    {d / a:.1f}x")


if __name__ == "__main__":
    main()
