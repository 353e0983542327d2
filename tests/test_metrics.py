"""Every metric against an independent float64 NumPy reference (full SVD, explicit
covariance matrices, pinv) and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from escapelab import reference
from escapelab.metrics import (
    condition_number,
    dead_units,
    effective_rank,
    fisher_separability,
    kmeans_labels,
    layer_summary,
    singular_values,
)

EPS = np.finfo(np.float64).eps
ref_singular_values = reference.singular_values
ref_erank = reference.effective_rank
ref_condition = reference.condition_number


def ref_fisher(x, y):
    total, between, within = reference.scatter_matrices(x, y)
    return reference.fisher(x, y), within


def close(a, b, rel=1e-6, abs_=1e-12):
    return a == pytest.approx(b, rel=rel, abs=abs_)


# -- closed forms ---------------------------------------------------------------------------

def test_closed_forms():
    assert effective_rank(np.eye(7)) == pytest.approx(7.0)
    assert condition_number(np.eye(7)) == pytest.approx(1.0)
    u = np.random.default_rng(0).standard_normal((20, 1))
    rank_one = u @ np.arange(1.0, 6.0)[None]
    assert effective_rank(rank_one) == pytest.approx(1.0)
    assert condition_number(rank_one) == pytest.approx(1.0)
    # Known spectrum: singular values 3 and 1 -> p = (3/4, 1/4).
    p = np.array([0.75, 0.25])
    assert effective_rank(np.diag([3.0, 1.0])) == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    # Singular values 6, 3, 1 (p = .6, .3, .1): 99.9% is reached only at the last one.
    x = np.diag([6.0, 3.0, 1.0])
    assert condition_number(x) == pytest.approx(6.0)
    assert condition_number(x, mass=0.85) == pytest.approx(2.0)
    assert condition_number(x, mass=0.5) == pytest.approx(1.0)


def test_fisher_closed_form():
    # Two classes centred at (-1, 0) and (1, 0), each the four corners (+-0.5, +-0.5)
    # around its centre: Sigma_w = diag(.25, .25), Sigma_b = diag(1, 0).
    corners = np.array([[0.5, 0.5], [0.5, -0.5], [-0.5, 0.5], [-0.5, -0.5]])
    x = np.concatenate([corners + [-1.0, 0.0], corners + [1.0, 0.0]])
    y = np.array([0] * 4 + [1] * 4)
    f = fisher_separability(x, y)
    assert f["tr_between"] == pytest.approx(1.0)  # means at +-1: variance 1
    assert f["tr_within"] == pytest.approx(0.5)  # 0.25 per axis
    assert f["tr_total"] == pytest.approx(1.5)
    assert f["discriminant"] == pytest.approx(1.0 / 0.25)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
def test_empty_inputs(shape):
    x = np.zeros(shape)
    assert effective_rank(x) == 0.0 and dead_units(x) == shape[1]
    assert condition_number(x) == math.inf


def test_degenerate_inputs_are_defined():
    zero = np.zeros((6, 4))
    assert effective_rank(zero) == 0.0 and condition_number(zero) == math.inf
    assert dead_units(zero) == 4
    f = fisher_separability(zero, [0, 0, 1, 1, 2, 2])
    assert f == {"tr_between": 0.0, "tr_within": 0.0, "tr_total": 0.0, "discriminant": 0.0,
                 "discriminant_rank": 0}
    wide_zero = np.zeros((3, 40))
    assert fisher_separability(wide_zero, [0, 1, 1])["discriminant"] == 0.0
    x = np.random.default_rng(0).standard_normal((5, 3))
    single = fisher_separability(x, [4] * 5)  # one class: nothing between
    assert single["tr_between"] == pytest.approx(0.0, abs=1e-12)
    assert single["discriminant"] == pytest.approx(0.0, abs=1e-12)
    singletons = fisher_separability(x, [0, 1, 2, 3, 4])  # one sample per class
    assert singletons["tr_within"] == pytest.approx(0.0, abs=1e-12)
    assert singletons["discriminant"] == 0.0
    one_row = np.array([[1.0, 2.0, 0.0]])
    assert effective_rank(one_row) == pytest.approx(1.0) and dead_units(one_row) == 1
    for value in fisher_separability(one_row, [0]).values():
        assert math.isfinite(value)


def test_dead_units_counts_all_zero_columns():
    x = np.random.default_rng(0).standard_normal((10, 6))
    x[:, [1, 4]] = 0.0
    x[3, 2] = 0.0  # zero on one sample only: alive
    assert dead_units(x) == 2
    assert dead_units(torch.tensor(x, dtype=torch.float32)) == 2


# -- against the reference ------------------------------------------------------------------

def _check_all(x, y, center=False):
    s_ref = ref_singular_values(x, center)
    s = singular_values(x, center).numpy()
    np.testing.assert_allclose(s, s_ref, rtol=1e-6, atol=1e-7 * (s_ref[0] if s_ref.size else 1))
    assert close(effective_rank(x, center), ref_erank(x, center))
    assert close(condition_number(x, center=center), ref_condition(x, center=center))
    assert dead_units(x) == int((np.asarray(x) == 0).all(axis=0).sum())
    want, _ = ref_fisher(x, y)
    got = fisher_separability(x, y)
    for key in want:
        scale = max(abs(want["tr_total"]), 1e-300) if key != "discriminant" else 1.0
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-10 * scale), key
    summary = layer_summary(x, y, center=center)
    assert summary["erank"] == pytest.approx(effective_rank(x, center))
    assert summary["discriminant"] == pytest.approx(got["discriminant"])


@pytest.mark.parametrize("shape", [(50, 8), (8, 50), (30, 30), (200, 3), (3, 200)])
@pytest.mark.parametrize("center", [False, True])
def test_random_matrices(shape, center):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[1])
    _check_all(x, rng.integers(0, 4, shape[0]), center)


@pytest.mark.parametrize("shape", [(60, 20), (20, 60)])
@pytest.mark.parametrize("rank", [1, 3])
def test_low_rank_matrices(shape, rank):
    rng = np.random.default_rng(rank)
    x = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))
    _check_all(x, rng.integers(0, 3, shape[0]))
    assert effective_rank(x) <= rank + 1e-9


def test_structured_matrices():
    rng = np.random.default_rng(3)
    relu = np.maximum(rng.standard_normal((40, 30)) - 0.8, 0.0)  # sparse, dead columns
    relu[:, :5] = 0.0
    _check_all(relu, np.arange(40) % 5)
    repeated = np.repeat(rng.standard_normal((4, 12)), 10, axis=0)  # 4 distinct rows
    _check_all(repeated, np.arange(40) % 4)
    assert effective_rank(repeated) <= 4 + 1e-9
    onehot = np.eye(10)[rng.integers(0, 10, 50)]
    _check_all(onehot, rng.integers(0, 2, 50))
    offset = rng.standard_normal((30, 6)) * 1e-3 + 1e3  # large mean, small spread
    _check_all(offset, np.arange(30) % 3, center=True)
    _check_all(offset, np.arange(30) % 3, center=False)


def test_wide_layer_separability_lives_in_the_span():
    # d >> n: the kernel route, against the explicit d x d computation.
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((24, 500)), 0)
    y = np.arange(24) % 4
    want, _ = ref_fisher(x, y)
    got = fisher_separability(x, y)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6)


def test_float32_and_torch_inputs():
    x = np.random.default_rng(1).standard_normal((40, 10)).astype(np.float32)
    y = np.arange(40) % 2
    want, _ = ref_fisher(x.astype(np.float64), y)
    assert fisher_separability(torch.tensor(x), y)["discriminant"] == pytest.approx(
        want["discriminant"], rel=1e-6)
    assert effective_rank(torch.tensor(x)) == pytest.approx(ref_erank(x), rel=1e-6)


matrices = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda shape: arrays(np.float64, shape,
                         elements=st.sampled_from([0.0, 0.0, 1.0, -1.0, 2.0, -3.0, 0.5, 7.0])
                         | st.floats(-50, 50, allow_nan=False, width=32)))


def _unambiguous(x, y):
    """Skip inputs whose answer sits on a documented threshold (eigenvalues of Sigma_w or
    singular values within a factor 100 of the cut-off)."""
    s = np.linalg.svd(x, compute_uv=False)
    if s.size and s[0] > 0:
        rel = s / s[0]
        cut = math.sqrt(max(x.shape) * EPS)
        if np.any((rel > cut / 100) & (rel < cut * 100)):
            return False
        cum = np.cumsum(s / s.sum())
        if np.any(np.abs(cum - 0.999) < 1e-9):
            return False
    lam, _, _, cut = reference.pinv_spectrum(x, y)
    if lam.size and lam.max() > 0 and cut > 0:
        # An eigenvalue near the pseudo-inverse's cut-off, or near the rounding level of
        # the total scatter, may fall on either side of it in either computation.
        floor = max(x.shape) * EPS * np.trace(reference.scatter_matrices(x, y)[0])
        for level in (cut, floor):
            if np.any((lam > level / 1e3) & (lam < level * 1e3)):
                return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=matrices, data=st.data())
def test_property_based_against_numpy(x, data):
    y = np.array(data.draw(st.lists(st.integers(0, 3), min_size=len(x), max_size=len(x))))
    assume(_unambiguous(x, y))
    _check_all(x, y)


@settings(max_examples=60, deadline=None)
@given(x=matrices)
def test_property_invariants(x):
    erank = effective_rank(x)
    rank = np.linalg.matrix_rank(x) if x.size else 0
    assert 0.0 <= erank <= rank + 1e-6
    f = fisher_separability(x, np.arange(len(x)) % 2)
    assert f["tr_total"] == pytest.approx(f["tr_between"] + f["tr_within"], rel=1e-9, abs=1e-9)
    assert f["discriminant"] >= 0 and math.isfinite(f["discriminant"])
    assert condition_number(x) >= 1.0 or condition_number(x) == math.inf


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_kmeans_labels_recover_clusters(solver):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 5)) * 10
    y = np.arange(90) % 3
    x = centers[y] + rng.standard_normal((90, 5)) * 0.1
    labels = kmeans_labels(x, 3, seed=0, solver=solver)
    # Same partition up to renaming.
    assert len({(a, b) for a, b in zip(labels, y, strict=True)}) == 3


def _inertia(x: np.ndarray, labels: np.ndarray) -> float:
    return sum(float(((x[labels == j] - x[labels == j].mean(0)) ** 2).sum())
               for j in np.unique(labels))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kmeans_labels_lloyd_fixed_point_and_sklearn_inertia(dtype):
    """On digits pixels (no clean cluster structure): with tol=0 the torch k-means stops
    only at a fixed point of Lloyd's algorithm, checked in float64 NumPy: every image is
    nearest (strictly, up to rounding) to the mean of its own cluster. Its inertia is
    that of scikit-learn's KMeans with the same settings to 1% (another seeding may stop
    in another local optimum; k-means++ seeds alone are ~10% worse on these data)."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    labels = kmeans_labels(torch.as_tensor(x, dtype=dtype), 10, seed=0, tol=0.0)
    assert labels.shape == (len(x),) and set(labels) == set(range(10))
    means = np.stack([x[labels == j].mean(0) for j in range(10)])
    d2 = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    own = d2[np.arange(len(x)), labels]
    assert np.all(own <= d2.min(1) * (1 + 1e-5) + 1e-6)
    reference = KMeans(10, n_init=4, random_state=0, tol=0.0).fit(x).inertia_
    assert _inertia(x, labels) <= 1.01 * reference
    assert np.array_equal(labels, kmeans_labels(torch.as_tensor(x, dtype=dtype), 10,
                                                seed=0, tol=0.0))  # deterministic


