"""Atomic writes: complete or absent, with the permissions open() would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.files import atomic_path, atomic_write_text


def test_atomic_write_gives_the_permissions_open_would(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        (tmp_path / "b.txt").write_text("x")
    finally:
        os.umask(previous)

    mode = stat.S_IMODE((tmp_path / "a.txt").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640


def test_importing_and_writing_leave_the_process_umask_alone(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        current = os.umask(0o077)
    finally:
        os.umask(previous)

    assert current == 0o077


def test_a_failed_write_leaves_no_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    assert list(tmp_path.iterdir()) == []
