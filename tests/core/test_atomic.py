"""Atomic writes under faults: a kill between write and rename, an unwritable folder, and the
clean-up of what killed runs leave (never a live writer's file)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from faults import child_env, temp_files, unwritable

from speckv.atomic import STARTED, atomic_write, remove_stale_temps
from speckv.errors import OutputError, SpeckvError

#: a child that writes three files atomically (a kill may hit any of them).
WRITER = ("import sys; from pathlib import Path; from speckv.atomic import atomic_write\n"
          "for i in range(3):\n"
          "    atomic_write(Path(sys.argv[1]) / f'part-{i}.txt',"
          " lambda tmp, i=i: tmp.write_text(f'part {i}'))\n")


def _age(path, seconds: float = 60) -> None:
    """Make ``path`` look written ``seconds`` before this process began."""
    then = STARTED - seconds
    os.utime(path, (then, then))


def test_a_kill_before_the_rename_leaves_the_earlier_files_and_one_temporary_file(tmp_path):
    done = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)],
                          env=child_env(SPECKV_KILL_BEFORE_RENAME="part-*@2"), timeout=120)
    assert done.returncode == -9
    assert sorted(p.name for p in tmp_path.glob("part-*")) == ["part-0.txt"]
    left = temp_files(tmp_path)
    assert [p.name.split(".")[1] for p in left] == ["part-1"]  # .part-1.txt.XXXXXXXX.tmp
    assert left[0].read_text() == "part 1"  # complete, only not renamed

    # the next run's clean-up (a process started after the kill) removes it
    clean = subprocess.run([sys.executable, "-c", "import sys; from speckv.atomic import "
                            "remove_stale_temps as r; print(len(r(sys.argv[1])))",
                            str(tmp_path)], env=child_env(), capture_output=True, text=True,
                           timeout=120, check=True)
    assert clean.stdout.strip() == "1" and not temp_files(tmp_path)
    assert (tmp_path / "part-0.txt").read_text() == "part 0"


def test_clean_up_removes_only_orphans_of_the_pattern_older_than_this_process(tmp_path):
    orphan = tmp_path / ".r.parquet.ab12cd34.tmp"
    fresh = tmp_path / ".r.parquet.ef56gh78.tmp"  # written after this process began
    other_name = tmp_path / ".notes.md.ab12cd34.tmp"
    not_ours = [tmp_path / "r.parquet.ab12cd34.tmp", tmp_path / ".r.parquet.tmp",
                tmp_path / ".r.parquet.ab12cd34.tmp.bak", tmp_path / ".r.parquet.toolong123.tmp"]
    for path in (orphan, fresh, other_name, *not_ours):
        path.write_text("x")
    for path in (orphan, other_name, *not_ours):
        _age(path)
    assert remove_stale_temps(tmp_path, "*.parquet") == [orphan]
    assert all(p.exists() for p in (fresh, other_name, *not_ours))
    assert remove_stale_temps(tmp_path) == [other_name]  # every name
    assert remove_stale_temps(tmp_path / "missing") == []


def test_clean_up_never_removes_a_file_a_live_process_is_writing(tmp_path):
    """The writer holds a lock on its temporary file until the rename; an old file whose
    lock is held belongs to a live process (a slow writer that began before us)."""
    code = ("import sys, time; from pathlib import Path; from speckv.atomic import atomic_write\n"
            "def slow(tmp):\n"
            "    tmp.write_text('half'); print(tmp, flush=True); time.sleep(30)\n"
            "atomic_write(Path(sys.argv[1]) / 'big.bin', slow)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        tmp = tmp_path / os.path.basename(writer.stdout.readline().strip())
        assert tmp.exists()
        _age(tmp)  # as if it had been written before this process began
        assert remove_stale_temps(tmp_path) == []
        assert tmp.exists()
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert remove_stale_temps(tmp_path) == [tmp]  # its writer is gone now


def test_an_unwritable_folder_names_the_output_not_the_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "ro" / "x.onnx"
    out.parent.mkdir()
    out.write_text("previous")
    with unwritable(out.parent, monkeypatch), pytest.raises(OutputError) as err:
        atomic_write(out, lambda tmp: tmp.write_text("new"))
    message = str(err.value)
    assert str(out) in message and ".tmp" not in message
    assert "Permission denied" in message and "writable" in message
    assert isinstance(err.value, SpeckvError) and isinstance(err.value, OSError)
    assert out.read_text() == "previous" and not temp_files(tmp_path)


def test_a_failing_writer_leaves_nothing_and_keeps_its_own_error(tmp_path):
    out = tmp_path / "x.json"

    def broken(tmp):
        tmp.write_text("half")
        raise ValueError("checked and refused")

    with pytest.raises(ValueError, match="checked and refused"):
        atomic_write(out, broken)
    assert not out.exists() and not temp_files(tmp_path)

    def full_disk(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"No space left on device.*free space"):
        atomic_write(out, full_disk)
    assert not out.exists() and not temp_files(tmp_path)
