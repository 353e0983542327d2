"""Each verdict rule on hand-made records whose answer is known by construction: a claim
that holds, one that partly holds, one that does not, one that cannot be measured."""

from __future__ import annotations

import math

import pytest

from escapelab import claims
from escapelab.claims import (
    HOLDS,
    NOT_HOLD,
    NOT_MEASURED,
    PARTLY,
    Evidence,
    RunFacts,
    by_seeds,
    evaluate,
    spearman,
)


def facts(seed=0, lr=1e4, phase="escapes", **summary):
    base = {"status": "completed", "phase": phase, "teacher_probe_acc": 0.80,
            "min_probe_acc": 0.70, "final_probe_acc": 0.85, "gain": 0.05, "escape_step": 5,
            "collapse_step": 20, "recovery_step": 100, "erank_teacher": 20.0,
            "erank_collapse": 1.5}
    base.update(summary)
    return RunFacts(seed=seed, lr=lr, summary=base)


def test_by_seeds_and_spearman_against_closed_forms():
    assert by_seeds([True, True]) == HOLDS
    assert by_seeds([True, False]) == PARTLY
    assert by_seeds([False, False, None]) == NOT_HOLD
    assert by_seeds([None, None]) == by_seeds([]) == NOT_MEASURED
    # 1 - 6 sum d^2 / (n (n^2 - 1)) with ranks (1,2,3) vs (1,3,2): 1 - 6*2/24 = 0.5
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # an infinite value ranks last: (1,2,3,4) vs (1,2,4,3) -> 1 - 6*2/60 = 0.8
    assert spearman([1, 2, 3, 4], [10, 20, math.inf, 30]) == pytest.approx(0.8)
    assert spearman([1, 2], [5, 5]) is None


def _range(pairs):
    """An lr_range.json payload: per seed (escape departure, supervised divergence)."""
    return {"curves": {
        "escape": {"seeds": {str(s): {"depart_lr": a, "diverge_lr": 5e3}
                             for s, (a, _) in enumerate(pairs)}},
        "supervised": {"seeds": {str(s): {"depart_lr": 1e-3, "diverge_lr": b}
                                 for s, (_, b) in enumerate(pairs)}}}}


@pytest.mark.parametrize("pairs, verdict", [
    ([(500.0, 10.0), (300.0, 12.0)], HOLDS),
    ([(500.0, 10.0), (20.0, 10.0)], PARTLY),
    ([(5.0, 10.0), (8.0, 10.0)], NOT_HOLD),
    ([(None, 10.0)], NOT_MEASURED),
])
def test_lr_range_supervised_first(pairs, verdict):
    claim = claims.lr_range_supervised_first(Evidence(lr_range=_range(pairs)))
    assert claim.verdict == verdict
    if verdict != NOT_MEASURED:
        assert claim.numbers["ratios"] == pytest.approx([a / b for a, b in pairs])


def test_a_threshold_is_what_decides(monkeypatch):
    ev = Evidence(lr_range=_range([(50.0, 10.0)]))  # ratio 5
    assert claims.lr_range_supervised_first(ev).verdict == NOT_HOLD
    monkeypatch.setattr(claims, "FAR_RATIO", 4.0)
    assert claims.lr_range_supervised_first(ev).verdict == HOLDS
    assert claims.evaluate(Evidence())[0].verdict == NOT_MEASURED


def test_two_stages():
    payload = {"curves": {"escape": {"seeds": {
        "0": {"depart_lr": 1.0, "diverge_lr": 500.0},
        "1": {"depart_lr": 1.0, "diverge_lr": None}}}}}
    assert claims.lr_range_two_stages(Evidence(lr_range=payload)).verdict == PARTLY


def _sweep(phases_by_lr, finals=None):
    runs = []
    for i, (lr, phases) in enumerate(sorted(phases_by_lr.items())):
        for seed, phase in enumerate(phases):
            final = finals[i] if finals else 0.85
            runs.append(facts(seed, lr, phase, final_probe_acc=final,
                              escape_step=None if phase == "stays" else 5))
    return runs


def test_step_size_claims():
    runs = _sweep({1e2: ["stays", "stays"], 1e3: ["escapes", "escapes"],
                   1e4: ["escapes", "escapes"], 3e4: ["escapes", "escapes"],
                   1e5: ["collapses", "escapes"]}, finals=[0.8, 0.82, 0.84, 0.86, 0.7])
    ev = Evidence(step_size=runs, representative_lr=3e4)
    assert claims.step_small_stays(ev).verdict == HOLDS
    assert claims.step_larger_escape(ev).verdict == HOLDS
    rising = claims.step_probe_increases(ev)
    assert rising.verdict == HOLDS and rising.numbers["rho"] == pytest.approx(1.0)
    assert rising.numbers["lrs"] == [1e3, 1e4, 3e4]  # 1e5 has a collapsing seed
    assert claims.step_largest_unrecovered(ev).verdict == PARTLY
    assert claims.step_drop_recover(ev).verdict == HOLDS

    falling = _sweep({1e3: ["escapes"], 1e4: ["escapes"], 1e5: ["escapes"]},
                     finals=[0.9, 0.85, 0.8])
    assert claims.step_probe_increases(Evidence(step_size=falling)).verdict == NOT_HOLD
    two = _sweep({1e3: ["escapes"], 1e4: ["escapes"], 1e5: ["collapses"]})
    assert claims.step_probe_increases(Evidence(step_size=two)).verdict == NOT_MEASURED
    assert claims.step_small_stays(Evidence(step_size=two)).verdict == NOT_HOLD


