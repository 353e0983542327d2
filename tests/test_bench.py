"""The benchmark scripts that tests can afford: the GPU script at tiny sizes on the CPU
(it must not rot between the rare sessions that have a GPU), the sweep benchmark's
bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench"


def test_gpu_script_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu.json").read_text())
    parts = ("matmul", "tf32", "paper_steps", "group", "probe", "analyze")
    assert all("error" not in result[p] for p in parts), [result[p].get("error") for p in parts]
    assert all(result[p]["card"] == "cpu (no GPU)" for p in parts)
    tf32 = result["tf32"]
    assert tf32["off"]["environment"]["cudnn_allow_tf32"] is False
    assert tf32["on"]["environment"]["cudnn_allow_tf32"] is True
    # CPUs have no TF32: the first step is the same either way, and the offset survives
    assert tf32["on"]["loss_step_1"] == tf32["off"]["loss_step_1"] > 0
    steps = result["paper_steps"]
    # VGG11 narrowed 8x on 3x32x32 (+ Linear(64, 512)): multiply-adds per image, counted
    # here layer by layer; a step is the teacher's and the student's forward, the
    # student's weight gradients and its input gradients (none for the first conv).
    macs, channels, size, first = [], 3, 32, None
    for item in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:
        if item == "M":
            size //= 2
            continue
        width = item // 8
        macs.append(width * channels * 9 * size * size)
        first = macs[0] if first is None else first
        channels = width
    forward = sum(macs) + channels * 512
    assert steps["flops_per_step"] == 2 * 256 * (4 * forward - first)
    # at --quick sizes the time of 4 steps is within start-up noise: no timing asserted
    assert all(steps[k]["seconds_per_step"] is None or steps[k]["fraction_of_matmul"] > 0
               for k in ("default", "channels_last"))
    group = result["group"]
    assert [a == b for a, b in group["escape_steps_alone_vs_group"]] == [True] * 6
    analyze = result["analyze"]
    assert analyze["taps"] == 23 and analyze["checkpoints"] == ["S", "T"]
    # where analyze's time goes, also written as it goes (a time-out on the GPU keeps it)
    stages = analyze["stages_s"]
    assert set(stages) == {"features", "singular_values", "fisher", "kmeans", "cka", "probe"}
    assert 0 < sum(stages.values()) <= analyze["seconds"]
    progress = json.loads((tmp_path / "analyze_progress.json").read_text())
    assert [c for c, _, _ in progress["taps"]] == ["T"] * 23 + ["S"] * 23


def test_gpu_study_script_runs_every_part_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_study.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu_study.json").read_text())
    assert all("error" not in result[p] for p in ("flagship", "group_vgg")), result
    flagship = result["flagship"]
    assert flagship["card"] == "cpu (no GPU)" and flagship["steps"] == 120
    assert flagship["summary"]["status"] == "completed"
    # VGG11 on 1x32x32 (Fashion-MNIST padded): every tap analysed at T, C and S
    analysis = json.loads((tmp_path / "flagship_run" / "analysis.json").read_text())
    assert flagship["analyze_taps"] == len(analysis["layers"]) == 23
    assert set(analysis["checkpoints"]) == {"T", "C", "S"} and analysis["samples"] == 500
    sharpness = (tmp_path / "flagship_run" / "metrics" / "sharpness.jsonl").read_text()
    assert len(sharpness.splitlines()) > 2
    assert (tmp_path / "flagship_run" / "report.html").exists()
    ids = {c["id"] for c in flagship["claims"]}
    assert {"signal-collapse-single-digit", "sep-student-discriminant"} <= ids
    assert "step-small-stays" not in ids  # one run answers no step-size trend
    group = result["group_vgg"]
    assert group["runs"] == 3 and group["steps"] == 10
