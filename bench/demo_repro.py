"""Issue 3's numbers: the demo's `dvc repro` from a fresh clone, the no-op rerun, bad params.

Clones this repo (committed files only, as a user would get it) into a temp dir, then times:
  1. `dvc repro` of the whole demo pipeline       — limit 600 s on 2 CPU cores
  2. an immediate second `dvc repro` (nothing to do) — limit 5 s; ratio against run 1
  3. `python -m pipeline crawl` with a bad params key — limit 2 s
Each is printed as a ratio against its limit (< 1.0 passes) and the script exits 1 if any fails.

    python bench/demo_repro.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="clone into this dir and keep it")
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="crawl2model-bench-"))
    clone = workdir / "clone"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)

    full_s, full = timed(["dvc", "repro"], clone)
    if full.returncode != 0:
        print(full.stdout[-3000:], full.stderr[-3000:], sep="\n")
        return 1
    noop_s, noop = timed(["dvc", "repro"], clone)

    bad = yaml.safe_load((clone / "params.yaml").read_text())
    bad["train"]["baseline"]["epochs"] = -1
    (workdir / "bad-params.yaml").write_text(yaml.safe_dump(bad))
    bad_s, bad_run = timed(
        [sys.executable, "-m", "pipeline", "crawl", "--params", str(workdir / "bad-params.yaml")],
        clone,
    )

    rows = [
        ("demo dvc repro (fresh clone)", full_s, 600.0, full.returncode == 0),
        ("second dvc repro (no-op)", noop_s, 5.0, "Running stage" not in noop.stdout),
        ("bad params rejected", bad_s, 2.0, bad_run.returncode == 2),
    ]
    print(f"{'measurement':32} {'seconds':>9} {'limit':>7} {'ratio':>7}  ok")
    ok = True
    for name, seconds, limit, behaved in rows:
        passed = behaved and seconds < limit
        ok &= passed
        verdict = "yes" if passed else "NO"
        print(f"{name:32} {seconds:9.2f} {limit:7.0f} {seconds / limit:7.3f}  {verdict}")
    print(f"no-op rerun / full run = {noop_s / full_s:.4f}")
    for metrics in sorted((clone / "reports" / "metrics" / "models").glob("*.json")):
        print(f"{metrics.stem}: {metrics.read_text().strip()}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
