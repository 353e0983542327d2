"""Plain float64 NumPy versions of escapelab's formulas: the readable references that
the tests and benchmarks compare the fast routes against.

Nothing here is used by escapelab itself. Each function is the textbook computation,
written for clarity (full SVDs, explicit covariance matrices, ``numpy.linalg.pinv``,
losses and the linear probe's objective from their formulas), so that a reader can
check the optimized code in :mod:`escapelab.metrics`, :mod:`escapelab.losses` and
:mod:`escapelab.probe` against something obvious. They need O(d^2) memory or more: fine
for tests, not for VGG-sized layers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EPS = float(np.finfo(np.float64).eps)


# -- spectra (paper Sec. 3) ----------------------------------------------------------------


def singular_values(x: Any, center: bool = False) -> np.ndarray:
    """Singular values of X (n, d) by a full SVD, at the Gram route's documented
    resolution: those below sqrt(max(n, d) eps) s_max count as zero."""
    x = np.asarray(x, dtype=np.float64)
    if center:
        x = x - x.mean(axis=0)
    s = np.linalg.svd(x, compute_uv=False)
    if s.size:
        s[s <= math.sqrt(max(x.shape) * EPS) * s[0]] = 0.0
    return s


def effective_rank(x: Any, center: bool = False) -> float:
    """exp(entropy of s / sum s) (Roy & Vetterli); 0 for an all-zero X."""
    s = singular_values(x, center)
    if s.sum() == 0:
        return 0.0
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def condition_number(x: Any, mass: float = 0.999, center: bool = False) -> float:
    """s_max / s_k, k the first index whose cumulative share of sum s reaches `mass`."""
    s = singular_values(x, center)
    if s.sum() == 0:
        return math.inf
    cum = np.cumsum(s / s.sum())
    k = int(np.argmax(cum >= mass)) if (cum >= mass).any() else len(s) - 1
    return float(s[0] / s[k])


# -- Fisher separability (paper Sec. 3, Fig. 3) --------------------------------------------


def scatter_matrices(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Sigma_t, Sigma_b, Sigma_w), each normalized by 1/n, by their definitions."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    n, d = x.shape
    mu = x.mean(axis=0)
    total = (x - mu).T @ (x - mu) / n
    between = np.zeros((d, d))
    within = np.zeros((d, d))
    for c in np.unique(y):
        xc = x[y == c]
        mc = xc.mean(axis=0)
        between += len(xc) * np.outer(mc - mu, mc - mu) / n
        within += (xc - mc).T @ (xc - mc) / n
    return total, between, within


def pinv_spectrum(x: Any, y: Any, rtol: float | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(eigenvalues, eigenvectors, Sigma_b in the same basis, absolute cut-off) of the
    matrix whose pseudo-inverse defines the discriminant, as documented in
    :func:`escapelab.metrics.fisher_separability`:

    - d <= n: the unit-diagonal D^-1/2 Sigma_w D^-1/2 (D = diag Sigma_w; features whose
      within-class variance is below max(n, d) eps of their total variance are
      dropped), cut at
      max(n, d) eps max_i(Sigma_t,ii / Sigma_w,ii) (or `rtol`) times its largest
      eigenvalue;
    - d > n: Sigma_w itself, cut at max(n, d) eps tr(Sigma_t) (or `rtol` times its
      largest eigenvalue, if that is more).
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    total, between, within = scatter_matrices(x, y)
    if d <= n:
        diag = np.diag(within).copy()
        live = diag > max(n, d) * EPS * np.diag(total)  # else unresolved: dropped
        unit = np.where(live, 1.0 / np.sqrt(np.where(live, diag, 1.0)), 0.0)
        within = within * np.outer(unit, unit)
        between = between * np.outer(unit, unit)
        ratio = max(1.0, float((np.diag(total)[live] / diag[live]).max())) \
            if live.any() else 1.0
        values, vectors = np.linalg.eigh(within)
        top = float(values.max()) if values.size else 0.0
        cut = top * max(rtol or 0.0, max(n, d) * EPS * ratio)
    else:
        values, vectors = np.linalg.eigh(within)
        top = float(values.max()) if values.size else 0.0
        cut = max((rtol or 0.0) * top, max(n, d) * EPS * float(np.trace(total)))
    return values, vectors, between, cut


def discriminant(x: Any, y: Any, rtol: float | None = None) -> tuple[float, int]:
    """(tr(pinv(Sigma_w) Sigma_b), eigen-directions kept) from explicit covariance
    matrices and an eigendecomposition (see :func:`pinv_spectrum` for the cut-off)."""
    values, vectors, between, cut = pinv_spectrum(x, y, rtol)
    keep = values > cut if values.size and values.max() > 0 else \
        np.zeros_like(values, dtype=bool)
    inv = vectors[:, keep] @ np.diag(1.0 / values[keep]) @ vectors[:, keep].T
    return float(np.trace(inv @ between)), int(keep.sum())


def fisher(x: Any, y: Any, rtol: float | None = None) -> dict[str, float]:
    """The four separability figures plus the rank kept, by their definitions."""
    total, between, within = scatter_matrices(x, y)
    disc, rank = discriminant(x, y, rtol)
    return {"tr_between": float(np.trace(between)), "tr_within": float(np.trace(within)),
            "tr_total": float(np.trace(total)), "discriminant": disc,
            "discriminant_rank": rank}


# -- similarity (linear CKA) -----------------------------------------------------------------


def hsic(k: np.ndarray, l_: np.ndarray) -> float:
    """Biased HSIC of two n x n kernel matrices: tr(K H L H) / (n - 1)^2, H = I - 11^T/n
    (Gretton et al. 2005)."""
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l_ @ h)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l_: np.ndarray) -> float:
    """Song et al. (2012)'s unbiased HSIC, with K~, L~ the kernels with zeroed diagonal:
    [tr(K~ L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n (n-3))."""
    n = len(k)
    kt = k - np.diag(np.diag(k))
    lt = l_ - np.diag(np.diag(l_))
    one = np.ones(n)
    return float(np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * (one @ kt @ lt @ one)) / (n * (n - 3))


def linear_cka(x: Any, y: Any, debiased: bool = False) -> float:
    """HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with the linear kernels K = X X^T and
    L = Y Y^T of the raw (uncentered) features: HSIC centers them itself (biased) or
    does not need to (unbiased, translation invariant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    k, l_ = x @ x.T, y @ y.T
    f = hsic_unbiased if debiased else hsic
    return f(k, l_) / math.sqrt(f(k, k) * f(l_, l_))


# -- losses (paper Sec. 2 and App. A) -------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


LOSSES = {
    "mse": lambda s, t: float(np.mean((s - t) ** 2)),
    "nmse": lambda s, t: float(np.mean((unit_rows(s) - unit_rows(t)) ** 2)),
    "ndmse": lambda s, t: float(np.mean((unit_rows(s) - unit_rows(t)) ** 2)),
    "dino": lambda s, t: float(-np.mean(np.sum(np.exp(log_softmax(t / 0.04))
                                               * log_softmax(s / 0.1), axis=1))),
}
"""Escape losses of student outputs s and teacher outputs t (n, d), from their formulas
(ndmse equals nmse in value; only its gradient differs)."""


# -- linear probe (escapelab.probe) ---------------------------------------------------------


def _logits(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray) -> np.ndarray:
    z = x @ coef.T + intercept
    if coef.shape[0] == 1:  # two classes: one binomial row; class 0's logit is 0
        z = np.hstack([np.zeros((len(x), 1)), z])
    return z


def logistic_objective(coef: Any, intercept: Any, x: Any, y: Any, C: float) -> float:
    """scikit-learn's ``LogisticRegression(C)`` objective C sum_i CE_i + ||coef||_F^2 / 2,
    divided by C n: mean cross-entropy + ||coef||_F^2 / (2 C n), intercept unpenalized.

    coef (K, d) and intercept (K,), or (1, d) and (1,) for two classes (scikit-learn's
    binomial model, whose row is the second class's logit); x (n, d); y (n,) class
    indices 0..K-1."""
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    z = _logits(coef, intercept, x)
    return float(np.mean(-log_softmax(z)[np.arange(len(y)), y])
                 + np.sum(coef**2) / (2 * C * len(y)))


def logistic_gradient(coef: Any, intercept: Any, x: Any, y: Any, C: float,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of :func:`logistic_objective` with respect to coef and intercept."""
    coef, intercept = np.asarray(coef, np.float64), np.asarray(intercept, np.float64)
    x, y = np.asarray(x, np.float64), np.asarray(y)
    z = _logits(coef, intercept, x)
    resid = np.exp(log_softmax(z))
    resid[np.arange(len(y)), y] -= 1.0
    resid = resid[:, resid.shape[1] - coef.shape[0]:] / len(y)
    return resid.T @ x + coef / (C * len(y)), resid.sum(axis=0)
