"""Representation metrics as pure functions of a feature matrix.

Conventions: ``X`` has shape (n samples, d features) (the paper writes its transpose,
X in R^{d x n}); it may be a torch tensor or a NumPy array, on any device. Spectra are
computed in float64 from the smaller Gram matrix (n x n or d x d), never from an SVD of
a large n x d matrix.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_tensor(X: ArrayLike) -> Tensor:
    t = torch.as_tensor(X)
    if t.ndim != 2:
        raise ValueError(f"expected a (n, d) feature matrix, got shape {tuple(t.shape)}")
    return t


def singular_values(X: ArrayLike, center: bool = False) -> Tensor:
    """Singular values (min(n, d),) of X in float64, descending.

    Computed as square roots of the eigenvalues of the smaller Gram matrix (X X^T or
    X^T X), accumulated in float64; eigenvalues below the Gram matrix's rounding level
    (size * eps * lambda_max) are set to zero.
    """
    t = _as_tensor(X).to(torch.float64)
    if center:
        t = t - t.mean(dim=0, keepdim=True)
    n, d = t.shape
    if n == 0 or d == 0:
        return torch.zeros(0, dtype=torch.float64)
    gram = t @ t.T if n <= d else t.T @ t
    eig = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    tol = max(n, d) * torch.finfo(torch.float64).eps * float(eig[0])
    eig = torch.where(eig > tol, eig, torch.zeros_like(eig))
    return eig.sqrt().cpu()


def effective_rank_from_singular_values(s: ArrayLike) -> float:
    """exp(H(p)), p_k = s_k / sum_j s_j (Roy & Vetterli 2007; paper Sec. 3).

    Singular values, not their squares, as in the paper. An all-zero spectrum has
    effective rank 0 by convention (no direction carries signal).
    """
    s64 = torch.as_tensor(s, dtype=torch.float64)
    total = float(s64.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0
    p = s64[s64 > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(X: ArrayLike, center: bool = False) -> float:
    """Effective rank of the (n, d) feature matrix X (optionally column-centered)."""
    return effective_rank_from_singular_values(singular_values(X, center=center))


def dead_units(X: ArrayLike) -> int:
    """Number of features (columns of the (n, d) matrix X) that are exactly zero on
    every sample, the paper's dead-neuron count (Sec. 3, Fig. 2b)."""
    t = _as_tensor(X)
    return int((t == 0).all(dim=0).sum())
