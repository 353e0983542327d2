"""Sharpness: the top eigenvalues of the training loss's Hessian during a run.

Gradient descent with step size eta is linearly stable along a direction of curvature
lambda only while lambda < 2 / eta; full-batch GD on neural networks typically drives
the top eigenvalue up to that edge and hovers there ("edge of stability", Cohen et al.
2021; paper Sec. 4 asks whether the escape relates to it). This module measures the
top-k eigenvalues of

    H(theta) = d^2/dtheta^2  sum_m (|b_m| / n) L(f_theta(x_{b_m}), t_{b_m}),

the exact training loss (same loss function, same mean normalization) on a fixed subset
of n training images split into micro-batches b_m, with targets made exactly as
:func:`escapelab.train.accumulate_gradient` makes them: the teacher's outputs on the
same micro-batch (or the cached outputs, or labels for supervised losses).

How
---
- Hessian-vector products by double backward: g = dL/dtheta with ``create_graph``, then
  Hv = d(g . v)/dtheta, summed over micro-batches (:func:`hessian_vector_product`).
  The reference notes measured one product at ~2.6x the cost of a gradient.
- Lanczos with full re-orthogonalization and explicit Rayleigh-Ritz: the products
  W = H V of the orthonormal Krylov basis V are kept, the projected matrix is
  T = V^T W (float64), and each Ritz pair (theta, y = V s) has its *true* residual
  ||H y - theta y|| = ||W s - theta V s||, no extra product needed. It stops once the
  top-k residuals are at most ``tol * |theta_1|`` (then an eigenvalue lies within that
  distance of theta, usually within tol^2 relative), or after ``max_hvp`` products.
- Warm start: a measurement starts from the previous measurement's eigenvectors mixed
  with an equal share of a fresh random vector (:func:`start_vector`). The random share
  keeps a new top direction orthogonal to the old ones as visible as in a cold start:
  from the old eigenvectors alone, a direction that has just overtaken them would have
  a tiny residual and could be reported as the top one.
- At the teacher, squared losses (mse, nmse, ndmse) have zero residual: dL/ds = 0 at
  s = t, so the second-order term sum_i dL/ds_i d^2 s_i/dtheta^2 vanishes and H equals
  its Gauss-Newton part J^T H_out J (J = ds/dtheta, H_out = d^2L/ds^2). lambda_0 is
  computed there with Gauss-Newton products (:func:`gauss_newton_vector_product`, a
  forward-mode jvp then a vjp):
  PSD by construction, and exactly the Hessian even though loss and gradient are 0
  (a float32 student that equals its teacher has a zero loss but not a zero Hessian).
  Away from the teacher the two differ (the tests show by how much for N-MSE).

ND-MSE divides by the *detached* output norm, so "its Hessian" is the Hessian of the
loss autograd differentiates: the norm frozen at its current value. At the teacher
this is also the Jacobian of the update map (the dropped terms multiply the residual).

Costs: each product is a forward and two backward passes over the subset; the basis
and its products take 2 x max_hvp parameter-sized vectors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.func import functional_call

from escapelab.config import SharpnessConfig
from escapelab.data import stratified_subset
from escapelab.losses import LossFn
from escapelab.models import EscapeNet

GAUSS_NEWTON_LOSSES = ("mse", "nmse", "ndmse")  # squared losses: zero residual at the teacher
WARM_SHARE = 0.5  # weight of the old eigenvectors in a warm start (the rest: random)

MatVec = Callable[[Tensor], Tensor]  # a symmetric operator on flat vectors (n,)


# ---------------------------------------------------------------------------------------
# The operator: fixed micro-batches of the subset and two products on a flat vector


@dataclass
class Chunks:
    """The subset as micro-batches: inputs, targets and weights |b_m| / n (summing
    to 1), so that sum_m w_m L(b_m) is the subset's mean loss."""

    x: list[Tensor]
    targets: list[Tensor]
    weights: list[float]

    @classmethod
    def build(cls, x: Tensor, idx: Tensor, targets: Tensor | None, teacher: EscapeNet,
              micro_batch: int) -> Chunks:
        """Targets as in ``accumulate_gradient``: `targets[chunk]` (labels or cached
        teacher outputs) or, when None, the teacher's outputs on the same micro-batch
        (same batch shape as the student's forward, so the same float32 rounding)."""
        xs, ts, ws = [], [], []
        for chunk in idx.split(micro_batch):
            xb = x[chunk]
            if targets is not None:
                target = targets[chunk]
            else:
                with torch.no_grad():
                    target = teacher(xb)
            xs.append(xb)
            ts.append(target)
            ws.append(len(chunk) / len(idx))
        return cls(xs, ts, ws)