def test_kmeans_labels_collapsed_features():
    """A collapsed layer: dead (zero) and duplicate rows, fewer distinct points than
    clusters. Every image gets a cluster, no cluster mixes distinct points, and a
    single-point layer is one cluster."""
    x = np.zeros((60, 8))
    x[:20, 0] = 1.0  # three distinct points (one of them the dead zero vector), k = 5
    x[20:30, 1] = 2.0
    labels = kmeans_labels(x, 5, seed=0)
    assert labels.shape == (60,)
    for rows in (slice(0, 20), slice(20, 30), slice(30, 60)):
        assert len(set(labels[rows])) == 1  # a group of identical points stays together
    assert len({labels[0], labels[20], labels[30]}) == 3
    assert set(kmeans_labels(np.ones((10, 4)), 3)) == {0}


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_discriminant_fast_path_and_fallback(monkeypatch, shape):
    """Well-conditioned scatter: a Cholesky solve, no eigendecomposition; rank-deficient
    or constant features: the exact eigendecomposition. Both equal the reference."""
    import escapelab.metrics as m

    calls = []
    original = m._eigh
    monkeypatch.setattr(m, "_eigh", lambda mat, vectors: (calls.append(vectors),
                                                           original(mat, vectors))[1])
    rng = np.random.default_rng(7)
    y = np.arange(shape[0]) % 5
    x = rng.standard_normal(shape)
    want, _ = ref_fisher(x, y)
    assert fisher_separability(x, y)["discriminant"] == pytest.approx(
        want["discriminant"], rel=1e-6)
    assert True not in calls
    low = rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))
    low[:, 0] = 2.5  # a constant feature too
    want, _ = ref_fisher(low, y)
    assert fisher_separability(low, y)["discriminant"] == pytest.approx(
        want["discriminant"], rel=1e-6)
    assert True in calls


