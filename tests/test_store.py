"""What survives what: each test is one row of the README's table.

Runs are tiny (synthetic 8x8 images, a two-block convnet), so a few hundred steps take
a few seconds; the processes that get killed are real subprocesses of the CLI.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from conftest import interrupt_at, tiny_overrides
from escapelab.config import load_config
from escapelab.errors import RunDirError, RunInterrupted
from escapelab.store import RunDir, RunDirWarning, RunLock, read_jsonl
from escapelab.train import resume, train

CLI = [sys.executable, "-m", "escapelab"]


def _run(*args, timeout=300, **kwargs):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _start(out, *overrides):
    """A CLI run in the background (its own process group, like a batch job)."""
    return subprocess.Popen([*CLI, "run", "--quiet", "--out", str(out), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(out, predicate, timeout=120):
    path = out / "status.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            status = None
        if status is not None and predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on {path}")


def _strip(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("escapelab: error:")]


def _same_run(a, b, skip_steps=()):
    """Bitwise-identical final weights and identical records (but wall times)."""
    ta, _ = RunDir(a).load_checkpoint("S")
    tb, _ = RunDir(b).load_checkpoint("S")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    steps_a = [r for r in read_jsonl(a / "metrics/steps.jsonl") if r["step"] not in skip_steps]
    steps_b = [r for r in read_jsonl(b / "metrics/steps.jsonl") if r["step"] not in skip_steps]
    assert steps_a == steps_b and len(steps_a) > 10
    assert _strip(read_jsonl(a / "metrics/evals.jsonl")) == \
        _strip(read_jsonl(b / "metrics/evals.jsonl"))
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert {k: v for k, v in sa.items() if k != "wall_s"} == \
        {k: v for k, v in sb.items() if k != "wall_s"}


LONG = {"train.steps": 400, "checkpoint.every": 20, "optim.lr": 3e4, "probe.every": 100}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(load_config("digits", tiny_overrides(**LONG)), out)
    return out


# -- two writers -----------------------------------------------------------------------------


def test_the_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirError, match=rf"being written by PID {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    assert RunLock.holder(tmp_path)["pid"] == os.getpid()
    first.release()
    assert RunLock.holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()
    # A holder killed with SIGKILL leaves its lock file but not its lock.
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from escapelab.store import RunLock; "
        f"RunLock(Path({str(tmp_path)!r})).acquire(); print('held', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    assert RunLock.holder(tmp_path)["pid"] == child.pid
    child.kill()
    child.wait()
    assert RunLock.holder(tmp_path) is None
    RunLock(tmp_path).acquire().release()


def test_two_concurrent_writers_are_refused_with_a_clear_line(tmp_path, reference):
    out = tmp_path / "run"
    proc = _start(out, *tiny_overrides(**{**LONG, "train.steps": 100000}))
    try:
        _wait_for(out, lambda s: s["status"] == "running" and s.get("step", 0) >= 40)
        for args in (["run", "--resume", str(out)],
                     ["run", "--out", str(out), "--overwrite", *tiny_overrides(seed=1)],
                     ["run", "--out", str(out), *tiny_overrides()]):
            second = _run(*args)
            assert second.returncode == 2, second.stderr
            lines = _error_lines(second.stderr)
            assert len(lines) == 1 and f"PID {proc.pid}" in lines[0], second.stderr
            assert "being written by" in lines[0] and "Traceback" not in second.stderr
        status = _run("status", str(out))
        assert status.returncode == 1 and "running" in status.stdout
        assert f"PID {proc.pid}" in status.stdout
        # SIGTERM (Slurm pre-emption): exit 143 and a resumable folder.
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    state = RunDir(out).status()
    assert state.status == "interrupted" and state.resumable
    assert not (out / "summary.json").exists()
    # Only one seed's records, each step once.
    steps = [r["step"] for r in read_jsonl(out / "metrics/steps.jsonl")]
    assert steps == list(range(1, len(steps) + 1))
    assert "interrupted" in _run("status", str(out)).stdout


# -- kill -9 and resume --------------------------------------------------------------------------


def test_kill_9_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, reference):
    at = random.Random().randint(25, 330)
    out = tmp_path / "run"
    proc = _start(out, *tiny_overrides(**LONG))
    try:
        _wait_for(out, lambda s: (s["status"] == "running" and s.get("step", 0) >= at)
                  or s["status"] in ("completed", "diverged"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    if (out / "summary.json").exists():
        pytest.skip(f"the run finished before the kill at step {at}")
    state = RunDir(out).status()
    assert state.status == "running"  # what a dead run leaves behind ...
    told = _run("status", str(out))
    assert told.returncode == 1 and "dead" in told.stdout, told.stdout  # ... is seen through
    resumed = _run("run", "--quiet", "--resume", str(out))
    assert resumed.returncode == 0, (at, resumed.stderr)
    _same_run(out, reference)


def test_a_checkpoint_is_written_on_time_as_well_as_on_steps(tiny_config, tmp_path,
                                                               monkeypatch):
    import escapelab.train as training

    clock = [0.0]

    def monotonic():
        clock[0] += 1.0  # one "second" per call: minutes pass within a few steps
        return clock[0]

    monkeypatch.setattr(training.time, "monotonic", monotonic)
    saved = []
    original = training._save_resumable

    def spy(rec, s, state, *args):
        saved.append(state.step)
        return original(rec, s, state, *args)

    monkeypatch.setattr(training, "_save_resumable", spy)
    cfg = tiny_config(**{"checkpoint.every": 0, "checkpoint.every_minutes": 0.1})
    train(cfg, tmp_path / "r")  # 60 steps; a save whenever 6 "seconds" passed
    assert len(saved) >= 5 and saved == sorted(saved)
    assert max(b - a for a, b in zip([0, *saved], saved, strict=False)) <= 7
    saved.clear()
    train(tiny_config(**{"checkpoint.every": 0, "checkpoint.every_minutes": 0}),
          tmp_path / "off")
    assert saved == []


# -- resume proves it continues the same run ------------------------------------------------------


def _interrupted(tmp_path, at=40, **extra):
    cfg = load_config("digits", tiny_overrides(**LONG, **extra))

    interrupt = interrupt_at(at)

    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted) as caught:
        train(cfg, out, progress=interrupt)
    assert caught.value.exit_code == 130
    return out


def test_an_edited_config_is_refused_on_resume(tmp_path):
    out = _interrupted(tmp_path)
    path = out / "config.yaml"
    original = path.read_text()
    path.write_text(original.replace("lr: 30000.0", "lr: 100.0"))
    with pytest.raises(RunDirError, match=r"was edited since the run started \(optim\.lr: "
                                          r"30000\.0 -> 100\.0\)"):
        resume(out)
    cli = _run("run", "--resume", str(out))
    assert cli.returncode == 2 and len(_error_lines(cli.stderr)) == 1
    assert "optim.lr" in cli.stderr
    path.write_text(original)  # restored: the run continues
    assert resume(out).status == "completed"


def test_a_run_started_before_a_config_key_existed_still_resumes(tmp_path, reference):
    """An escapelab upgrade that adds a config key (at a default that keeps the old
    behaviour) must not strand interrupted runs: their config.yaml lacks the key, its
    text still has the digest recorded at the start, and resume finishes them exactly."""
    out = _interrupted(tmp_path)
    path = out / "config.yaml"
    text = path.read_text()
    assert "  channels_last: false\n" in text
    older = text.replace("  channels_last: false\n", "")  # as the version before wrote it
    path.write_text(older)
    derived = json.loads((out / "derived.json").read_text())
    derived["config_sha256"] = hashlib.sha256(older.encode()).hexdigest()
    (out / "derived.json").write_text(json.dumps(derived))
    assert resume(out).status == "completed"
    _same_run(out, reference)
    # An edit of such a file is still refused.
    other = _interrupted(tmp_path / "b")
    other_text = (other / "config.yaml").read_text().replace("  channels_last: false\n", "")
    derived = json.loads((other / "derived.json").read_text())
    derived["config_sha256"] = hashlib.sha256(other_text.encode()).hexdigest()
    (other / "derived.json").write_text(json.dumps(derived))
    (other / "config.yaml").write_text(other_text.replace("lr: 30000.0", "lr: 100.0"))
    with pytest.raises(RunDirError, match="was edited since the run started"):
        resume(other)


def test_a_corrupt_middle_line_is_reported_and_no_valid_record_is_lost(tmp_path, reference):
    out = _interrupted(tmp_path)
    steps_file = out / "metrics/steps.jsonl"
    lines = steps_file.read_text().splitlines(keepends=True)
    lines[16] = '{"step": 17, "lr": 3' + "\x00garbage\n"  # line 17 of 40
    steps_file.write_text("".join(lines))
    with pytest.warns(RunDirWarning, match=r"steps\.jsonl: 1 damaged line\(s\) skipped "
                                           r"\(line 17\)"):
        records = read_jsonl(steps_file)
    assert [r["step"] for r in records] == [s for s in range(1, 41) if s != 17]
    with pytest.warns(RunDirWarning, match=r"line 17\) moved to steps\.jsonl\.damaged"):
        resume(out)
    assert "garbage" in (out / "metrics/steps.jsonl.damaged").read_text()
    # Every valid record survived: all steps but the damaged one, identical to the
    # uninterrupted run's.
    _same_run(out, reference, skip_steps={17})
    assert [r["step"] for r in read_jsonl(steps_file)] == [s for s in range(1, 401)
                                                           if s != 17]


def test_a_torn_last_line_is_ignored_quietly(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_records_are_fsynced_before_the_checkpoint_that_counts_them(tmp_path, monkeypatch):
    import escapelab.store as store

    events = []
    real_fsync = os.fsync

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", fsync)
    out = _interrupted(tmp_path, at=25)
    _, meta = RunDir(out).load_checkpoint("last")
    assert meta["records"]["steps"] == 25 == len(read_jsonl(out / "metrics/steps.jsonl"))
    names = [os.path.basename(p) for _, p in events]
    last_ckpt = max(i for i, n in enumerate(names) if ".last.safetensors" in n)
    last_steps = max(i for i, n in enumerate(names[:last_ckpt]) if n == "steps.jsonl")
    assert last_steps < last_ckpt


# -- signals --------------------------------------------------------------------------------------


def test_sigterm_during_start_up_exits_143_and_says_so(tmp_path, monkeypatch):
    import escapelab.train as training

    real_build = training.build

    def slow_build(cfg, data=None):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the data are being loaded
        return real_build(cfg, data)

    monkeypatch.setattr(training, "build", slow_build)
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted) as caught:
        train(load_config("digits", tiny_overrides()), out)
    assert caught.value.exit_code == 143
    state = RunDir(out).status()
    assert state.status == "interrupted" and not state.resumable
    assert "during start-up" in state.reason and not (out / "summary.json").exists()
    told = _run("status", str(out))
    assert "interrupted" in told.stdout and "not resumable" in told.stdout
    again = _run("run", "--out", str(out), *tiny_overrides())
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _run("run", "--quiet", "--out", str(out), "--overwrite",
                *tiny_overrides()).returncode == 0


def test_sigterm_during_start_up_of_the_cli(tmp_path):
    """A real process: a large synthetic data set keeps the start-up busy for a while."""
    out = tmp_path / "run"
    proc = _start(out, *tiny_overrides(**{"data.synthetic.n_train": 1_500_000}))
    try:
        _wait_for(out, lambda s: s["status"] == "starting")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    state = RunDir(out).status()
    assert state.status == "interrupted" and "during start-up" in state.reason


def test_a_signal_during_the_last_step_is_not_swallowed(tiny_config, tmp_path, reference):
    cfg = load_config("digits", tiny_overrides(**LONG))

    def interrupt(step, total, info):
        if step == total:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "cut"
    with pytest.raises(RunInterrupted) as caught:
        train(cfg, out, progress=interrupt)
    assert caught.value.exit_code == 143
    assert RunDir(out).status().status == "interrupted" and not RunDir(out).finished
    resume(out)  # only the write-up is left
    _same_run(out, reference)


# -- a full disk --------------------------------------------------------------------------------


def test_a_full_disk_ends_with_one_line_and_an_honest_status(tmp_path, reference, monkeypatch):
    import escapelab.store as store

    real = store.append_jsonl
    calls = [0]

    def append(path, records):
        calls[0] += 1
        if calls[0] > 12:  # the disk fills up somewhere in the middle of the run
            with store.writing(path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, records)

    monkeypatch.setattr(store, "append_jsonl", append)
    out = tmp_path / "run"
    with pytest.raises(RunDirError) as caught:
        train(load_config("digits", tiny_overrides(**LONG)), out)
    message = str(caught.value)
    assert "No space left on device" in message and "\n" not in message
    state = RunDir(out).status()
    assert state.status == "failed" and "No space left" in state.reason
    assert not (out / "summary.json").exists()
    assert state.resumable == RunDir(out).has_checkpoint("last")
    monkeypatch.setattr(store, "append_jsonl", real)  # space freed: nothing was lost
    if state.resumable:
        resume(out)
        _same_run(out, reference)


def test_a_real_full_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the simulated ENOSPC test "
                    "covers the same path")
    try:
        filler = mount / "filler"
        free = shutil.disk_usage(mount).free
        filler.write_bytes(b"\0" * max(0, free - 90_000))
        result = _run("run", "--quiet", "--out", str(mount / "run"),
                      *tiny_overrides(**LONG))
        assert result.returncode == 2, result.stderr
        lines = _error_lines(result.stderr)
        assert len(lines) == 1 and "No space left on device" in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert not (mount / "run" / "summary.json").exists()
        told = _run("status", str(mount / "run"))
        assert told.returncode == 1 and "completed" not in told.stdout
        assert "failed" in told.stdout or "dead" in told.stdout
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


# -- small things -----------------------------------------------------------------------------


def test_one_step_run_and_its_report(tmp_path):
    out = tmp_path / "one"
    result = _run("run", "--quiet", "--out", str(out), "train.steps=1")
    assert result.returncode == 0, result.stderr
    assert "report:" in result.stdout and (out / "report.html").exists()
    again = _run("report", str(out))
    assert again.returncode == 0, again.stderr


def test_files_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["sh", "-c", f"umask 022 && exec {sys.executable} -m escapelab "
                             f"run --quiet --out {out} " + " ".join(tiny_overrides())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "summary.json", "status.json", "metrics/steps.jsonl",
                 "checkpoints/S.safetensors", "checkpoints/S.json", "report.html"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_report_removes_figures_it_no_longer_draws(tmp_path):
    out = tmp_path / "run"
    assert _run("run", "--quiet", "--out", str(out), *tiny_overrides()).returncode == 0
    stale = out / "figures" / "fig2a_erank.png"  # as if an earlier report had drawn it
    stale.write_bytes(b"old")
    manifest = out / "figures" / "manifest.json"
    manifest.write_text(json.dumps([*json.loads(manifest.read_text()), stale.name]))
    mine = out / "figures" / "fig2b_dead.png"  # the user's, not in the manifest: kept
    mine.write_bytes(b"mine")
    result = _run("report", str(out))
    assert result.returncode == 0 and "fig2a_erank" not in result.stdout
    assert not stale.exists() and mine.read_bytes() == b"mine"
