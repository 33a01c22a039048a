"""One run at a time per project: the run lock, and the flow CLI's clear start-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.runlock import ENV, ProjectBusy, run_lock

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.runlock import run_lock
    with run_lock(Path(sys.argv[1]), "flow run nightly"):
        print("held", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def held(project: Path):  # type: ignore[no-untyped-def]
    """Another process holding the project, as a scheduled flow run would."""
    env = {k: v for k, v in os.environ.items() if k != ENV}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(project)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait(timeout=10)


def test_a_second_run_is_refused_at_once_naming_the_holder(project: Path, held: object) -> None:
    started = time.monotonic()
    with pytest.raises(ProjectBusy, match=r"flow run nightly \(pid \d+"), run_lock(project, "me"):
        pass

    assert time.monotonic() - started < 2


def test_a_waiting_run_gives_up_after_its_bound_saying_what_it_waited_for(
    project: Path, held: object
) -> None:
    started = time.monotonic()
    with (
        pytest.raises(ProjectBusy, match=r"waited 1 s"),
        run_lock(project, "me", wait_s=1, poll_s=0.2),
    ):
        pass

    assert 1 <= time.monotonic() - started < 5


def test_the_lock_is_free_again_when_its_holder_is_killed(
    project: Path, held: subprocess.Popen
) -> None:  # type: ignore[type-arg]
    held.kill()
    held.wait(timeout=10)

    with run_lock(project, "next run"):
        pass


def test_a_stage_command_is_refused_while_a_flow_run_holds_the_project(
    project: Path, held: object
) -> None:
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != ENV}

    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "split"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )

    assert result.returncode == 1
    assert "another crawl2model run holds the project: flow run nightly" in result.stderr


def test_the_holders_own_child_commands_run_through(project: Path) -> None:
    with run_lock(project, "flow run"):
        child = subprocess.run(
            [sys.executable, "-c", HOLDER.replace("time.sleep(60)", "pass"), str(project)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert child.stdout.strip() == "held"


def test_a_flow_does_not_start_beside_a_dvc_command(project: Path) -> None:
    import zc.lockfile

    dvc_lock = zc.lockfile.LockFile(str(project / ".dvc" / "tmp" / "lock"))
    try:
        with (
            pytest.raises(ProjectBusy, match="a DVC command"),
            run_lock(project, "flow run", check_dvc=True),
        ):
            pass
    finally:
        dvc_lock.close()


def test_flow_cli_says_clearly_when_prefects_temporary_server_does_not_start(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0",
    )

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows",
            "run",
            "--until",
            "crawl",
            "--params",
            str(ROOT / "params.yaml"),
        ],
        cwd=tmp_path,  # no project here: nothing could be written even if the server started
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )

    assert result.returncode == 1
    assert "temporary server did not answer within 0 s" in result.stderr
    assert "Traceback" not in result.stderr
