from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from escapelab.config import load_config
from escapelab.lr_range import RangeOptions, detect, run_lr_range

LRS = list(np.geomspace(1e-6, 1e6, 121))  # 0.1 decade per step


def test_flat_then_escape_then_plateau():
    # float32 escape: zeros and rounding noise at the teacher, a jump at step 80 with an
    # overshoot, then a plateau.
    rng = np.random.default_rng(0)
    loss = [0.0 if rng.random() < 0.7 else 4e-22 for _ in range(79)]
    loss += [1e-3, 5e-4] + [1e-4] * 40
    d = detect(LRS, loss)
    assert d["depart_step"] == 80 and d["depart_lr"] == pytest.approx(LRS[79])
    assert d["diverge_step"] is None


def test_escape_in_two_steps():
    loss = [1e-20] * 60 + [1e-5] * 30 + [1e-2] * 31
    d = detect(LRS, loss)
    assert d["depart_step"] == 61 and d["diverge_step"] == 91
    assert d["diverge_lr"] == pytest.approx(LRS[90])


def test_supervised_learns_then_blows_up():
    loss = [2.3] * 40 + list(np.geomspace(2.3, 0.05, 40)) + list(np.geomspace(0.05, 1e3, 20))
    loss += [math.nan] * 21
    d = detect(LRS, loss)
    # Learning: leaves [2.3/2, 2.3*2] once the loss falls below 1.15.
    first_below = next(i for i, v in enumerate(loss) if v < 1.15)
    assert d["depart_step"] in (first_below + 1, first_below + 2, first_below + 3)
    # Divergence: 10x above the lowest smoothed loss (0.05) -> the first value > 0.5.
    first_above = next(i for i, v in enumerate(loss) if i > 80 and v > 0.5)
    assert abs(d["diverge_step"] - (first_above + 1)) <= 2


def test_spikes_do_not_count_and_nan_is_divergence():
    loss = [1.0] * 50
    loss[20] = 1e6  # one spike: the running median ignores it
    d = detect(LRS[:50], loss)
    assert d["depart_step"] is None and d["diverge_step"] is None
    d = detect(LRS[:30], [1.0] * 25 + [math.inf] + [math.nan] * 4)
    assert d["diverge_step"] == 26 and d["depart_step"] == 26
    d = detect(LRS[:3], [None, None, None])
    assert d["diverge_step"] == 1
    capped = detect(LRS[:30], [1.0] * 30, ended_early=True)
    assert capped["diverge_step"] == 30


@pytest.fixture(scope="module")
def tiny_range(tmp_path_factory):
    from conftest import tiny_overrides

    base = load_config("digits", tiny_overrides())
    out = tmp_path_factory.mktemp("lrr")
    payload = run_lr_range(base, out, RangeOptions(steps=60, seeds=(0, 1)))
    return out, payload


def test_range_schedule_and_outputs(tiny_range):
    out, payload = tiny_range
    with (out / "lr_range.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["curve", "seed", "step", "lr", "loss", "grad_norm"]
    assert {(r["curve"], r["seed"]) for r in rows} == {
        ("escape", "0"), ("escape", "1"), ("supervised", "0"), ("supervised", "1")}
    esc = [r for r in rows if r["curve"] == "escape" and r["seed"] == "0"]
    for r in esc:
        k = int(r["step"])
        assert float(r["lr"]) == pytest.approx(1e-6 * (1e12) ** ((k - 1) / 59), rel=1e-9)
    stored = json.loads((out / "lr_range.json").read_text())
    assert stored["curves"]["supervised"]["seeds"]["0"]["diverge_lr"] is not None
    # The detection stored equals the rule applied to the written curve.
    sup = [r for r in rows if r["curve"] == "supervised" and r["seed"] == "1"]
    again = detect([float(r["lr"]) for r in sup],
                   [float(r["loss"]) if r["loss"] else None for r in sup])
    assert again["diverge_lr"] == stored["curves"]["supervised"]["seeds"]["1"]["diverge_lr"]
    band = stored["band"]["escape"]
    assert len(band["lr"]) == len(band["min"]) and all(
        a <= b <= c for a, b, c in zip(band["min"], band["median"], band["max"], strict=True))


def test_cli_prints_departure_and_divergence(tmp_path):
    from conftest import tiny_overrides

    result = subprocess.run(
        [sys.executable, "-m", "escapelab", "lr-range", "--out", str(tmp_path / "r"),
         "--steps", "40", "--mode", "full", "--seeds", "0", *tiny_overrides()],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "departs at eta" in result.stdout and "supervised" in result.stdout
    assert (tmp_path / "r" / "lr_range.json").exists()
    bad = subprocess.run([sys.executable, "-m", "escapelab", "lr-range", "--seeds", "a,b"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--seeds" in bad.stderr
