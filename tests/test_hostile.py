"""A run folder from someone else (issue 19, shared/hostile-inputs.md): escapelab never
writes, appends or deletes through a link, never blocks on a FIFO and never reads a
file without bound; each such folder gets one line and a non-zero exit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import finished_and_interrupted
from escapelab.errors import RunDirError
from escapelab.store import append_jsonl, read_json, scan_jsonl

CLI = [sys.executable, "-m", "escapelab"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    finished_and_interrupted(root)
    return root


def _copy(runs, name, tmp_path):
    shutil.copytree(runs / name, tmp_path / name, symlinks=True)
    return tmp_path / name


def _one_line(args, timeout=60):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode != 0 and result.stderr.startswith("escapelab: error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_a_fifo_never_blocks(runs, tmp_path):
    run = _copy(runs, "finished", tmp_path)
    (run / "status.json").unlink()
    os.mkfifo(run / "status.json")
    assert "not a regular file" in _one_line(["status", run], timeout=30)
    assert "not a regular file" in _one_line(["report", run], timeout=60)
    with pytest.raises(RunDirError, match="not a regular file"):
        read_json(run / "status.json")
    lock = _copy(runs, "interrupted", tmp_path / "lock")
    (lock / ".lock").unlink(missing_ok=True)
    os.mkfifo(lock / ".lock")
    assert "not a regular file" in _one_line(["run", "--quiet", "--resume", lock], timeout=60)


def test_a_linked_lock_or_log_is_never_written_through(runs, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = _copy(runs, "interrupted", tmp_path)
    (run / ".lock").unlink(missing_ok=True)
    (run / ".lock").symlink_to(victim)
    assert "symbolic link" in _one_line(["run", "--quiet", "--resume", run])
    assert victim.read_text() == "precious"
    log = tmp_path / "log.jsonl"
    log.symlink_to(victim)
    with pytest.raises(RunDirError, match="symbolic link"):
        append_jsonl(log, [{"step": 1}])
    assert victim.read_text() == "precious"


def test_hostile_json_is_one_line(runs, tmp_path):
    run = _copy(runs, "finished", tmp_path)
    (run / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _one_line(["report", run])
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"step": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    records, damaged = scan_jsonl(deep)
    assert records == [{"step": 1}] and [n for n, _ in damaged] == [2]
    text = _copy(runs, "finished", tmp_path / "utf")
    with (text / "config.yaml").open("ab") as f:
        f.write(b"name: \xff\n")
    assert "not UTF-8" in _one_line(["report", text])
