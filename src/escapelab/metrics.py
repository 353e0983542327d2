"""Representation metrics as pure functions of a feature matrix (paper Sec. 3).

Conventions
-----------
``X`` has shape (n samples, d features): the paper's X^(l) in R^{d x n}, transposed. It
may be a torch tensor (any device, any float dtype) or a NumPy array. ``labels`` is an
integer vector of length n.

How it is computed
------------------
Everything is derived in float64 from the *smaller* Gram matrix of the exactly
centered data: the d x d matrix (X - mu)^T (X - mu) when d <= n, or the n x n matrix
(X - mu)(X - mu)^T when d > n, each accumulated chunk by chunk (upper block triangle
only, mirrored once) so that no float64 copy of X and no SVD of X is ever formed. The
uncentered Gram follows from it by a rank-one (d <= n) or rank-two (d > n) correction.
When d > n, separability is computed in the span of the data (kernel form), so no
d x d matrix of a wide layer is ever formed. The discriminant's pseudo-inverse is a
Cholesky solve whenever every eigenvalue provably exceeds the cut-off (then the
pseudo-inverse is the inverse), and an eigendecomposition otherwise.

Precision: singular values come from Gram eigenvalues, so values below
sqrt(max(n, d) * eps) * sigma_max (~1e-7 relative) are not resolved and count as zero;
eigenvalues below max(n, d) * eps * lambda_max are set to zero.

Degenerate inputs give defined values: an all-zero X has effective rank 0, condition
number inf and all separability figures 0; a rank-one X has effective rank 1 and
condition number 1; a single class has zero between-class variance and discriminant 0.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray
CHUNK_BYTES = 1 << 27  # 128 MiB of float64 per chunk
EPS = float(torch.finfo(torch.float64).eps)


def _as_tensor(X: ArrayLike) -> Tensor:
    t = torch.as_tensor(X)
    if t.ndim != 2:
        raise ValueError(f"expected a (n, d) feature matrix, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t


def _eigh(matrix: Tensor, vectors: bool) -> tuple[Tensor, Tensor | None]:
    """Symmetric eigendecomposition (ascending); falls back to the CPU if a GPU routine
    fails (GPU solvers can fail to converge on ill-conditioned matrices)."""
    try:
        if vectors:
            values, vecs = torch.linalg.eigh(matrix)
            return values, vecs
        return torch.linalg.eigvalsh(matrix), None
    except (RuntimeError, torch.linalg.LinAlgError):
        if matrix.device.type == "cpu":
            raise
        values, vecs = _eigh(matrix.cpu(), vectors)
        return values.to(matrix.device), None if vecs is None else vecs.to(matrix.device)


def _threshold(values: Tensor, size: int) -> Tensor:
    """Descending, non-negative eigenvalues; those at rounding level set to zero."""
    values = values.flip(0).clamp_min(0.0)
    if values.numel() == 0:
        return values
    tol = size * torch.finfo(torch.float64).eps * float(values[0])
    return torch.where(values > tol, values, torch.zeros_like(values))


def _blocks(size: int) -> list[slice]:
    """Row blocks for the symmetric Gram update: at most 8, of at least 512 rows."""
    count = max(1, min(8, size // 512))
    edges = [round(i * size / count) for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:], strict=False)]


def _add_outer(gram: Tensor, a: Tensor) -> None:
    """gram += a a^T on the upper block triangle only (about half the flops of a full
    product); :func:`_symmetrize` mirrors it once at the end."""
    parts = _blocks(a.shape[0])
    for i, rows in enumerate(parts):
        for cols in parts[i:]:
            gram[rows, cols].addmm_(a[rows], a[cols].T)


def _symmetrize(gram: Tensor) -> None:
    """Mirror the upper block triangle filled by :func:`_add_outer` (diagonal blocks are
    computed whole and are symmetric already)."""
    for i, rows in enumerate(parts := _blocks(gram.shape[0])):
        for cols in parts[i + 1:]:
            gram[cols, rows] = gram[rows, cols].T


def _solve_if_well_conditioned(matrix: Tensor, rhs: Tensor, floor: float) -> Tensor | None:
    """matrix^{-1} rhs when every eigenvalue of the symmetric `matrix` provably exceeds
    `floor` (a Cholesky factorization of matrix - floor * I exists), else None.

    Then no eigenvalue is dropped by the pseudo-inverse, which equals the inverse: one
    Cholesky factorization (n^3 / 3 flops) instead of an eigendecomposition (~9 n^3)."""
    diagonal = matrix.diagonal()  # shifted in place and back: no n x n temporary
    diagonal.sub_(floor)
    factor, info = torch.linalg.cholesky_ex(matrix)
    diagonal.add_(floor)
    if int(info) != 0:
        return None
    del factor
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) != 0:
        return None
    return torch.cholesky_solve(rhs, factor)


def _lambda_max_bound(matrix: Tensor) -> float:
    """An upper bound on the largest eigenvalue of a PSD matrix: min(trace, max row
    sum of absolute values)."""
    return min(float(matrix.trace()), float(matrix.abs().sum(1).max()))


class GramView:
    """A feature matrix X (n, d) seen through its smaller float64 Gram matrix.

    Computes the column mean mu exactly, then the centered Gram (d x d if d <= n, else
    n x n) chunk by chunk, plus what the uncentered Gram needs. All metrics of this
    module are read off it without touching X again, except class sums.
    """

    def __init__(self, X: ArrayLike) -> None:
        x = _as_tensor(X)
        self.x = x
        self.n, self.d = x.shape
        self.device = x.device
        f64 = torch.float64
        self.mean = torch.zeros(self.d, dtype=f64, device=self.device)
        lo = torch.full((self.d,), math.inf, dtype=f64, device=self.device)
        hi = torch.full((self.d,), -math.inf, dtype=f64, device=self.device)
        for rows in self._row_chunks():
            chunk = x[rows].to(f64)
            self.mean += chunk.sum(0)
            lo = torch.minimum(lo, chunk.amin(0))
            hi = torch.maximum(hi, chunk.amax(0))
        self.mean /= max(self.n, 1)
        self.constant = lo == hi  # features without variance: no scatter at all
        self.by_features = self.d <= self.n
        if self.by_features:  # G_c = (X - mu)^T (X - mu), d x d
            self.gram = torch.zeros(self.d, self.d, dtype=f64, device=self.device)
            for rows in self._row_chunks():
                _add_outer(self.gram, (x[rows].to(f64) - self.mean).T)
        else:  # K_c = (X - mu)(X - mu)^T, n x n, and g = (X - mu) mu
            self.gram = torch.zeros(self.n, self.n, dtype=f64, device=self.device)
            self.g = torch.zeros(self.n, dtype=f64, device=self.device)
            for cols in self._col_chunks():
                xc = x[:, cols].to(f64) - self.mean[cols]
                _add_outer(self.gram, xc)
                self.g += xc @ self.mean[cols]
        _symmetrize(self.gram)

    def _row_chunks(self) -> list[slice]:
        step = max(1, CHUNK_BYTES // (8 * max(self.d, 1)))
        return [slice(i, i + step) for i in range(0, self.n, step)]

    def _col_chunks(self) -> list[slice]:
        step = max(1, CHUNK_BYTES // (8 * max(self.n, 1)))
        return [slice(j, j + step) for j in range(0, self.d, step)]

    # -- spectra ------------------------------------------------------------------------

    def gram_eigenvalues(self, center: bool = False) -> Tensor:
        """Eigenvalues of X^T X (or of the centered one), descending, float64, CPU."""
        if self.n == 0 or self.d == 0:
            return torch.zeros(0, dtype=torch.float64)
        if center:
            matrix = self.gram
        elif self.by_features:  # X^T X = G_c + n mu mu^T
            matrix = torch.addr(self.gram, self.mean, self.mean, alpha=self.n)
        else:  # X X^T = K_c + g 1^T + 1 g^T + |mu|^2 1 1^T, built in one new matrix
            matrix = self.gram + self.g[:, None]
            matrix.add_(self.g[None, :]).add_(float(self.mean @ self.mean))
        values, _ = _eigh(matrix, vectors=False)
        return _threshold(values, max(self.n, self.d)).cpu()

    def singular_values(self, center: bool = False) -> Tensor:
        return self.gram_eigenvalues(center).sqrt()

    # -- separability -------------------------------------------------------------------

    def fisher(self, labels: ArrayLike, rtol: float | None = None) -> dict[str, float]:
        """Fisher separability figures; see :func:`fisher_separability`."""
        y = torch.as_tensor(np.asarray(labels)).to(self.device).long()
        if y.shape != (self.n,):
            raise ValueError(f"labels must have shape ({self.n},), got {tuple(y.shape)}")
        if self.n == 0:
            return {"tr_between": 0.0, "tr_within": 0.0, "tr_total": 0.0,
                    "discriminant": 0.0, "discriminant_rank": 0}
        classes, y = torch.unique(y, return_inverse=True)
        onehot = torch.nn.functional.one_hot(y, len(classes)).to(torch.float64)  # (n, C)
        counts = onehot.sum(0)  # (C,)
        n = float(self.n)
        if self.by_features:
            # Class sums of centered features S (C, d); Sigma_b = sum_c S_c S_c^T / (n n_c).
            sums = torch.zeros(len(classes), self.d, dtype=torch.float64, device=self.device)
            for rows in self._row_chunks():
                sums += onehot[rows].T @ (self.x[rows].to(torch.float64) - self.mean)
            scaled = sums / counts.sqrt()[:, None]  # rows S_c / sqrt(n_c)
            tr_total = float(self.gram.trace()) / n
            tr_between = float((scaled * scaled).sum()) / n
            # Constant features have no scatter: dropping them is exact.
            keep = ~self.constant
            scaled = scaled[:, keep]
            within = (self.gram.clone() if bool(keep.all())
                      else self.gram[keep][:, keep])  # Sigma_w, d x d, built in place:
            within.addmm_(scaled.T, scaled, alpha=-1.0).div_(n)
            # The discriminant is invariant to rescaling features, so the cut-off acts on
            # the unit-diagonal D^-1/2 Sigma_w D^-1/2 (D = diag Sigma_w): features in any
            # units count alike, and a full-rank Sigma_w whose ill-conditioning comes from
            # its scales (condition 1e12, features spanning 1e-6) is inverted exactly.
            total_var = self.gram.diagonal()[keep] / n
            diag = within.diagonal().clone()
            # A within-class variance at rounding level of the feature's total variance
            # is unresolved (e.g. a feature constant within every class): zero, dropped.
            live = diag > max(self.n, self.d) * EPS * total_var
            unit = torch.where(live, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
            within.mul_(unit[:, None]).mul_(unit[None, :])
            scaled = scaled * unit[None, :]
            # Rounding in the Gram is relative to the total variance, so a feature whose
            # within-class variance is a small part of it is resolved only that much worse.
            ratio = float((total_var[live] / diag[live]).max()) if bool(live.any()) else 1.0
            top = _lambda_max_bound(within) if keep.any() else 0.0
            floor = top * max(rtol or 0.0, max(self.n, self.d) * EPS * max(ratio, 1.0))
            solved = (_solve_if_well_conditioned(within, scaled.T, floor)
                      if keep.any() and floor > 0 else None)
            if solved is not None:  # tr(Sigma_w^{-1} Sigma_b) = sum_c S_c^T Sigma_w^{-1} S_c / n
                discriminant = float((scaled.T * solved).sum()) / n
                rank = int(keep.sum())
            else:
                values, vecs = _eigh(within, vectors=True)
                assert vecs is not None
                coords = scaled @ vecs  # class-mean directions in Sigma_w's eigenbasis
                # tr(pinv(Sigma_w) Sigma_b) = sum_c sum_k (v_k . S_c)^2 / (n n_c lambda_k)
                inv = _pinv_values(values, floor)
                discriminant = float(((coords * coords) * inv).sum()) / n
                rank = int((inv > 0).sum())
        else:
            # Kernel form. With A (n, C), A_c = 1_c / sqrt(n_c): Sigma_b = X_c^T A A^T X_c / n.
            amat = onehot / counts.sqrt()
            ka = self.gram @ amat  # K_c A, (n, C)
            tr_total = float(self.gram.trace()) / n
            tr_between = float((amat * ka).sum()) / n
            # K_w = (I - P) K_c (I - P), P = A A^T the class-mean projector.
            kw = self.gram.clone()  # (I - P) K_c (I - P), updated in place
            kw.addmm_(amat, amat.T @ kw, alpha=-1.0)
            kw.addmm_(kw @ amat, amat.T, alpha=-1.0)
            # pinv(Sigma_w) = n pinv(W^T W) with W = (I - P) X_c, and W^+ = W^T pinv(K_w),
            # so tr(pinv(Sigma_w) Sigma_b) = || pinv(K_w) (I - P) K_c A ||_F^2.
            rhs = ka - amat @ (amat.T @ ka)  # (I - P) K_c A, (n, C)
            top = _lambda_max_bound(kw)
            floor = max((rtol or 0.0) * top, max(self.n, self.d) * EPS * tr_total * n)
            # K_w vanishes on the class indicators (range of P); on the rest it is
            # usually definite. Then K_w + c P is invertible, and on the range of I - P
            # its inverse is pinv(K_w).
            solved = None
            if floor > 0 and top / self.n > floor:
                kw.addmm_(amat, amat.T, alpha=top / self.n)  # K_w + c P, in place
                solved = _solve_if_well_conditioned(kw, rhs, floor)
                kw.addmm_(amat, amat.T, alpha=-top / self.n)
            if solved is not None:
                discriminant = float((solved * solved).sum())
                rank = self.n - len(classes)
            else:
                values, vecs = _eigh(kw, vectors=True)
                assert vecs is not None
                b = vecs.T @ rhs  # (n, C) in K_w's eigenbasis
                inv = _pinv_values(values, floor)
                discriminant = float(((b * b) * (inv * inv)[:, None]).sum())
                rank = int((inv > 0).sum())
        tr_within = max(tr_total - tr_between, 0.0)
        return {"tr_between": tr_between, "tr_within": tr_within, "tr_total": tr_total,
                "discriminant": discriminant, "discriminant_rank": rank}



def _pinv_values(values: Tensor, floor: float) -> Tensor:
    """1 / lambda for the eigenvalues kept by the pseudo-inverse (those above `floor`,
    and only if some eigenvalue is positive), else 0."""
    top = float(values.max()) if values.numel() else 0.0
    keep = values > floor if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    return torch.where(keep, 1.0 / torch.where(keep, values, torch.ones_like(values)),
                       torch.zeros_like(values))


# ---------------------------------------------------------------------------------------
# The public metric functions


def singular_values(X: ArrayLike, center: bool = False) -> Tensor:
    """Singular values (min(n, d),) of X (column-centered if `center`), float64,
    descending, from the smaller Gram matrix."""
    return GramView(X).singular_values(center)


def effective_rank_from_singular_values(s: ArrayLike) -> float:
    """exp(H(p)), p_k = s_k / sum_j s_j (Roy & Vetterli 2007; paper Sec. 3).

    Singular values, not their squares, as in the paper (RankMe uses squares). An
    all-zero spectrum has effective rank 0 by convention (no direction carries signal).
    """
    s64 = torch.as_tensor(s, dtype=torch.float64)
    total = float(s64.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0
    p = s64[s64 > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def effective_rank(X: ArrayLike, center: bool = False) -> float:
    """Effective rank of X (n, d): exp of the entropy of its normalized singular values.
    1 for rank one, min(n, d) for orthogonal rows of equal norm, 0 for all zeros."""
    return effective_rank_from_singular_values(singular_values(X, center=center))


def condition_number_from_singular_values(s: ArrayLike, mass: float = 0.999) -> float:
    """sigma_max / sigma'_min, where sigma'_min = s_k at the smallest k whose cumulative
    share sum_{j<=k} s_j / sum_j s_j reaches `mass` (paper Sec. 3: 99.9%).

    A spectrum with one non-zero value gives 1; an all-zero spectrum gives inf.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    s64 = torch.as_tensor(s, dtype=torch.float64).sort(descending=True).values
    total = float(s64.sum())
    if total <= 0 or not math.isfinite(total):
        return math.inf
    cumulative = torch.cumsum(s64 / total, 0)
    k = int(torch.searchsorted(cumulative, torch.tensor([mass], dtype=torch.float64)))
    k = min(k, len(s64) - 1)
    return float(s64[0] / s64[k])