@pytest.mark.parametrize("decades", [6, 9, 12])
def test_ill_conditioned_full_rank_within_scatter_is_inverted_exactly(decades):
    """Features whose scales span 10^(decades/2): Sigma_w is full rank with condition
    ~10^decades, well inside float64. The discriminant must equal the exact inverse's
    (a fixed cut-off at 1e-8 of lambda_max gave 0.766 instead of 1.045 here)."""
    rng = np.random.default_rng(decades)
    n, d, classes = 3000, 40, 10
    y = rng.integers(0, classes, n)
    x = rng.standard_normal((n, d)) + 0.5 * rng.standard_normal((classes, d))[y]
    x *= np.logspace(0, -decades / 2, d)
    _, between, within = reference.scatter_matrices(x, y)
    assert np.linalg.cond(within) > 0.5 * 10.0**decades
    exact = float(np.trace(np.linalg.inv(within) @ between))
    got = fisher_separability(x, y)
    assert got["discriminant"] == pytest.approx(exact, rel=1e-6)
    assert got["discriminant_rank"] == d
    # The same data in torch float64 through the kernel-free route gives the same.
    assert fisher_separability(torch.tensor(x), y)["discriminant"] == pytest.approx(
        exact, rel=1e-6)


def test_rank_deficient_within_scatter_reports_the_rank_kept():
    rng = np.random.default_rng(3)
    y = np.arange(400) % 4
    x = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 30))  # rank 6 of 30
    got = fisher_separability(x, y)
    want = reference.fisher(x, y)
    assert got["discriminant_rank"] == want["discriminant_rank"] == 6
    assert got["discriminant"] == pytest.approx(want["discriminant"], rel=1e-6)