def test_drop_and_recover_needs_both():
    ev = Evidence(step_size=[facts(0, 3e4, min_probe_acc=0.70, final_probe_acc=0.86),
                             facts(1, 3e4, min_probe_acc=0.70, final_probe_acc=0.79),
                             facts(2, 1e2)], representative_lr=3e4)
    claim = claims.step_drop_recover(ev)
    assert claim.verdict == PARTLY and claim.numbers["gain"] == [0.05, 0.05]
    ev.representative_lr = 1e5
    assert claims.step_drop_recover(ev).verdict == NOT_MEASURED


def _batch(recovery):
    runs = []
    for b, step in recovery.items():
        r = facts(0, 1e4, recovery_step=step)
        r.batch_size, r.n_train = b, 1000
        runs.append(r)
    return Evidence(batch_size=runs)


def test_batch_size_claims():
    assert claims.batch_slower_recovery(_batch({16: 50, 64: 80, "full": None})).verdict \
        == HOLDS  # never recovering counts as slowest
    assert claims.batch_slower_recovery(_batch({16: 90, 64: 80, "full": 20})).verdict \
        == NOT_HOLD
    assert claims.batch_slower_recovery(_batch({16: 90, 64: 80})).verdict == NOT_MEASURED
    assert claims.batch_slower_recovery(_batch({16: None, 64: None, 256: None})).verdict \
        == NOT_MEASURED
    ev = _batch({16: 50, "full": 80})
    assert claims.batch_full_escapes(ev).verdict == HOLDS
    ev.batch_size[1].summary["phase"] = "collapses"
    assert claims.batch_full_escapes(ev).verdict == NOT_HOLD


def _steps(loss, grad):
    return [{"step": k + 1, "loss": x, "grad_norm": g}
            for k, (x, g) in enumerate(zip(loss, grad, strict=True))]


def test_dynamics_spike_and_plateau():
    # a spike at step 5, then a plateau 1000x lower around the collapse at step 30
    loss = [1e-20] * 4 + [1.0] + [1e-3] * 195
    grad = [1e-10] * 4 + [10.0] + [1e-3] * 195
    spiking = facts(0, 3e4, collapse_step=30)
    spiking.steps = _steps(loss, grad)
    flat = facts(1, 3e4, collapse_step=30)
    flat.steps = _steps([1e-3] * 200, [1e-3] * 200)
    ev = Evidence(step_size=[spiking], representative_lr=3e4)
    assert claims.dynamics_spike(ev).verdict == HOLDS
    assert claims.dynamics_plateau(ev).verdict == HOLDS
    ev.step_size.append(flat)
    assert claims.dynamics_spike(ev).verdict == PARTLY
    assert claims.dynamics_plateau(ev).verdict == PARTLY


def test_gd_oscillation():
    run = facts(0, 1e4, oscillation_onset=100, collapse_step=10, final_probe_acc=0.85)
    run.batch_size, run.n_train = "full", 1000
    grad = [1.0] * 200
    for k in range(89, 99):  # the 10 steps before the onset: 5x the collapse's norm
        grad[k] = 5.0
    run.steps = _steps([1e-2] * 200, grad)
    run.evals = [{"step": 50, "probe_acc": 0.70}, {"step": 100, "probe_acc": 0.72}]
    ev = Evidence(batch_size=[run])
    assert claims.dynamics_gd_oscillation(ev).verdict == HOLDS
    run.summary["oscillation_onset"] = None
    assert claims.dynamics_gd_oscillation(ev).verdict == NOT_HOLD


def _analysis(values, samples=500):
    """values: {(checkpoint, layer, metric): value} on taps conv1, relu1, relu2, encoder."""
    rows = [{"checkpoint": c, "layer": layer, "metric": m, "value": v}
            for (c, layer, m), v in values.items()]
    return {"layers": ["conv1", "relu1", "relu2", "encoder", "head"], "rows": rows,
            "samples": samples}


def _rep(seed, values):
    r = facts(seed, 3e4)
    r.analysis = _analysis(values)
    return r


LAYERS = ("relu1", "relu2", "encoder")