def _leaves(model: EscapeNet) -> dict[str, Tensor]:
    """The model's parameters as fresh leaves (shared storage): products never touch
    the model's ``.grad`` and work on a frozen teacher too."""
    return {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in like]), like,
                                                 strict=True)]


def _flat(parts: list[Tensor | None], like: list[Tensor]) -> Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(parts, like, strict=True)])


def hessian_vector_product(model: EscapeNet, chunks: Chunks, loss_fn: LossFn, v: Tensor,
                           ) -> tuple[Tensor, float]:
    """(H v, subset loss) for a flat vector v (n_params,), by double backward per
    micro-batch: Hv = d/dtheta (dL/dtheta . v)."""
    params = _leaves(model)
    plist = list(params.values())
    vs = _split(v, plist)
    out = torch.zeros_like(v)
    loss_sum = 0.0
    for xb, target, w in zip(chunks.x, chunks.targets, chunks.weights, strict=True):
        loss = loss_fn(functional_call(model, params, (xb,)), target) * w
        grads = torch.autograd.grad(loss, plist, create_graph=True)
        dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True))
        assert isinstance(dot, Tensor)
        out += _flat(list(torch.autograd.grad(dot, plist, allow_unused=True)), plist)
        loss_sum += float(loss.detach())
    return out, loss_sum


def gauss_newton_vector_product(model: EscapeNet, chunks: Chunks, loss_fn: LossFn,
                                v: Tensor) -> tuple[Tensor, float]:
    """(G v, subset loss), G = sum_m w_m J_m^T H_out,m J_m the Gauss-Newton matrix of
    the loss at the model's outputs s (J = ds/dtheta, H_out = d^2 L / ds^2).

    One forward pass carries the tangent v (forward-mode AD: s and J v together) and
    records the graph for the vjp; H_out (J v) is a double backward through the loss
    alone; J^T of that is one backward pass."""
    params = _leaves(model)
    plist = list(params.values())
    vs = _split(v, plist)
    out = torch.zeros_like(v)
    loss_sum = 0.0
    for xb, target, w in zip(chunks.x, chunks.targets, chunks.weights, strict=True):
        with fwAD.dual_level():
            duals = {name: fwAD.make_dual(p, t) for (name, p), t in zip(params.items(), vs,
                                                                          strict=True)}
            s, jv = fwAD.unpack_dual(functional_call(model, duals, (xb,)))  # (B, D) each
        s_leaf = s.detach().requires_grad_(True)
        loss = loss_fn(s_leaf, target) * w
        g_s = torch.autograd.grad(loss, s_leaf, create_graph=True)[0]
        h_jv = torch.autograd.grad(g_s, s_leaf, grad_outputs=jv)[0]
        out += _flat(list(torch.autograd.grad(s, plist, grad_outputs=h_jv,
                                              allow_unused=True)), plist)
        loss_sum += float(loss.detach())
    return out, loss_sum


# ---------------------------------------------------------------------------------------
# Lanczos on a symmetric operator


