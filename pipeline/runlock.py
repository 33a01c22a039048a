"""One run at a time in a project, whatever starts it (flow serve, a worker, ``flows run``,
``dvc repro``, ``python -m pipeline <stage>``).

Consumes the project folder; produces ``.dvc/tmp/crawl2model-run.lock``, a lock file (``flock``)
that says who holds it (pid, what, since). A flow run holds it for the whole run; each stage
command holds it while it runs. Child processes of the holder (``dvc repro --single-item``
running ``python -m pipeline <stage>``) inherit the right to run through the
``CRAWL2MODEL_RUN_LOCK`` environment variable. DVC's own lock (``.dvc/tmp/lock``, held for a
whole ``dvc repro``) counts as busy too, so a flow never starts beside a manual ``dvc repro``.
The kernel drops an flock when its process dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pipeline.config import StageError

LOCK_NAME = Path(".dvc/tmp/crawl2model-run.lock")
DVC_LOCK = Path(".dvc/tmp/lock")
ENV = "CRAWL2MODEL_RUN_LOCK"


class ProjectBusy(StageError):
    """Another run holds the project; the message says who and for how long it was waited on."""


def _try_flock(fh: IO[str]) -> bool:
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def dvc_lock_held(root: Path) -> bool:
    """Whether a DVC process (e.g. a manual ``dvc repro``) holds the project's DVC lock."""
    path = root / DVC_LOCK
    if not path.exists():
        return False
    with open(path, "a+", encoding="utf-8") as fh:
        if _try_flock(fh):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            return False
    return True


def _holder(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return f"{data['what']} (pid {data['pid']}, since {data['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _owned_by_parent(path: Path) -> bool:
    token = os.environ.get(ENV)
    if not token:
        return False
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("token") == token
    except (OSError, ValueError, AttributeError):
        return False


def _acquire(root: Path, fh: IO[str], wait_s: float, poll_s: float, check_dvc: bool) -> None:
    """Wait (up to ``wait_s``) for our lock (and DVC's, with ``check_dvc``); raise ProjectBusy
    naming the holder."""
    deadline = time.monotonic() + wait_s
    while True:
        if _try_flock(fh):
            if not (check_dvc and dvc_lock_held(root)):
                return
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            holder = f"a DVC command (it holds {root / DVC_LOCK})"
        else:
            holder = _holder(root / LOCK_NAME)
        if time.monotonic() >= deadline:
            waited = f"waited {wait_s:g} s" if wait_s else "did not wait"
            raise ProjectBusy(
                f"{root}: another crawl2model run holds the project: {holder}; {waited}. "
                "One run at a time: rerun when it has finished (flow.when_busy, "
                "flow.busy_wait_s set what a flow does)"
            )
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


@contextlib.contextmanager
def run_lock(
    root: Path, what: str, wait_s: float = 0.0, poll_s: float = 1.0, check_dvc: bool = False
) -> Iterator[None]:
    """Hold the project for ``what`` (e.g. "flow run 2026-11-28 sandal+sneaker").

    ``check_dvc`` also waits for DVC's own lock: right for a flow run, wrong for a stage command,
    whose parent may be the ``dvc repro`` holding it.
    Inside a holder's child process (``CRAWL2MODEL_RUN_LOCK`` matches) this is a no-op. Outside a
    DVC project (no ``.dvc/``) there is nothing to share and nothing is locked. Raises
    ProjectBusy when the project stays busy for ``wait_s`` seconds.
    """
    root = Path(root)
    path = root / LOCK_NAME
    if not (root / ".dvc").is_dir() or _owned_by_parent(path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        _acquire(root, fh, wait_s, poll_s, check_dvc)
        token = secrets.token_hex(8)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"what": what, "pid": os.getpid(), "since": since, "token": token}))
        fh.flush()
        previous = os.environ.get(ENV)
        os.environ[ENV] = token
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
