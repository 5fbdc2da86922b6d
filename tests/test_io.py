"""fastmask.io.atomic_write_bytes: whole files only, ordinary permissions, no temporary left behind."""

import os
import stat
from pathlib import Path

import pytest

from fastmask.util.files import atomic_write_bytes


def test_writes_bytes_with_the_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "sub" / "a.bin", b"abc")
    finally:
        os.umask(old)
    path = tmp_path / "sub" / "a.bin"
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    atomic_write_bytes(path, b"xyz")  # replaces
    assert path.read_bytes() == b"xyz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.bin"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
