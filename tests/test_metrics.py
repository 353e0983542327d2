from __future__ import annotations

import numpy as np
import pytest
import torch

from escapelab.metrics import dead_units, effective_rank, singular_values


def _erank_reference(x):
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape", [(50, 8), (8, 50), (30, 30)])
def test_effective_rank_matches_numpy_svd(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    assert effective_rank(x) == pytest.approx(_erank_reference(x), rel=1e-9)
    assert effective_rank(torch.tensor(x, dtype=torch.float32)) == pytest.approx(
        _erank_reference(x), rel=1e-5)
    np.testing.assert_allclose(singular_values(x).numpy(),
                               np.linalg.svd(x, compute_uv=False), rtol=1e-9)


def test_effective_rank_closed_forms():
    assert effective_rank(np.eye(7)) == pytest.approx(7.0)
    u = np.random.default_rng(0).standard_normal((20, 1))
    assert effective_rank(u @ u.T[:, :5]) == pytest.approx(1.0)
    assert effective_rank(np.zeros((4, 3))) == 0.0
    # Known spectrum: singular values 3, 1 -> p = (3/4, 1/4).
    x = np.diag([3.0, 1.0])
    p = np.array([0.75, 0.25])
    assert effective_rank(x) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_dead_units_counts_all_zero_columns():
    x = np.random.default_rng(0).standard_normal((10, 6))
    x[:, [1, 4]] = 0.0
    x[3, 2] = 0.0  # zero on one sample only: alive
    assert dead_units(x) == 2
    assert dead_units(torch.tensor(x)) == 2