@dataclass
class Eigen:
    """Top-k eigenpairs of a symmetric operator, largest first."""

    values: list[float]
    vectors: Tensor  # (k, n), unit rows
    residuals: list[float]  # ||A y - theta y|| per pair, y unit
    products: int
    converged: bool


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def lanczos(matvec: MatVec, start: Tensor, k: int = 1, tol: float = 1e-3,
            max_products: int = 20, generator: torch.Generator | None = None) -> Eigen:
    """The k largest (algebraic) eigenpairs of the symmetric operator `matvec` by
    Lanczos from `start`, with full re-orthogonalization (twice, classical
    Gram-Schmidt) and explicit Rayleigh-Ritz on T = V^T A V.

    Stops when every top-k Ritz pair has ||A y - theta y|| <= tol * |theta_1|, after
    `max_products` products (``converged`` False), or when the basis spans the space;
    a non-finite product gives NaN eigenvalues.
    An invariant subspace found early (the Krylov sequence ends) is continued from a
    random vector orthogonal to it, so that eigenvalues outside it can still be found.
    """
    n = start.numel()
    limit = min(max_products, n)
    basis: list[Tensor] = []
    images: list[Tensor] = []
    proj = np.zeros((limit, limit))
    q = start / start.norm()
    values = np.zeros(0)
    coeffs = np.zeros((0, 0))
    residuals: list[float] = []
    for j in range(limit):
        basis.append(q)
        w = matvec(q)
        if not bool(torch.isfinite(w).all()):  # a diverged network: nothing to measure
            nan = [math.nan] * k
            return Eigen(nan, torch.full((k, n), math.nan).to(start), nan, j + 1, False)
        images.append(w)
        for i, v in enumerate(basis):  # T_ij = v_i . A v_j (upper triangle, mirrored)
            proj[i, j] = proj[j, i] = _dot(v, w)
        values, coeffs = np.linalg.eigh(proj[:j + 1, :j + 1])
        top = np.argsort(values)[::-1][:k]
        values, coeffs = values[top], coeffs[:, top]
        residuals = [_residual(basis, images, coeffs[:, c], values[c])
                     for c in range(len(top))]
        scale = abs(values[0]) if len(values) else 0.0
        if len(top) == k and max(residuals) <= tol * scale:
            return _eigen(basis, values, coeffs, residuals, j + 1, True)
        if j + 1 == limit:
            break
        q = _orthogonalize(w, basis)
        if q.norm() <= 1e-8 * max(scale, _norm(w)):  # invariant subspace: restart
            fresh = torch.randn(n, generator=generator, dtype=torch.float64)
            q = _orthogonalize(fresh.to(start), basis)
        q = q / q.norm()
    converged = len(basis) == n  # the whole space: exact up to rounding
    return _eigen(basis, values, coeffs, residuals, len(basis), converged)


def _norm(w: Tensor) -> float:
    return float(torch.linalg.vector_norm(w, dtype=torch.float64))


def _orthogonalize(w: Tensor, basis: list[Tensor]) -> Tensor:
    for _ in range(2):  # twice is enough (Giraud et al. 2005)
        for v in basis:
            w = w - _dot(v, w) * v
    return w


def _residual(basis: list[Tensor], images: list[Tensor], s: np.ndarray, theta: float,
              ) -> float:
    y = sum(float(c) * v.double() for c, v in zip(s, basis, strict=False))
    ay = sum(float(c) * w.double() for c, w in zip(s, images, strict=False))
    assert isinstance(y, Tensor) and isinstance(ay, Tensor)
    return float((ay - theta * y).norm())


def _eigen(basis: list[Tensor], values: np.ndarray, coeffs: np.ndarray,
           residuals: list[float], products: int, converged: bool) -> Eigen:
    stacked = torch.stack(basis)  # (m, n)
    s = torch.as_tensor(coeffs, dtype=stacked.dtype, device=stacked.device)  # (m, k)
    vectors = (s.T @ stacked)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    return Eigen([float(v) for v in values], vectors, residuals, products, converged)


def start_vector(n: int, previous: Tensor | None, generator: torch.Generator,
                 like: Tensor) -> Tensor:
    """A random unit vector, or (warm start) WARM_SHARE of the normalized sum of the
    previous eigenvectors (k, n) plus the rest of a random unit vector."""
    fresh = torch.randn(n, generator=generator, dtype=torch.float64).to(like)
    fresh = fresh / fresh.norm()
    if previous is None or previous.shape[1] != n:
        return fresh
    old = previous.to(like).sum(0)
    if not bool(torch.isfinite(old).all()) or float(old.norm()) == 0.0:
        return fresh
    return WARM_SHARE * old / old.norm() + (1 - WARM_SHARE) * fresh


