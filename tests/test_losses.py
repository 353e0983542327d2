from __future__ import annotations

import numpy as np
import pytest
import torch

from escapelab import reference
from escapelab.config import LossConfig
from escapelab.losses import make_loss

rng = np.random.default_rng(0)
S = rng.standard_normal((6, 5))
T = rng.standard_normal((6, 5))
LABELS = np.array([0, 4, 2, 1, 3, 4])


_unit = reference.unit_rows
_log_softmax = reference.log_softmax
REFERENCES = reference.LOSSES


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_escape_losses_match_hand_written_formulas(name):
    fn = make_loss(LossConfig(name=name))
    got = float(fn(torch.tensor(S), torch.tensor(T)))
    assert got == pytest.approx(REFERENCES[name](S, T), rel=1e-12)


def test_supervised_losses():
    logits = torch.tensor(S)
    labels = torch.tensor(LABELS)
    ce = -np.mean(_log_softmax(S)[np.arange(6), LABELS])
    assert float(make_loss(LossConfig(name="ce"))(logits, labels)) == pytest.approx(ce)
    onehot = np.eye(5)[LABELS]
    assert float(make_loss(LossConfig(name="onehot_mse"))(logits, labels)) == pytest.approx(
        np.mean((S - onehot) ** 2))


def _grad(name):
    s = torch.tensor(S, requires_grad=True)
    make_loss(LossConfig(name=name))(s, torch.tensor(T)).backward()
    return s.grad.numpy()


def test_nmse_gradient_is_projected_and_ndmse_is_not():
    n, d = S.shape
    norm = np.linalg.norm(S, axis=1, keepdims=True)
    r = _unit(S) - _unit(T)  # residual of the normalized outputs
    # d/ds of mean((s/|s| - u)^2): the residual projected off s, divided by |s|.
    u = _unit(S)
    nmse = 2 / (n * d) * (r - u * np.sum(r * u, axis=1, keepdims=True)) / norm
    ndmse = 2 / (n * d) * r / norm  # the norm is a constant
    np.testing.assert_allclose(_grad("nmse"), nmse, rtol=1e-10)
    np.testing.assert_allclose(_grad("ndmse"), ndmse, rtol=1e-10)
    np.testing.assert_allclose(_grad("mse"), 2 / (n * d) * (S - T), rtol=1e-12)


def test_normalized_losses_are_bounded_and_scale_free():
    fn = make_loss(LossConfig(name="nmse"))
    big = float(fn(torch.tensor(S) * 1e6, torch.tensor(T)))
    assert big == pytest.approx(float(fn(torch.tensor(S), torch.tensor(T))))
    assert 0 <= big <= 4 / S.shape[1]  # |u - v|^2 <= 4 per sample, mean over dims
    zero = float(fn(torch.zeros(2, 5, dtype=torch.float64), torch.tensor(T[:2])))
    assert np.isfinite(zero)


def test_loss_is_a_mean_of_per_sample_terms():
    for name in ("mse", "nmse", "ndmse", "dino"):
        fn = make_loss(LossConfig(name=name))
        whole = float(fn(torch.tensor(S), torch.tensor(T)))
        halves = (float(fn(torch.tensor(S[:2]), torch.tensor(T[:2]))) * 2
                  + float(fn(torch.tensor(S[2:]), torch.tensor(T[2:]))) * 4) / 6
        assert whole == pytest.approx(halves, rel=1e-12)
