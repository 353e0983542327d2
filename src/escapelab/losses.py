"""Losses as pure functions of (student output, target).

Escape losses compare the student's head output ``s`` (B, D) with the frozen
teacher's ``t`` (B, D); supervised losses compare logits (B, K) with labels (B,).
Every loss is a mean over the batch of per-sample terms, so that micro-batches
weighted by their share of the batch accumulate to exactly the batch's gradient.

MSE follows the paper's convention: mean over batch *and* output dimensions.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from escapelab.config import LossConfig

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse(s: Tensor, t: Tensor) -> Tensor:
    """mean_{i,d} (s_id - t_id)^2 over (B, D)."""
    return (s - t).pow(2).mean()


def _unit(x: Tensor, eps: float, detach: bool) -> Tensor:
    norm = x.norm(dim=1, keepdim=True)
    if detach:
        norm = norm.detach()
    return x / norm.clamp_min(eps)


def nmse(s: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """N-MSE (paper Sec. 2): MSE between per-sample L2-normalized outputs,
    ``mse(s / ||s||, t / ||t||)``; the student's norm is inside the graph."""
    return mse(_unit(s, eps, detach=False), _unit(t, eps, detach=True))


def ndmse(s: Tensor, t: Tensor, eps: float = 1e-12) -> Tensor:
    """ND-MSE (paper App. A): as N-MSE, but the student's norm is treated as a constant
    in backprop (``s / ||s||.detach()``), as BatchNorm and LayerNorm do with statistics."""
    return mse(_unit(s, eps, detach=True), _unit(t, eps, detach=True))


def dino(s: Tensor, t: Tensor, student_temp: float = 0.1, teacher_temp: float = 0.04) -> Tensor:
    """DINO-style cross-entropy ``-sum_d softmax(t / tau_t)_d log softmax(s / tau_s)_d``,
    mean over the batch (no centering, no EMA: the teacher is frozen)."""
    target = F.softmax(t.detach() / teacher_temp, dim=1)
    return -(target * F.log_softmax(s / student_temp, dim=1)).sum(dim=1).mean()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Supervised cross-entropy on class logits (B, K) and integer labels (B,)."""
    return F.cross_entropy(logits, labels)


def onehot_mse(logits: Tensor, labels: Tensor) -> Tensor:
    """Supervised MSE against one-hot labels, mean over batch and classes."""
    return mse(logits, F.one_hot(labels, logits.shape[1]).to(logits.dtype))


def make_loss(cfg: LossConfig) -> LossFn:
    """The loss named by ``cfg.name`` with its parameters bound."""
    table: dict[str, LossFn] = {
        "mse": mse,
        "nmse": partial(nmse, eps=cfg.norm_eps),
        "ndmse": partial(ndmse, eps=cfg.norm_eps),
        "dino": partial(dino, student_temp=cfg.student_temp, teacher_temp=cfg.teacher_temp),
        "ce": cross_entropy,
        "onehot_mse": onehot_mse,
    }
    return table[cfg.name]