# ---------------------------------------------------------------------------------------
# Measurements during a run


@dataclass
class Sharpness:
    """Measures a model's top Hessian eigenvalues on one fixed subset, each measurement
    warm-started from the last one's eigenvectors."""

    cfg: SharpnessConfig
    loss_fn: LossFn
    loss_name: str
    chunks: Chunks
    generator: torch.Generator
    vectors: Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, cfg: SharpnessConfig, loss_fn: LossFn, loss_name: str, x: Tensor,
              y: Tensor, targets: Tensor | None, teacher: EscapeNet,
              micro_batch: int | None, seed: int) -> Sharpness:
        """The subset: `cfg.samples` training images (class-stratified, drawn once from
        `seed`) or all of them, in micro-batches of ``cfg.micro_batch_size``, else
        `micro_batch`, else all at once."""
        n = len(y) if cfg.samples == "full" else min(cfg.samples, len(y))
        idx = torch.from_numpy(stratified_subset(y.cpu().numpy(), n, seed % 2**32))
        idx = idx.to(y.device)
        chunk = cfg.micro_batch_size or micro_batch or n
        chunks = Chunks.build(x, idx, targets, teacher, chunk)
        return cls(cfg, loss_fn, loss_name, chunks, torch.Generator().manual_seed(seed))

    @property
    def samples(self) -> int:
        return sum(len(x) for x in self.chunks.x)

    def measure(self, model: EscapeNet, gauss_newton: bool = False) -> dict[str, Any]:
        """Top-k eigenvalues of the Hessian (or of the Gauss-Newton matrix) at `model`;
        the record of one measurement (without step)."""
        operator = _Operator(model, self.chunks, self.loss_fn, gauss_newton)
        like = next(model.parameters()).detach()  # dtype and device
        n = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        start = start_vector(n, self.vectors, self.generator, like)
        eigen = lanczos(operator, start, self.cfg.k, self.cfg.tol, self.cfg.max_hvp,
                        self.generator)
        if all(math.isfinite(v) for v in eigen.values):
            self.vectors = eigen.vectors
        return {"method": "gauss_newton" if gauss_newton else "hessian",
                "eigenvalues": eigen.values, "residuals": eigen.residuals,
                "hvp": eigen.products, "converged": eigen.converged,
                "loss": operator.loss, "samples": self.samples,
                "seconds": time.perf_counter() - t0}

    def at_teacher(self, teacher: EscapeNet) -> dict[str, Any]:
        """lambda_0: at the teacher with Gauss-Newton products for squared escape losses
        (exact there, see the module docstring), with Hessian products otherwise."""
        return self.measure(teacher, gauss_newton=self.loss_name in GAUSS_NEWTON_LOSSES)

    def state(self) -> dict[str, Tensor]:
        """The warm start and the random stream, for resumable checkpoints."""
        out = {"sharpness.rng": self.generator.get_state()}
        if self.vectors is not None:
            out["sharpness.vectors"] = self.vectors
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        if "sharpness.rng" in tensors:
            self.generator.set_state(tensors["sharpness.rng"])
        if "sharpness.vectors" in tensors:
            self.vectors = tensors["sharpness.vectors"].to(self.chunks.x[0].device)


class _Operator:
    """v -> H v (or G v) at one model, remembering the subset loss of the first call."""

    def __init__(self, model: EscapeNet, chunks: Chunks, loss_fn: LossFn,
                 gauss_newton: bool) -> None:
        self.model, self.chunks, self.loss_fn = model, chunks, loss_fn
        self.product = gauss_newton_vector_product if gauss_newton \
            else hessian_vector_product
        self.loss: float | None = None

    def __call__(self, v: Tensor) -> Tensor:
        hv, loss = self.product(self.model, self.chunks, self.loss_fn, v)
        self.loss = loss if self.loss is None else self.loss
        return hv


__all__ = ["Sharpness", "Chunks", "Eigen", "lanczos", "hessian_vector_product",
           "gauss_newton_vector_product", "start_vector", "GAUSS_NEWTON_LOSSES"]