def test_layer_claims():
    def erank(t, s):
        out = {}
        for layer, (a, b) in zip(LAYERS, zip(t, s, strict=True), strict=True):
            out[("T", layer, "erank")], out[("S", layer, "erank")] = a, b
            out[("T", layer, "units")] = 64
        return out

    higher = _rep(0, erank([10, 8, 6], [20, 16, 12]))
    mixed = _rep(1, erank([10, 8, 6], [20, 4, 12]))
    ev = Evidence(step_size=[higher], representative_lr=3e4)
    assert claims.signal_student_higher_rank(ev).verdict == HOLDS
    assert claims.signal_teacher_rank_deficient(ev).verdict == HOLDS  # 10/64 < 0.5
    ev.step_size.append(mixed)
    claim = claims.signal_student_higher_rank(ev)
    assert claim.verdict == PARTLY and "2 of 3 layers" in claim.detail
    lower = _rep(0, erank([40, 40, 40], [4, 4, 4]))
    ev = Evidence(step_size=[lower], representative_lr=3e4)
    assert claims.signal_student_higher_rank(ev).verdict == NOT_HOLD
    assert claims.signal_teacher_rank_deficient(ev).verdict == NOT_HOLD  # 40/64 >= 0.5
    assert claims.signal_conditioning(ev).verdict == NOT_MEASURED  # no condition numbers


def test_dead_units_and_separability():
    values = {}
    for layer in LAYERS:
        for ck, dead in (("T", 2), ("C", 40), ("S", 10)):
            values[(ck, layer, "dead_units")], values[(ck, layer, "units")] = dead, 100
            values[(ck, layer, "dead_frac")] = dead / 100
    for ck, rel, between in (("T", 1.0, 5.0), ("C", 0.2, 50.0), ("S", 1.5, 8.0)):
        values[(ck, "encoder", "discriminant_rel_teacher")] = rel
        values[(ck, "encoder", "tr_between")] = between
    ev = Evidence(step_size=[_rep(0, values)], representative_lr=3e4)
    assert claims.signal_dead_units(ev).verdict == HOLDS
    assert claims.sep_student_discriminant(ev).verdict == HOLDS
    assert claims.sep_collapse_lowest(ev).verdict == HOLDS
    assert claims.sep_collapse_between(ev).verdict == HOLDS  # 50 >= 2 x 8
    values[("C", "encoder", "tr_between")] = 10.0  # 10 < 2 x 8
    values[("S", "encoder", "discriminant_rel_teacher")] = 0.9
    values.update({("S", layer, "dead_units"): 60 for layer in LAYERS})
    ev = Evidence(step_size=[_rep(0, values)], representative_lr=3e4)
    assert claims.sep_collapse_between(ev).verdict == NOT_HOLD
    assert claims.sep_student_discriminant(ev).verdict == NOT_HOLD
    assert claims.signal_dead_units(ev).verdict == NOT_HOLD


def test_teacher_early_layers():
    values = {("T", "relu1", "probe_acc"): 0.9, ("T", "relu2", "probe_acc"): 0.85,
              ("T", "encoder", "probe_acc"): 0.8}
    ev = Evidence(step_size=[_rep(0, values)], representative_lr=3e4)
    assert claims.sep_teacher_early_layers(ev).verdict == HOLDS
    values[("T", "encoder", "probe_acc")] = 0.95
    ev = Evidence(step_size=[_rep(0, values)], representative_lr=3e4)
    assert claims.sep_teacher_early_layers(ev).verdict == NOT_HOLD


def _warm(loss, schedule, warmup, phase):
    r = facts(0, 1e4, phase)
    r.loss, r.schedule, r.warmup_steps = loss, schedule, warmup
    return r


def test_stabilizing():
    runs = [_warm("mse", "constant", 0, "diverges"), _warm("mse", "w", 100, "diverges"),
            _warm("nmse", "constant", 0, "escapes"), _warm("ndmse", "w100", 100, "diverges"),
            _warm("ndmse", "w1000", 1000, "collapses")]
    ev = Evidence(loss_warmup=runs)
    assert claims.stab_mse_diverges(ev).verdict == HOLDS
    assert claims.stab_normalized_stable(ev).verdict == PARTLY  # ND-MSE kills the encoder
    runs[-1].summary["phase"] = "escapes"
    assert claims.stab_normalized_stable(ev).verdict == HOLDS
    runs[0].summary["phase"] = "escapes"
    assert claims.stab_mse_diverges(ev).verdict == NOT_HOLD
    assert claims.stab_mse_diverges(Evidence()).verdict == NOT_MEASURED


def test_every_claim_has_its_rule_and_a_valid_verdict():
    out = evaluate(Evidence(missing={"lr-range": "the lr-range part is not run"}))
    assert len(out) == len(claims.CLAIMS) and len({c.id for c in out}) == len(out)
    assert all(c.verdict == NOT_MEASURED for c in out)
    assert out[0].detail == "the lr-range part is not run"
    assert all(c.rule and c.statement and c.figure for c in out)
    assert str(claims.FAR_RATIO).rstrip("0").rstrip(".") in out[0].rule
