"""Escape timing rules (escapelab.phases) on hand-made records with known answers, and
their place in every run's summary."""

from __future__ import annotations

import math

import pytest

from escapelab.phases import Timeline, catapults, oscillation_onset, recovery_step, timeline
from escapelab.store import RunDir
from escapelab.train import train


def _steps(grad, loss=None):
    return [{"step": k, "grad_norm": g, "loss": (loss[k - 1] if loss else 1.0)}
            for k, g in enumerate(grad, start=1)]


def test_oscillation_onset_is_the_first_alternating_step():
    # smooth decay up to step 60, then the norm alternates 2, 1, 2, 1, ... from step 61:
    # step 61 goes up (like 60 did not: 60 -> 61 is the first jump), 62 down: 62 is the
    # first step whose change reverses a large change
    grad = [0.99**k for k in range(1, 61)] + [2.0 if k % 2 else 1.0 for k in range(61, 121)]
    assert oscillation_onset(_steps(grad), start=1) == 62
    assert oscillation_onset(_steps(grad), start=90) == 90
    assert oscillation_onset(_steps(grad), start=None) is None
    # changes of 5% never count, however regular
    small = [1.05 if k % 2 else 1.0 for k in range(1, 121)]
    assert oscillation_onset(_steps(small), start=1) is None
    # a few isolated turns are not a regime: steps 22, 23, 24 turn in every 20 (3, 4 first)
    sparse = [2.0 if k % 20 in (1, 3) else 1.0 for k in range(1, 201)]
    assert oscillation_onset(_steps(sparse), start=1) is None
    assert oscillation_onset(_steps(sparse), start=1, share=0.15) == 3


def test_recovery_step_is_the_first_evaluation_back_at_the_teacher():
    evals = [{"model": "student", "step": s, "probe_acc": a}
             for s, a in [(0, 0.90), (5, 0.60), (10, 0.70), (50, 0.899), (100, 0.90),
                          (200, 0.95)]]
    assert recovery_step(evals, 0.90, after=5) == 100
    assert recovery_step(evals, 0.96, after=5) is None
    assert recovery_step(evals, 0.90, after=None) is None


def test_catapult_needs_a_spike_and_then_a_flatter_point():
    loss = [1.0] * 60
    loss[29] = 5.0  # step 30
    sharp = [{"model": "student", "step": 20, "eigenvalues": [10.0]},
             {"model": "student", "step": 40, "eigenvalues": [5.0]}]
    assert catapults(_steps([1.0] * 60, loss), sharp) == [30]
    not_flatter = [sharp[0], {**sharp[1], "eigenvalues": [9.5]}]
    assert catapults(_steps([1.0] * 60, loss), not_flatter) == []
    assert catapults(_steps([1.0] * 60, [1.0] * 60), sharp) == []  # no spike
    # two spikes between the same two measurements are one event
    loss[31] = 6.0
    assert catapults(_steps([1.0] * 60, loss), sharp) == [30]
    assert catapults(_steps([1.0] * 60, loss), sharp[:1]) == []  # nothing after


def test_timeline_of_a_summary():
    summary = {"status": "completed", "escape_step": 3, "collapse_step": 5,
               "erank_teacher": 30.0, "erank_collapse": 3.0, "teacher_probe_acc": 0.9,
               "probe_acc_collapse": 0.6, "min_probe_acc": 0.6, "final_probe_acc": 0.95}
    evals = [{"model": "student", "step": 5, "probe_acc": 0.6},
             {"model": "student", "step": 9, "probe_acc": 0.91}]
    t = timeline(summary, [], evals, [])
    assert t == Timeline(escape_step=3, collapse_step=5, erank_drop=10.0,
                         probe_drop=pytest.approx(0.3), recovery_step=9,
                         oscillation_onset=None, catapult_steps=[], phase="escapes")


def test_every_summary_carries_its_timeline(tiny_config, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(), out)
    run = RunDir(out)
    again = timeline(summary.model_dump(), run.steps(), run.evals(),
                     [r.model_dump() for r in run.sharpness()])
    for key, value in again.as_dict().items():
        assert summary[key] == value, key
    assert summary.phase in ("stays", "escapes", "collapses", "diverges")
    if summary.erank_drop is not None:
        assert math.isclose(summary.erank_drop,
                            summary.erank_teacher / summary.erank_collapse)


def test_a_catapult_right_after_the_start_is_seen():
    """The escape comes within a few steps: a spike at step 5 has 4 steps of history."""
    loss = [1e-20, 1e-20, 1e-20, 1e-20, 1e-3, 1e-4, 1e-4, 1e-4]
    sharp = [{"model": "student", "step": 4, "eigenvalues": [10.0]},
             {"model": "student", "step": 7, "eigenvalues": [0.1]}]
    assert catapults(_steps([1.0] * 8, loss), sharp) == [5]
    assert catapults(_steps([1.0] * 8, [1e-20, 1e-3] + [1e-4] * 6), sharp) == []  # 1 step