def condition_number(X: ArrayLike, mass: float = 0.999, center: bool = False) -> float:
    """Condition number of X (n, d) at `mass` of the singular-value mass; see
    :func:`condition_number_from_singular_values`."""
    return condition_number_from_singular_values(singular_values(X, center=center), mass)


def dead_units(X: ArrayLike) -> int:
    """Number of features (columns of X) that are exactly zero on every sample: the
    paper's dead neurons (Sec. 3, Fig. 2b). For conv layers pass X with one column per
    channel-and-position (C*H*W), as the paper does, or reduce per channel first."""
    t = _as_tensor(X)
    return int((t == 0).all(dim=0).sum())


def fisher_separability(X: ArrayLike, labels: ArrayLike, rtol: float | None = None,
                        ) -> dict[str, float]:
    """Fisher separability of X (n, d) under integer labels (n,) (paper Sec. 3, Fig. 3).

    With mu the mean, mu_c the class means and n_c the class sizes, all normalized by
    1/n (Duda, Hart & Stork, ch. 4.11):

    - ``tr_total``   = tr(Sigma_t), Sigma_t = (1/n) sum_i (x_i - mu)(x_i - mu)^T
    - ``tr_between`` = tr(Sigma_b), Sigma_b = (1/n) sum_c n_c (mu_c - mu)(mu_c - mu)^T
    - ``tr_within``  = tr(Sigma_w), Sigma_w = (1/n) sum_c sum_{i in c} (x_i - mu_c)(...)^T
      (Sigma_t = Sigma_w + Sigma_b)
    - ``discriminant`` = tr(pinv(Sigma_w) Sigma_b). When d <= n the pseudo-inverse is
      taken of the unit-diagonal D^-1/2 Sigma_w D^-1/2 (D = diag Sigma_w; the
      discriminant does not change under feature scaling), dropping eigenvalues below
      the Gram route's resolution, max(n, d) * eps * max_i(Sigma_t,ii / Sigma_w,ii)
      times the largest, or below ``rtol`` times it if given. When d > n it is computed
      in the span of the data, dropping eigenvalues of K_w below max(n, d) * eps *
      n tr(Sigma_t) (or ``rtol`` times the largest). 0 when Sigma_w = 0.
    - ``discriminant_rank``: how many eigen-directions the pseudo-inverse kept.
    """
    return GramView(X).fisher(labels, rtol)


