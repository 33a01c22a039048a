"""What the bench scripts that run the whole pipeline start from: the files git tracks in this
repo — what a fresh clone holds — copied into a scratch folder, less ``dvc.lock``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def copy_tracked(dest: Path) -> Path:
    """Copy every tracked file into ``dest`` (created if missing); DVC then runs every stage
    there. Returns ``dest``."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    (dest / "dvc.lock").unlink(missing_ok=True)
    return dest
