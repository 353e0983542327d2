from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_overrides
from escapelab.config import load_config
from escapelab.errors import ConfigError
from escapelab.sweep import (
    SCALES,
    SweepSpec,
    expand,
    load_spec,
    parse_grid,
    phase,
    run_sweep,
    sweep_preset_names,
)


def _tiny(**extra):
    return {o.split("=", 1)[0]: o.split("=", 1)[1] for o in tiny_overrides(**extra)}


def test_grid_expansion_labels_and_stable_hashes():
    spec = SweepSpec(name="t", base="digits", overrides={"train.steps": 10},
                     grid={"optim.lr": [1e2, 1e4],
                           "schedule": [{"label": "const", "schedule.name": "constant"},
                                        {"schedule.name": "linear_warmup",
                                         "schedule.warmup_steps": 5}],
                           "seed": [0, 1]})
    points = expand(spec)
    assert len(points) == 8
    assert points[0].label == "lr=100_schedule=const_seed=0"
    assert points[3].label == "lr=100_schedule=name=linear_warmup,warmup_steps=5_seed=1"
    assert points[3].config.schedule.warmup_steps == 5 and points[3].config.seed == 1
    assert points[0].config.train.steps == 10
    assert [p.dirname for p in points] == [p.dirname for p in expand(spec)]
    assert len({p.key for p in points}) == 8
    with pytest.raises(ConfigError, match="sweep point lr=-1"):
        expand(SweepSpec(name="t", base="digits", grid={"optim.lr": [-1]}))


def test_presets_expand_at_both_scales():
    assert set(sweep_preset_names()) >= {"step-size", "batch-size", "loss-warmup"}
    steps = expand(load_spec("step-size"))
    assert len(steps) == 18 and {p.config.optim.lr for p in steps} == {
        1e2, 1e3, 3e3, 1e4, 3e4, 1e5}
    batch = expand(load_spec("batch-size"))
    assert {p.config.data.batch_size for p in batch} == {16, 64, 256, "full"}
    assert all(p.config.optim.lr == 1e4 for p in batch)
    warm = expand(load_spec("loss-warmup"))
    assert {(p.config.loss.name, p.config.schedule.name) for p in warm} >= {
        ("mse", "constant"), ("ndmse", "linear_warmup"), ("nmse", "constant")}
    for name in ("step-size", "batch-size", "loss-warmup"):
        paper = expand(load_spec(name, scale="paper"))
        assert all(p.config.data.name == "cifar10" and p.config.model.name == "vgg11"
                   for p in paper)
    full = [p for p in expand(load_spec("batch-size", "paper"))
            if p.config.data.batch_size == "full"]
    assert full[0].config.data.subset == 49152 and full[0].config.data.micro_batch_size == 256
    assert parse_grid(["optim.lr=1e2,3e4", "data.batch_size=16,full"]) == {
        "optim.lr": [100.0, 30000.0], "data.batch_size": [16, "full"]}
    with pytest.raises(ConfigError, match="unknown sweep preset"):
        load_spec("nope")


def test_fashion_mnist_scale_loads_around_the_preset():
    preset = load_config("fashion-mnist")
    points = expand(load_spec("step-size", scale="fashion-mnist"))
    assert all(p.config.data.name == "fashion-mnist" and p.config.model.name == "convnet"
               and p.config.model.widths == preset.model.widths
               and p.config.probe.train_samples == preset.probe.train_samples
               for p in points)
    lrs = sorted({p.config.optim.lr for p in points})
    assert min(lrs) < preset.optim.lr < max(lrs) and preset.optim.lr in lrs
    assert {p.config.seed for p in points} == {0, 1, 2}
    assert len(points) == 3 * len(lrs)


SPEC = """
name: s
base: digits
grid: {optim.lr: [1.0e+3, 1.0e+4], seed: [0]}
fashion-mnist:
  base: fashion-mnist
  overrides: {train.steps: 100}
  grid: {optim.lr: [3.0e+3]}
"""


