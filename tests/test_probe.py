from __future__ import annotations

import numpy as np
import pytest

from escapelab.probe import knn_accuracy, linear_probe_accuracy


def _blobs(n, d, classes, spread, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, d)) * 4
    y = np.arange(n) % classes
    return centers[y] + spread * rng.standard_normal((n, d)), y


def test_linear_probe_separates_separable_data_and_not_noise():
    x, y = _blobs(300, 10, 3, 0.1, 0)
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:]) == 1.0
    noise = np.random.default_rng(1).standard_normal((300, 10))
    acc = linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:])
    assert acc < 0.6
    assert linear_probe_accuracy(x[:200] * np.nan, y[:200], x[200:], y[200:]) is None


def _knn_reference(ftr, ytr, fte, k):
    a = ftr / np.linalg.norm(ftr, axis=1, keepdims=True)
    b = fte / np.linalg.norm(fte, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :k]
    return np.array([np.bincount(ytr[row], minlength=ytr.max() + 1).argmax()
                     for row in nearest])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_a_cosine_majority_vote(k):
    x, y = _blobs(400, 6, 4, 3.0, 2)
    pred = _knn_reference(x[:300], y[:300], x[300:], k)
    assert knn_accuracy(x[:300], y[:300], x[300:], y[300:], k) == pytest.approx(
        np.mean(pred == y[300:]))
