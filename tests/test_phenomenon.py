"""The paper's central observation on the embedded default (digits, convnet, N-MSE).

These runs use the shipped `digits` preset unchanged, except for the seed and the step
size; each takes ~20 s on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

from escapelab.config import load_config
from escapelab.train import train


@pytest.fixture(scope="module")
def default_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("phenomenon")
    return [(train(load_config("digits", [f"seed={seed}", "checkpoint.every=0"]),
                   root / f"s{seed}"), root / f"s{seed}") for seed in (0, 1, 2)]


def test_student_collapses_then_ends_above_its_teacher(default_runs):
    for s, _ in default_runs:
        assert s["status"] == "completed"
        assert s["escape_step"] is not None and s["escape_step"] <= 50
        # Collapse: the encoder's effective rank falls at least 5x below the teacher's ...
        assert s["erank_collapse"] * 5 <= s["erank_teacher"]
        # ... probe accuracy drops, and more units are dead than at the teacher.
        assert s["min_probe_acc"] < s["teacher_probe_acc"] - 0.02
        assert s["probe_acc_collapse"] < s["teacher_probe_acc"]
        assert s["dead_frac_collapse"] > s["dead_frac_teacher"]
        # Recovery of the rank.
        assert s["erank_final"] > 5 * s["erank_collapse"]
    gains = [s["final_probe_acc"] - s["teacher_probe_acc"] for s, _ in default_runs]
    assert np.mean(gains) >= 0.015, gains


@pytest.mark.parametrize("lr", [100, 1])
def test_small_step_sizes_stay_at_the_teacher(tmp_path, lr):
    s = train(load_config("digits", [f"optim.lr={lr}", "checkpoint.every=0"]), tmp_path / "r")
    assert s["status"] == "completed" and s["escape_step"] is None
    assert abs(s["final_probe_acc"] - s["teacher_probe_acc"]) <= 0.002
    assert s["collapse_step"] is None


def test_layerwise_collapse_signature_at_c(default_runs):
    """Paper Sec. 3 on the seed-0 default run: at C the effective rank is lower than at T
    at most taps and more units are dead."""
    from escapelab.analyze import AnalysisOptions, analyze

    run_dir = default_runs[0][1]
    result = analyze(run_dir, AnalysisOptions(checkpoints=("T", "C", "S"),
                                              label_free=False, probe=False))
    lower = [result.value("C", t, "erank") < result.value("T", t, "erank")
             for t in result.layers]
    assert sum(lower) > len(lower) / 2, lower
    dead_t = sum(result.value("T", t, "dead_units") for t in result.layers)
    dead_c = sum(result.value("C", t, "dead_units") for t in result.layers)
    assert dead_c > dead_t
    assert result.value("C", "encoder", "erank") * 5 <= result.value("T", "encoder", "erank")
