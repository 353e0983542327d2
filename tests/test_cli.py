"""The command line end to end, in subprocesses, on tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import tiny_overrides

CLI = [sys.executable, "-m", "escapelab"]


def _run(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_run_end_to_end_on_tiny_data(tmp_path):
    out = tmp_path / "run"
    result = _run("run", "--out", str(out), *tiny_overrides())
    assert result.returncode == 0, result.stderr
    assert f"run directory: {out}" in result.stdout
    assert "probe accuracy" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert f"{100 * summary['final_probe_acc']:.2f}%" in result.stdout
    assert f"report: {out / 'report.html'}" in result.stdout
    assert (out / "figures" / "fig1_probe.png").exists()
    again = _run("run", "--out", str(out), *tiny_overrides())
    assert again.returncode == 2 and "already holds a run" in again.stderr


def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path):
    out = tmp_path / "bad"
    for args, needle in [
        (["data.batchsize=3"], "unknown key 'data.batchsize'"),
        (["optim.lr=-5"], "optim.lr"),
        (["loss.name=huber"], "'nmse'"),
        (["data.name=cifar10", "data.root=" + str(tmp_path / "none"), "data.download=false"],
         "cifar-10-python.tar.gz"),
    ]:
        result = _run("run", "--out", str(out), *args)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not out.exists()
    result = _run("run", "--preset", "nope")
    assert result.returncode == 2 and "cifar10-vgg11" in result.stderr


def test_help_gives_the_papers_values():
    main = _run("--help")
    assert main.returncode == 0 and "1e4" in main.stdout and "N-MSE" in main.stdout
    run = _run("run", "--help")
    assert "eta" in run.stdout and "key=value" in run.stdout
    keys = _run("config", "--keys")
    assert "optim.lr" in keys.stdout and "paper" in keys.stdout
    config = _run("config", "optim.lr=1e4")
    assert "lr: 10000.0" in config.stdout
    presets = _run("presets")
    assert "cifar10-vgg11" in presets.stdout and "vgg11 on cifar10" in presets.stdout


def test_ctrl_c_leaves_a_resumable_run_that_does_not_look_complete(tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(**{"train.steps": 3000, "checkpoint.every": 50})
    proc = subprocess.Popen([*CLI, "run", "--quiet", "--out", str(out), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = out / "status.json"
    deadline = time.time() + 600
    while time.time() < deadline:
        state = json.loads(status.read_text()) if status.exists() else {}
        if state.get("status") == "running" and state.get("step", 0) >= 50:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        raise AssertionError("the run did not reach step 50")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not (out / "summary.json").exists()
    assert json.loads(status.read_text())["status"] == "interrupted"
    resumed = _run("run", "--quiet", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_completed"] == 3000
    steps = [json.loads(line) for line in (out / "metrics/steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 3001))
    assert os.path.exists(out / "checkpoints/S.safetensors")