def _spec(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_spec_scale_sections_merge_over_the_top_level(tmp_path):
    path = _spec(tmp_path, SPEC)
    digits = load_spec(path)
    assert digits.base == "digits" and digits.grid["optim.lr"] == [1e3, 1e4]
    fm = load_spec(path, scale="fashion-mnist")
    assert fm.name == "s" and fm.base == "fashion-mnist"
    assert fm.grid == {"optim.lr": [3e3], "seed": [0]}  # the section's axis replaces
    assert fm.overrides == {"train.steps": 100}
    (point,) = expand(fm)
    assert point.config.data.name == "fashion-mnist" and point.config.train.steps == 100


@pytest.mark.parametrize(("text", "scale", "message"), [
    # a typo in a section's own keys, with the closest key suggested
    (SPEC.replace("  overrides:", "  overides:"), "fashion-mnist",
     r"fashion-mnist\.overides.*did you mean 'overrides'"),
    # a config key misspelled in the section is refused even when the digits scale is
    # asked for: every scale is checked at load time
    (SPEC.replace("{train.steps: 100}", "{train.stepz: 100}"), "digits",
     r"\(fashion-mnist scale\).*train\.stepz"),
    (SPEC.replace("[3.0e+3]", "[-1]"), "digits", r"fashion-mnist scale.*lr=-1"),
    (SPEC.replace("  grid: {optim.lr: [3.0e+3]}", "  grid: {optim.lr: []}"),
     "fashion-mnist", r"fashion-mnist\.grid.*non-empty"),
    (SPEC.replace("fashion-mnist:", "fashion-mnst:"), "digits",
     r"fashion-mnst.*did you mean 'fashion-mnist'"),
    (SPEC.split("fashion-mnist:")[0] + "fashion-mnist: 3\n", "digits",
     r"fashion-mnist: .*dictionary"),
    (SPEC, "cifar", r"unknown scale 'cifar'; allowed: digits, fashion-mnist, paper"),
    (SPEC, "paper", r"has no paper section; it has: digits, fashion-mnist"),
])
def test_spec_scales_are_validated_strictly(tmp_path, text, scale, message):
    with pytest.raises(ConfigError, match=message):
        load_spec(_spec(tmp_path, text), scale=scale)


def test_cli_scale_choices_are_the_spec_scales():
    from escapelab.cli import sweep as command

    (option,) = [p for p in command.params if p.name == "scale"]
    assert list(option.type.choices) == list(SCALES)
    with pytest.raises(ConfigError, match="unknown scale"):
        load_spec("step-size", scale="cifar")


@pytest.mark.parametrize(("summary", "label"), [
    ({"status": "diverged"}, "diverges"),
    ({"status": "completed", "escape_step": None, "teacher_probe_acc": 0.9,
      "final_probe_acc": 0.9, "min_probe_acc": 0.9}, "stays"),
    ({"status": "completed", "escape_step": 5, "teacher_probe_acc": 0.9,
      "final_probe_acc": 0.93, "min_probe_acc": 0.8}, "escapes"),
    ({"status": "completed", "escape_step": 5, "teacher_probe_acc": 0.9,
      "final_probe_acc": 0.9, "min_probe_acc": 0.7}, "collapses"),
    ({"status": "completed", "escape_step": 5, "teacher_probe_acc": 0.9,
      "final_probe_acc": 0.8, "min_probe_acc": 0.8}, "collapses"),
    ({"status": "completed", "escape_step": 5, "teacher_probe_acc": 0.9,
      "final_probe_acc": 0.902, "min_probe_acc": 0.898}, "stays"),
])
def test_phase_labels(summary, label):
    assert phase(summary) == label


def test_sweep_runs_aggregates_survives_failures_and_skips_on_relaunch(tmp_path):
    spec = SweepSpec(
        name="t", base="digits", overrides=_tiny(**{"train.steps": 30}),
        grid={"case": [{"label": "ok", "optim.lr": 100},
                       {"label": "mse", "loss.name": "mse", "optim.lr": 1e6},
                       {"label": "broken", "data.batch_size": 100000}],
              "seed": [0, 1]})
    result = run_sweep(spec, tmp_path, workers=2)
    assert result["ran"] == 6 and result["skipped"] == 0
    with (tmp_path / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    assert {r["status"] for r in by_case["ok"]} == {"completed"}
    assert {r["phase"] for r in by_case["mse"]} == {"diverges"}
    assert {r["status"] for r in by_case["broken"]} == {"failed"}
    assert "exceeds" in by_case["broken"][0]["error"]
    with (tmp_path / "table.csv").open() as f:
        table = {r["case"]: r for r in csv.DictReader(f)}
    finals = [float(r["final_probe_acc"]) for r in by_case["ok"]]
    assert float(table["ok"]["final_probe_acc_mean"]) == pytest.approx(np.mean(finals))
    assert float(table["ok"]["final_probe_acc_std"]) == pytest.approx(np.std(finals))
    assert table["ok"]["runs"] == "2"
    again = run_sweep(spec, tmp_path, workers=2)
    assert again["skipped"] == 4 and again["ran"] == 2  # only the broken ones retry


def test_cli_sweep_prints_the_table(tmp_path):
    args = [f"{k}={v}" for k, v in _tiny(**{"train.steps": 20}).items()]
    cmd = [sys.executable, "-m", "escapelab", "sweep", "--grid", "optim.lr=10,3e4",
           "--out", str(tmp_path / "s"), "--workers", "1", *args]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "2 points: 2 run, 0 already finished" in first.stdout
    assert "phase" in first.stdout
    second = subprocess.run(cmd, capture_output=True, text=True)
    assert "2 points: 0 run, 2 already finished" in second.stdout
    # the two points trained together (the default), then one process each
    runs = sorted((tmp_path / "s" / "runs").iterdir())
    assert [json.loads((r / "environment.json").read_text()).get("group") for r in runs] \
        == [2, 2]
    alone = subprocess.run([*cmd[:-len(args)], "--no-group", *args, "seed=1"],
                           capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    fresh = [r for r in (tmp_path / "s" / "runs").iterdir() if r not in runs]
    assert len(fresh) == 2
    assert [json.loads((r / "environment.json").read_text()).get("group") for r in fresh] \
        == [None, None]
    bad = subprocess.run([sys.executable, "-m", "escapelab", "sweep", "--grid", "lr"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "key=v1,v2" in bad.stderr
