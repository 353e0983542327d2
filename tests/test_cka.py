"""Linear CKA against the plain NumPy HSIC formulas (reference.py), its invariances, and
where runs and the layerwise analysis report it (teacher-student similarity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_overrides
from escapelab import reference
from escapelab.analyze import AnalysisOptions, analyze
from escapelab.config import load_config
from escapelab.metrics import linear_cka
from escapelab.store import RunDir
from escapelab.train import train

# (n, d1, d2): both narrow (covariance route), both wide, and mixed (Gram route).
SHAPES = [(60, 5, 8), (12, 30, 50), (25, 4, 90)]


def pair(n: int, d1: int, d2: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Related features with offsets (centering matters) and unequal scales."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 3, size=d1) + rng.normal(size=d1) * 4
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + 0.5 * rng.normal(size=(n, d2)) + 2.0
    return x, y


def orthogonal(d: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_numpy_hsic_formulas(shape, debiased):
    x, y = pair(*shape)
    want = reference.linear_cka(x, y, debiased)
    assert linear_cka(x, y, debiased) == pytest.approx(want, rel=1e-8, abs=1e-12)
    # float32 tensors (the Evaluator's case), against the reference on the same values
    x32, y32 = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert linear_cka(x32, y32, debiased) == pytest.approx(
        reference.linear_cka(x32.double().numpy(), y32.double().numpy(), debiased),
        rel=1e-8, abs=1e-12)


def test_debiased_formula_by_hand():
    # Song et al.'s estimator on a 5-sample example, written out element by element.
    x, y = pair(5, 2, 3, seed=3)
    k, l_ = x @ x.T, y @ y.T
    n = 5

    def u(a, b):
        total = 0.0
        for i in range(n):
            for j in range(n):
                if i != j:
                    total += a[i, j] * b[i, j]
        sum_a = sum(a[i, j] for i in range(n) for j in range(n) if i != j)
        sum_b = sum(b[i, j] for i in range(n) for j in range(n) if i != j)
        cross = sum(a[i, j] * b[j, q] for i in range(n) for j in range(n) for q in range(n)
                    if i != j and j != q)
        return (total + sum_a * sum_b / ((n - 1) * (n - 2)) - 2 / (n - 2) * cross) / (
            n * (n - 3))

    by_hand = u(k, l_) / math.sqrt(u(k, k) * u(l_, l_))
    assert reference.linear_cka(x, y, debiased=True) == pytest.approx(by_hand, rel=1e-12)
    assert linear_cka(x, y, debiased=True) == pytest.approx(by_hand, rel=1e-8)


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_identical_features_give_one(shape, debiased):
    x, _ = pair(*shape)
    assert linear_cka(x, x, debiased) == pytest.approx(1.0, rel=1e-12)
    # ... and so do rotated, rescaled and shifted copies
    z = 3.7 * x @ orthogonal(x.shape[1], 1) - 5.0
    assert linear_cka(x, z, debiased) == pytest.approx(1.0, rel=1e-10)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(0, 10_000), st.floats(1e-3, 1e3),
       st.floats(1e-3, 1e3), st.booleans())
def test_invariant_to_rotation_and_isotropic_scaling(shape, seed, a, b, debiased):
    x, y = pair(*shape, seed=seed)
    base = linear_cka(x, y, debiased)
    turned = linear_cka(a * x @ orthogonal(x.shape[1], seed),
                        b * y @ orthogonal(y.shape[1], seed + 1), debiased)
    assert turned == pytest.approx(base, rel=1e-8, abs=1e-10)


def test_not_invariant_to_anisotropic_scaling_and_in_unit_interval():
    x, y = pair(60, 5, 8)
    stretched = x * np.array([100.0, 1, 1, 1, 1])
    assert abs(linear_cka(stretched, y) - linear_cka(x, y)) > 1e-3  # the test can fail
    unrelated = np.random.default_rng(9).normal(size=(60, 8))
    assert 0 <= linear_cka(x, unrelated) < linear_cka(x, y) <= 1


def test_undefined_without_variance():
    x, _ = pair(10, 3, 3)
    assert math.isnan(linear_cka(x, np.ones((10, 4))))
    assert math.isnan(linear_cka(x[:3], x[:3], debiased=True))
    with pytest.raises(ValueError, match="same rows"):
        linear_cka(x, x[:5])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("cka") / "run"
    train(load_config("digits", tiny_overrides(**{"optim.lr": 3e4})), out)
    result = analyze(out, AnalysisOptions(probe=False, label_free=False, samples=80))
    return out, result


def test_evaluations_report_cka_with_the_teacher(analysed):
    out, _ = analysed
    run = RunDir(out)
    teacher = run.teacher_eval()
    assert teacher["cka_teacher"] == pytest.approx(1.0)
    student = run.student_evals()
    assert student[0]["cka_teacher"] == pytest.approx(1.0, abs=1e-6)  # 1e-6 from T
    later = [r["cka_teacher"] for r in student[1:] if r["cka_teacher"] is not None]
    assert later and min(later) < 0.99  # the escape moves the representation


def test_layerwise_cka_against_the_reference(analysed):
    out, result = analysed
    assert all(v == pytest.approx(1.0) for v in result.series("T", "cka_T") if v is not None)
    from escapelab.analyze import _load
    from escapelab.data import load_dataset, stratified_subset
    from escapelab.models import build_model

    run = RunDir(out)
    cfg = run.config()
    data = load_dataset(cfg.data)
    idx = stratified_subset(data.y_test.numpy(), 80, 0)
    template = build_model(cfg.model, data.input_shape, run.derived().head_dim)
    models = {name: _load(run, name, template, torch.device("cpu"), torch.float32)[0]
              for name in ("T", "S")}
    with torch.no_grad():
        feats = {name: m.forward_taps(data.x_test[idx], ["relu1", "encoder"])
                 for name, m in models.items()}
    for tap in ("relu1", "encoder"):
        want = reference.linear_cka(feats["S"][tap].flatten(1).double().numpy(),
                                    feats["T"][tap].flatten(1).double().numpy())
        assert result.value("S", tap, "cka_T") == pytest.approx(want, rel=1e-6)