def linear_cka(X: ArrayLike, Y: ArrayLike, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) between X (n, d1) and Y (n, d2), rows the same
    n samples; both are centered first:

        CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),  K = X_c X_c^T, L = Y_c Y_c^T,

    where the (biased) HSIC(K, L) ~ tr(K L) = ||X_c^T Y_c||_F^2. In [0, 1]; 1 for
    identical features; invariant to orthogonal transforms and isotropic scaling of
    either input, not to general linear maps. ``debiased``: the unbiased HSIC estimator
    of Song et al. (2012) instead (Nguyen, Raghu & Kornblith 2021), which removes the
    bias of CKA toward 1 for wide features on few samples (it can then fall slightly
    below 0 for unrelated features); with a_i = ||x_c,i||^2 and
    b_i = ||y_c,i||^2 it reduces on centered features to

        n (n - 3) HSIC_u(K, L) = tr(K L) - n/(n-2) a.b + (sum a)(sum b) / ((n-1)(n-2))

    (reference.py writes out Song's formula on the uncentered Gram matrices). NaN if
    either input has no variance (or, debiased, n < 4).

    Float64, from the smaller Gram matrices: the d1 x d2 cross-covariance and the d x d
    covariances when d1, d2 <= n (row chunks), else the n x n Gram matrices (column
    chunks); no float64 copy of X or Y is formed.
    """
    x, y = _as_tensor(X), _as_tensor(Y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same rows (samples), got {x.shape[0]} "
                         f"and {y.shape[0]}")
    n = x.shape[0]
    if n < (4 if debiased else 2):
        return math.nan
    y = y.to(x.device)
    mx, my = _column_mean(x), _column_mean(y)
    if max(x.shape[1], y.shape[1]) <= n:  # feature route: covariances
        cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
        gx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        gy = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64, device=x.device)
        a = torch.zeros(n, dtype=torch.float64, device=x.device)
        b = torch.zeros_like(a)
        step = max(1, CHUNK_BYTES // (8 * max(x.shape[1], y.shape[1], 1)))
        for i in range(0, n, step):
            xc = x[i:i + step].to(torch.float64) - mx
            yc = y[i:i + step].to(torch.float64) - my
            cross.addmm_(xc.T, yc)
            gx.addmm_(xc.T, xc)
            gy.addmm_(yc.T, yc)
            a[i:i + step] = (xc * xc).sum(1)
            b[i:i + step] = (yc * yc).sum(1)
        kl, kk, ll = (float((m * m).sum()) for m in (cross, gx, gy))
    else:  # sample route: n x n Gram matrices
        gx, a = _sample_gram(x, mx)
        gy, b = _sample_gram(y, my)
        kl, kk, ll = (float((p * q).sum()) for p, q in ((gx, gy), (gx, gx), (gy, gy)))
    if debiased:
        sa, sb = float(a.sum()), float(b.sum())
        kl = kl - n / (n - 2) * float(a @ b) + sa * sb / ((n - 1) * (n - 2))
        kk = kk - n / (n - 2) * float(a @ a) + sa * sa / ((n - 1) * (n - 2))
        ll = ll - n / (n - 2) * float(b @ b) + sb * sb / ((n - 1) * (n - 2))
    if not (kk > 0 and ll > 0):
        return math.nan
    return kl / math.sqrt(kk * ll)


def _column_mean(x: Tensor) -> Tensor:
    """The float64 column mean (d,) of x (n, d), row chunk by row chunk."""
    n, d = x.shape
    mean = torch.zeros(d, dtype=torch.float64, device=x.device)
    step = max(1, CHUNK_BYTES // (8 * max(d, 1)))
    for i in range(0, n, step):
        mean += x[i:i + step].to(torch.float64).sum(0)
    return mean / max(n, 1)


def _sample_gram(x: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """(K_c = (X - mu)(X - mu)^T (n, n), its diagonal) in float64, by column chunks."""
    n, d = x.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=x.device)
    step = max(1, CHUNK_BYTES // (8 * max(n, 1)))
    for j in range(0, d, step):
        xc = x[:, j:j + step].to(torch.float64) - mean[j:j + step]
        gram.addmm_(xc, xc.T)
    return gram, gram.diagonal().clone()


def kmeans_labels(X: ArrayLike, k: int, seed: int = 0, n_init: int = 4,
                  max_iter: int = 300, tol: float = 1e-4,
                  solver: Literal["torch", "sklearn"] = "torch") -> np.ndarray:
    """Cluster assignments (n,) of k-means on X: labels for the label-free separability
    variant (paper footnote 1).

    scikit-learn's algorithm and settings (greedy k-means++ seeding with 2 + log k trials
    per centre, Lloyd iterations until the labels stop changing or the centres move less
    than `tol` x the mean feature variance, the best of `n_init` seedings by inertia,
    labels re-assigned to the final centres), computed in torch on X's device and in
    X's floating dtype: features of 10,000 images x 65,536 units stay on the GPU instead
    of going to scikit-learn as a 5 GB float64 array. ``solver="sklearn"`` is
    scikit-learn's :class:`~sklearn.cluster.KMeans` itself (float64, on the CPU), the
    reference. The two draw different random seedings, so on data without a clear
    cluster structure they may stop in different local optima of similar inertia."""
    if solver == "sklearn":
        from sklearn.cluster import KMeans

        x64 = _as_tensor(X).detach().to(torch.float64).cpu().numpy()
        k = max(1, min(k, len(x64)))
        return np.asarray(KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol,
                                 random_state=seed).fit_predict(x64))
    x = _as_tensor(X).detach()
    k = max(1, min(k, len(x)))
    generator = torch.Generator().manual_seed(seed)
    sq = torch.linalg.vector_norm(x, dim=1).square()  # no n x d temporary
    threshold = tol * float(x.var(0, unbiased=False).mean()) if len(x) > 1 else 0.0
    best: tuple[float, Tensor] | None = None
    for _ in range(n_init):
        centers = _kmeans_plus_plus(x, sq, k, generator)
        inertia, labels = _lloyd(x, sq, centers, max_iter, threshold)
        if best is None or inertia < best[0]:
            best = (inertia, labels)
    assert best is not None
    return best[1].cpu().numpy()


def _sq_distances(x: Tensor, sq: Tensor, centers: Tensor) -> Tensor:
    """(n, m) squared Euclidean distances of the rows of x to `centers` (m, d)."""
    d2 = sq[:, None] - 2 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
    return d2.clamp_(min=0)


def _kmeans_plus_plus(x: Tensor, sq: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Greedy k-means++: each new centre is the best (lowest potential) of 2 + log k
    points drawn with probability proportional to their squared distance to the
    nearest centre so far (drawn on the CPU, from `generator`)."""
    n = len(x)
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = _sq_distances(x, sq, x[chosen])[:, 0]
    for _ in range(1, k):
        weights = closest.to("cpu", torch.float64)
        if not float(weights.sum()) > 0:  # every point sits on a centre already
            weights = torch.ones(n, dtype=torch.float64)
        candidates = torch.multinomial(weights, trials, replacement=True,
                                       generator=generator)
        merged = torch.minimum(closest[:, None],
                               _sq_distances(x, sq, x[candidates.to(x.device)]))
        pick = int(merged.sum(0).argmin())
        closest = merged[:, pick]
        chosen.append(int(candidates[pick]))
    return x[chosen].clone()


