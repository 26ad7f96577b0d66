"""Atomic writes: complete file or old file, never a torn one; ordinary permissions."""
import os

import pytest

from sft.files import read_json, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_whole_file_with_umask_permissions(tmp_path):
    path = tmp_path / "sub" / "manifest.json"
    write_json_atomic(path, {"status": "running"})
    write_json_atomic(path, {"status": "finished"})
    assert read_json(path) == {"status": "finished"}
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_current_umask()
    assert [p.name for p in path.parent.iterdir()] == ["manifest.json"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "old: 1\n")
    with pytest.raises(TypeError):
        write_text_atomic(path, None)
    assert path.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