def _lloyd(x: Tensor, sq: Tensor, centers: Tensor, max_iter: int,
           threshold: float) -> tuple[float, Tensor]:
    """Lloyd iterations from `centers`: (inertia, labels) at the final centres. A
    cluster left empty takes the point farthest from its centre, as scikit-learn does."""
    k = len(centers)
    labels = None
    for _ in range(max_iter):
        d2 = _sq_distances(x, sq, centers)
        new_labels = d2.argmin(1)
        if labels is not None and bool((new_labels == labels).all()):
            break  # strict convergence
        labels = new_labels
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        if x.device.type == "cpu":  # n x d additions; deterministic on the CPU
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
        else:  # GPU atomic adds would make the labels depend on the run
            sums = torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = d2.gather(1, labels[:, None])[:, 0].argsort(descending=True)[:len(empty)]
            for cluster, point in zip(empty.tolist(), far.tolist(), strict=True):
                old = int(labels[point])  # the point leaves its cluster for the empty one
                if counts[old] <= 1:
                    continue
                sums[old] -= x[point]
                counts[old] -= 1
                sums[cluster], counts[cluster] = x[point], 1
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= threshold:
            break
    d2 = _sq_distances(x, sq, centers)
    best, labels = d2.min(1)
    return float(best.sum()), labels


def layer_summary(X: ArrayLike, labels: ArrayLike | None = None, center: bool = False,
                  mass: float = 0.999, rtol: float | None = None) -> dict[str, Any]:
    """Effective rank, condition number and (with labels) Fisher separability of one
    layer's features, sharing one Gram matrix."""
    view = GramView(X)
    s = view.singular_values(center)
    out: dict[str, Any] = {
        "erank": effective_rank_from_singular_values(s),
        "condition_number": condition_number_from_singular_values(s, mass),
    }
    if labels is not None:
        out.update(view.fisher(labels, rtol))
    return out
