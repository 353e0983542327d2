"""Probing a network's encoder: linear probe, kNN, effective rank, dead units.

Both probes run where the features are (the run's device) and are deterministic for
fixed features (and, for the linear probe, a fixed starting point) on a fixed device.

Linear probe (paper Sec. 2, "linear probe")
-------------------------------------------
A multinomial logistic regression on encoder features standardized with the training
split's mean and standard deviation (scikit-learn's ``StandardScaler``: population
variance; a feature whose variance is indistinguishable from rounding keeps scale 1, so
dead or constant units give zeros, never NaN). With x_i the standardized features (n, d),
labels y_i in 0..K-1, weights W (K, d) and intercepts b (K,), the probe minimizes

    f(W, b) = 1/n sum_i [logsumexp_k (W x_i + b)_k - (W x_i + b)_{y_i}]  +  ||W||_F^2 / (2 C n)

with the intercept unpenalized. This is scikit-learn's ``LogisticRegression(C=C)``
objective ``C sum_i CE_i + ||W||_F^2 / 2`` divided by C n, the scaled form its lbfgs
solver minimizes (``l2_reg_strength = 1 / (C n)`` on the mean loss); the same minimizer,
the same gradient scale, so the same ``tol``. With two classes scikit-learn fits one
binomial model (one weight row): the multinomial above with class 0's row and
intercept fixed at zero, which is what we fit too. ``escapelab.reference.
logistic_objective`` is the plain NumPy formula; the tests check scikit-learn's
solution against it and ours against scikit-learn's.

``solver="torch"`` (the default) minimizes f by full-batch L-BFGS
(``torch.optim.LBFGS``, strong-Wolfe line search, ``HISTORY`` = 100 pairs) with an
analytic gradient, in float64 (or float32) on the features' device. It stops when

- max |grad f| <= ``tol`` over all entries of W and b. This is the criterion of
  scikit-learn's ``tol`` (scipy's ``pgtol``: the max-norm of the projected gradient of
  the same f; without bounds the projected gradient is the gradient), so ``tol=1e-4``
  here stops where scikit-learn's default does. The default, 1e-5, is ten times
  tighter: on 5,000 x 512 Fashion-MNIST features of a random convnet both solvers stop
  ~1.2e-3 relative above the optimum at 1e-4 (the smallest Hessian eigenvalue is only
  1/(C n)), ours ~6e-5 above it at 1e-5, in about as many iterations as scikit-learn
  needs for 1e-4 (277 vs 304);
- or stagnation (torch's ``tolerance_change``, ``FTOL`` = 2.2e-16): an iteration changes f
  or every weight by less than FTOL, or the search direction is not a descent
  direction by more. f is summed in float64 in either dtype (in float32 a sum of n
  terms would hide its last decreases from the line search), so in float32 this ends
  the fit only once the weights no longer move;
- or after ``max_iter`` iterations (reported: ``LogisticFit.converged`` is False).

Warm start: the :class:`Evaluator` starts each fit from the previous evaluation's
solution (W, b), which the next, slightly different features' optimum is usually near;
the stopping rule is the same, so a warm fit ends as close to the optimum as a cold
one, in fewer iterations. The warm state is saved with resumable checkpoints, so a
resumed run repeats the uninterrupted one exactly.

``solver="sklearn"`` is the reference: scikit-learn's own lbfgs on float64 NumPy copies
(CPU), cold at every call, with the same C, ``tol`` and ``max_iter``.

Preconditioning: features of a ReLU encoder are strongly correlated, and with the
penalty only 1/(C n) the Hessian of f is badly conditioned (on 60,000 x 512 Fashion-MNIST
features plain L-BFGS needed ~900 iterations to reach tol 1e-5). For d <=
``PRECONDITION_MAX_D`` L-BFGS therefore runs in the variables V = W P^-1 (and beta = b / q)
of :class:`Preconditioner`, P = (Sigma_c + lam I)^(-1/2) from the curvature-weighted
second moment of the features (the curvature at the start averaged with that at W = 0):
one pass over x and a d x d ``eigh``. The objective, the stopping rule (on grad f in
W, b) and the returned (W, b) are unchanged; on those 60,000 features the iterations
drop ~3.2x (909 -> 287 in float64, 863 -> 259 in float32). The closure checks the
stopping rule at every point it evaluates (line-search trials included) and ends the
fit at the first that meets it.

Speed: ``bench/bench_probe.py`` measures both solvers side by side (one thread each);
its latest numbers are in ``bench/results/probe.json`` and ``docs/benchmarks.md``.
On a CPU the products with 10 columns are memory-bound (float32 reads half the bytes
and is ~3x cheaper per iteration than float64 here); on a GPU, where the features
already are, the fit is a few hundred small kernels.

kNN probe
---------
A k = 20 cosine majority vote (DINO's protocol without its temperature weighting),
identical to ``KNeighborsClassifier(k, metric="cosine", algorithm="brute")``: the
distance is scikit-learn's ``clip(1 - <x/|x|, t/|t|>, 0, 2)`` (zero rows stay zero), the
vote is uniform and a tied vote goes to the smallest label. It is computed on the
device in chunks of test rows (at most ``KNN_CHUNK_BYTES`` of temporaries), never as the
whole n_test x n_train matrix. Among training points at exactly the k-th smallest
distance, ours takes the lowest training indices; scikit-learn takes whichever its
``argpartition`` leaves first. Both agree unless such an exact tie straddles the k-th
place with different labels (exact duplicates of one point with one label agree).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from escapelab.config import ProbeConfig
from escapelab.data import Dataset, stratified_subset
from escapelab.losses import LossFn
from escapelab.metrics import dead_units, effective_rank, linear_cka
from escapelab.models import EscapeNet

Solver = Literal["torch", "sklearn"]
ProbeDtype = Literal["float64", "float32"]
Features = np.ndarray | Tensor

# L-BFGS memory. On 5,000 x 512 Fashion-MNIST features (tol 1e-5, float64) 100 (s, y)
# pairs took 277 iterations, 30 took 595 and scipy's 10 took 830, each at ~14 ms; capped
# so the pairs take at most HISTORY_BYTES (a 65,536-unit conv tap x 10 classes: 25).
HISTORY = 100
HISTORY_BYTES = 2**28
FTOL = float(torch.finfo(torch.float64).eps)  # stagnation: change of f or of a weight
KNN_CHUNK_BYTES = 2**28  # temporaries of one chunk of test rows, bytes
CHUNK_BYTES = 2**26  # float64 rows standardized at once
PRECONDITION_MAX_D = 1024  # wider features: plain L-BFGS (the d x d eigh would dominate)
DEFAULT_TOL: float = ProbeConfig.model_fields["tol"].default  # one place: the config


@torch.no_grad()
def extract(model: EscapeNet, x: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Encoder features (n, d_enc) and head outputs (n, d_out), batch by batch."""
    was_training = model.training
    model.eval()
    feats, outs = [], []
    for chunk in x.split(batch_size):
        f = model.features(chunk)
        feats.append(f)
        outs.append(model.head(f))
    model.train(was_training)
    return torch.cat(feats), torch.cat(outs)


# ---------------------------------------------------------------------------------------
# Linear probe


@dataclass(frozen=True)
class Standardizer:
    """scikit-learn's ``StandardScaler`` on tensors: training mean and population
    standard deviation (float64), scale 1 for a feature whose variance is within the
    rounding error of a two-pass variance, n eps var + (n eps mean)^2 (Chan, Golub and
    LeVeque; scikit-learn's ``_is_constant_feature``)."""

    mean: Tensor  # (d,) float64
    scale: Tensor  # (d,) float64

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        # Two passes over float64 row chunks: no float64 copy of a wide tap's features.
        n, eps = x.shape[0], torch.finfo(torch.float64).eps
        mean = sum(c.to(torch.float64).sum(0) for c in _row_chunks(x)) / n
        var = sum((c.to(torch.float64) - mean).square_().sum(0) for c in _row_chunks(x)) / n
        assert isinstance(mean, Tensor) and isinstance(var, Tensor)
        constant = var <= n * eps * var + (n * eps * mean).square()
        return cls(mean, torch.where(constant, torch.ones_like(var), var.sqrt()))

    def transform(self, x: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        for rows, chunk in zip(_row_chunks(out), _row_chunks(x), strict=True):
            rows.copy_((chunk.to(torch.float64) - self.mean) / self.scale)
        return out


def _row_chunks(x: Tensor) -> tuple[Tensor, ...]:
    """Row blocks of x of at most CHUNK_BYTES in float64 (at least one row each)."""
    rows = max(1, CHUNK_BYTES // (8 * max(1, x.shape[1])))
    return x.split(rows)


@dataclass
class LogisticFit:
    """A fitted probe on standardized features: logits = x W^T + b, with a zero
    logit for class 0 prepended when two classes share one weight row."""

    classes: Tensor  # (K,) the training labels, ascending
    weight: Tensor  # (K, d), or (1, d) for K = 2
    bias: Tensor  # (K,), or (1,)
    n_iter: int  # L-BFGS iterations of this fit (0 if the start was already optimal)
    objective: float  # f at the solution
    grad_max: float  # max |grad f| at the solution
    converged: bool  # grad_max <= tol

    def logits(self, x: Tensor) -> Tensor:
        z = torch.addmm(self.bias, x, self.weight.T)
        return _with_reference_class(z, len(self.classes))

    def predict(self, x: Tensor) -> Tensor:
        """Labels (n,); ties go to the smallest label, as scikit-learn's argmax."""
        return self.classes[self.logits(x).argmax(1)]


def _with_reference_class(z: Tensor, num_classes: int) -> Tensor:
    if z.shape[1] == num_classes - 1:  # binomial: class 0's logit is 0
        return torch.cat([torch.zeros_like(z[:, :1]), z], 1)
    return z


def logistic_loss_grad(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor,
                       num_classes: int, C: float) -> tuple[Tensor, Tensor, Tensor]:
    """f(W, b) (see the module docstring) and its gradients, analytically:
    grad_W f = R^T x / n + W / (C n), grad_b f = sum_i R_i / n, with R = softmax(z) - onehot(y)
    (restricted to the free rows for two classes). x (n, d) standardized, y (n,) class
    indices; W (K, d) or (1, d). Returns (f 0-d, grad W, grad b)."""
    n = x.shape[0]
    z = _with_reference_class(torch.addmm(bias, x, weight.T), num_classes)
    lse = torch.logsumexp(z, 1, keepdim=True)  # (n, 1)
    lam = 1.0 / (C * n)
    # Summed in float64 whatever the dtype: a float32 sum of n terms would hide the
    # objective's last decreases (~1e-7 relative) from the line search.
    f64 = torch.float64
    loss = ((lse[:, 0] - z.gather(1, y[:, None])[:, 0]).sum(dtype=f64) / n
            + 0.5 * lam * weight.square().sum(dtype=f64))
    resid = torch.exp(z - lse)  # softmax, (n, K)
    resid[torch.arange(n, device=x.device), y] -= 1.0
    resid = resid[:, num_classes - weight.shape[0]:] / n  # the free rows' residuals
    return loss, resid.T @ x + lam * weight, resid.sum(0)


class _Converged(Exception):
    """Raised by the L-BFGS closure at the first point whose max |grad f| <= tol."""


@dataclass(frozen=True)
class Preconditioner:
    """The change of variables W = V P, b = q beta that L-BFGS runs in (module docstring).

    P = (Sigma_c + lam I)^(-1/2) with Sigma_c = sum_i c_i x_i x_i^T / n the standardized
    features' second moment weighted by a curvature c_i per sample, lam = 1 / (C n) the
    penalty; q = (mean c_i)^(-1/2) for the intercepts. c_i is the mean of the curvature
    at the start (W0, b0), mean over the free logits k of p_ik (1 - p_ik), and at W = 0,
    (1 - 1/K) / K: for a cold start the two are the same; for a warm start the first
    fits the end of a short path (a start near the optimum) and the second keeps the
    directions of confidently fit samples, whose curvature at the start is ~0, from
    being scaled up ~1 / lam when the features moved far (an escape). On a real run's
    23 Fashion-MNIST evaluations the start's curvature alone took 5,018 L-BFGS
    iterations in all (one warm fit ending at max_iter), W = 0's alone 3,089, the mean
    3,020 (float32; 5,226 -> 3,089 in float64 in ``bench/bench_probe.py``, where the
    digits run's small fits went from 1,321 to 1,457); on a small move to tol 1e-8
    W = 0's alone made the warm fit slower than a cold one (311 vs 290 iterations), the
    mean does not. In V the Hessian of f at the start is about the identity along the
    data directions, whatever the features' correlations."""

    p: Tensor  # (d, d), x's dtype
    p_inv: Tensor  # (d, d)
    q: float

    @classmethod
    def build(cls, x: Tensor, num_classes: int, C: float, weight: Tensor,
              bias: Tensor) -> Preconditioner:
        n, d = x.shape
        f64 = torch.float64
        cold = (1.0 - 1.0 / num_classes) / num_classes  # p_ik (1 - p_ik) at W = 0
        gram = torch.zeros(d, d, dtype=f64, device=x.device)
        total = 0.0
        for chunk in _row_chunks(x):
            z = _with_reference_class(torch.addmm(bias, chunk, weight.T), num_classes)
            prob = torch.softmax(z.to(f64), 1)[:, num_classes - weight.shape[0]:]
            c = 0.5 * ((prob * (1.0 - prob)).mean(1) + cold)  # (m,)
            total += float(c.sum())
            c64 = chunk.to(f64)
            gram.addmm_(c64.T * c, c64)
        s, u = torch.linalg.eigh(gram / n)
        root = (s.clamp(min=0.0) + 1.0 / (C * n)).sqrt()
        return cls(p=((u / root) @ u.T).to(x.dtype), p_inv=((u * root) @ u.T).to(x.dtype),
                   q=(total / n) ** -0.5)


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, C: float = 1.0, *,
                 tol: float = DEFAULT_TOL, max_iter: int = 1000,
                 init: tuple[Tensor, Tensor] | None = None,
                 classes: Tensor | None = None, history: int | None = None,
                 precondition: bool | None = None) -> LogisticFit:
    """Minimize f by full-batch L-BFGS on x's device and dtype (module docstring).

    x (n, d) standardized features; y (n,) class indices in 0..num_classes-1 (every class
    present, as scikit-learn requires); `init` (W, b) a warm start of the right shapes
    (else W = 0, b = 0, scikit-learn's start); `classes` the labels the indices stand for
    (default 0..K-1); `history` the L-BFGS pairs (default: ``HISTORY`` under
    ``HISTORY_BYTES``); `precondition` runs L-BFGS in the variables of
    :class:`Preconditioner` (default: when d <= ``PRECONDITION_MAX_D``), and if that
    stagnates before the stopping rule holds, plain L-BFGS goes on from where it ended
    with the iterations left. The objective, the stopping rule and the returned (W, b)
    are the same either way."""
    n, d = x.shape
    rows = 1 if num_classes == 2 else num_classes
    if history is None:
        pair = 2 * rows * (d + 1) * x.element_size()
        history = max(10, min(HISTORY, HISTORY_BYTES // pair))
    if precondition is None:
        precondition = d <= PRECONDITION_MAX_D
    weight = torch.zeros(rows, d, dtype=x.dtype, device=x.device)
    bias = torch.zeros(rows, dtype=x.dtype, device=x.device)
    if init is not None and init[0].shape == weight.shape and init[1].shape == bias.shape:
        weight.copy_(init[0])
        bias.copy_(init[1])
    y = y.to(device=x.device, dtype=torch.int64)
    pre = Preconditioner.build(x, num_classes, C, weight, bias) if precondition else None
    end, n_iter = _lbfgs(x, y, num_classes, C, tol, max_iter, history, weight, bias, pre)
    if pre is not None and end["grad_max"] > tol and n_iter < max_iter:
        end, more = _lbfgs(x, y, num_classes, C, tol, max_iter - n_iter, history,
                           end["weight"], end["bias"], None)
        n_iter += more
    return LogisticFit(
        classes=torch.arange(num_classes, device=x.device) if classes is None
        else classes, weight=end["weight"].detach().clone(),
        bias=end["bias"].detach().clone(), n_iter=n_iter, objective=end["loss"],
        grad_max=end["grad_max"], converged=end["grad_max"] <= tol)


def _lbfgs(x: Tensor, y: Tensor, num_classes: int, C: float, tol: float, max_iter: int,
           history: int, weight: Tensor, bias: Tensor, pre: Preconditioner | None,
           ) -> tuple[dict[str, Any], int]:
    """One L-BFGS run from (weight, bias), in the variables of `pre` if given: the last
    evaluated point {weight, bias, loss, grad_max} and the iterations."""
    start = (weight, bias)  # evaluated as given, not through V (P P^-1 moves its bits)
    if pre is None:
        weight, bias = weight.clone(), bias.clone()
    else:  # the variables L-BFGS moves: W = V P, b = q beta
        weight, bias = weight @ pre.p_inv, bias / pre.q
    last: dict[str, Any] = {}

    def closure() -> Tensor:
        if not last:  # L-BFGS evaluates its start first
            w, b = start
        else:
            w, b = (weight, bias) if pre is None else (weight @ pre.p, bias * pre.q)
        loss, grad_w, grad_b = logistic_loss_grad(w, b, x, y, num_classes, C)
        grad_max = float(torch.maximum(grad_w.abs().max(), grad_b.abs().max()))
        last.update(weight=w, bias=b, loss=float(loss), grad_max=grad_max)
        if grad_max <= tol:
            raise _Converged
        weight.grad, bias.grad = ((grad_w, grad_b) if pre is None
                                  else (grad_w @ pre.p, grad_b * pre.q))
        return loss

    # tolerance_grad=0: the stopping rule is on grad f in (W, b), checked by the closure
    # at every point it evaluates, line-search trials included.
    lbfgs = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                              max_eval=2 * max_iter, tolerance_grad=0.0,
                              tolerance_change=FTOL, history_size=history,
                              line_search_fn="strong_wolfe")
    with torch.no_grad():
        try:
            lbfgs.step(closure)
            closure()  # the final iterate (the last evaluation may be a rejected trial)
        except _Converged:
            pass
    return last, int(lbfgs.state[weight].get("n_iter", 0))


def _tensor(f: Features) -> Tensor:
    if isinstance(f, Tensor):
        return f
    array = np.ascontiguousarray(f)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _finite(*arrays: Features) -> bool:
    return all(bool(torch.isfinite(_tensor(a)).all()) for a in arrays)


def linear_probe(f_train: Features, y_train: Features, f_test: Features, y_test: Features,
                 C: float = 1.0, max_iter: int = 1000, *, solver: Solver = "torch",
                 dtype: ProbeDtype = "float64", tol: float = DEFAULT_TOL,
                 init: LogisticFit | None = None) -> tuple[float | None, LogisticFit | None]:
    """(test accuracy in [0, 1], the fit) of the logistic-regression probe on standardized
    features (module docstring); (None, None) if the features are not finite.

    f_* (n, d) features and y_* (n,) integer labels, NumPy arrays or tensors. The torch
    solver runs on f_train's device in `dtype` and starts from `init` if it is a fit
    with the same classes and shapes; the sklearn solver returns no fit."""
    if not _finite(f_train, f_test):
        return None, None
    if solver == "sklearn":
        return _sklearn_probe(f_train, y_train, f_test, y_test, C, max_iter, tol), None
    x_tr, x_te = _tensor(f_train), _tensor(f_test)
    device, precision = x_tr.device, getattr(torch, dtype)
    classes, y_idx = torch.unique(_tensor(y_train).to(device), return_inverse=True)
    scaler = Standardizer.fit(x_tr)
    start = None
    if init is not None and torch.equal(init.classes.to(device), classes):
        start = (init.weight, init.bias)
    fit = fit_logistic(scaler.transform(x_tr, precision), y_idx, len(classes), C, tol=tol,
                       max_iter=max_iter, init=start, classes=classes)
    pred = fit.predict(scaler.transform(x_te.to(device), precision))
    return float((pred == _tensor(y_test).to(device)).double().mean()), fit


def linear_probe_accuracy(f_train: Features, y_train: Features, f_test: Features,
                          y_test: Features, C: float = 1.0, max_iter: int = 1000, *,
                          solver: Solver = "torch", dtype: ProbeDtype = "float64",
                          tol: float = DEFAULT_TOL) -> float | None:
    """Test accuracy in [0, 1] of a logistic regression on standardized features
    (:func:`linear_probe` without the fit); None if the features are not finite."""
    return linear_probe(f_train, y_train, f_test, y_test, C, max_iter, solver=solver,
                        dtype=dtype, tol=tol)[0]


def _numpy64(f: Features) -> np.ndarray:
    return (f.detach().double().cpu().numpy() if isinstance(f, Tensor)
            else np.asarray(f, dtype=np.float64))


def _sklearn_probe(f_train: Features, y_train: Features, f_test: Features,
                   y_test: Features, C: float, max_iter: int, tol: float) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_tr, x_te = _numpy64(f_train), _numpy64(f_test)
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in exp at collapse
        clf.fit(scaler.transform(x_tr), _numpy64(y_train).astype(np.int64))
    return float(clf.score(scaler.transform(x_te), _numpy64(y_test).astype(np.int64)))


# ---------------------------------------------------------------------------------------
# kNN probe


def knn_predict(f_train: Features, y_train: Features, f_test: Features, k: int = 20, *,
                dtype: ProbeDtype = "float64", chunk_bytes: int = KNN_CHUNK_BYTES) -> Tensor:
    """Labels (n_test,) by a uniform vote of the k nearest training points under cosine
    distance, on f_train's device (module docstring: equal to scikit-learn's brute-force
    KNeighborsClassifier up to exact distance ties at the k-th place).

    Test rows go in chunks whose temporaries (the distances and three masks, ~4 words
    per training point) stay under `chunk_bytes`."""
    a = _tensor(f_train)
    device, precision = a.device, getattr(torch, dtype)
    a, b = _unit_rows(a.to(precision)), _unit_rows(_tensor(f_test).to(device, precision))
    classes, y_idx = torch.unique(_tensor(y_train).to(device), return_inverse=True)
    onehot = torch.nn.functional.one_hot(y_idx, len(classes)).to(precision)  # (n_train, K)
    k = min(k, a.shape[0])
    rows = max(1, chunk_bytes // (4 * 8 * max(1, a.shape[0])))
    votes = []
    for chunk in b.split(rows):
        dist = torch.mm(chunk, a.T).neg_().add_(1.0).clamp_(0.0, 2.0)  # (m, n_train)
        kth = dist.topk(k, dim=1, largest=False).values[:, -1:]  # k-th smallest, (m, 1)
        closer = dist < kth
        tied = dist == kth
        del dist
        # of the points at exactly the k-th distance, the lowest indices fill the k places
        room = k - closer.sum(1, keepdim=True)
        take = closer | (tied & (tied.cumsum(1) <= room))
        votes.append(take.to(precision) @ onehot)  # (m, K) counts
    # argmax returns the first maximum: a tied vote goes to the smallest label
    return classes[torch.cat(votes).argmax(1)]


def _unit_rows(x: Tensor) -> Tensor:
    norm = x.square().sum(1, keepdim=True).sqrt()
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def knn_accuracy(f_train: Features, y_train: Features, f_test: Features, y_test: Features,
                 k: int = 20, *, solver: Solver = "torch", dtype: ProbeDtype = "float64",
                 chunk_bytes: int = KNN_CHUNK_BYTES) -> float | None:
    """Test accuracy in [0, 1] of a k-nearest-neighbour vote under cosine distance;
    None if the features are not finite. solver "sklearn": KNeighborsClassifier itself
    on float64 NumPy copies (the reference)."""
    if not _finite(f_train, f_test):
        return None
    if solver == "sklearn":
        from sklearn.neighbors import KNeighborsClassifier

        y_tr = _numpy64(y_train).astype(np.int64)
        knn = KNeighborsClassifier(n_neighbors=min(k, len(y_tr)), metric="cosine",
                                   algorithm="brute")
        knn.fit(_numpy64(f_train), y_tr)
        return float(knn.score(_numpy64(f_test), _numpy64(y_test).astype(np.int64)))
    pred = knn_predict(f_train, y_train, f_test, k, dtype=dtype, chunk_bytes=chunk_bytes)
    return float((pred == _tensor(y_test).to(pred.device)).double().mean())


# ---------------------------------------------------------------------------------------
# During training


@dataclass
class Evaluator:
    """Measures a network on fixed probe splits (the same samples at every step), on the
    data's device.

    ``targets`` are the training loss's targets on the probe's train samples (teacher
    outputs, or labels for supervised losses), so that ``loss`` is the training
    objective on those samples. ``last_fit`` is the latest linear probe (the warm
    start of the next one when ``cfg.warm_start``). ``teacher_features`` are the teacher's
    encoder outputs on the same samples, computed once: ``cka_teacher`` is the linear CKA
    between them and the network's (1 at the teacher; how much of the teacher's
    representation survives the escape, up to rotation and scale).
    """

    data: Dataset
    cfg: ProbeConfig
    loss_fn: LossFn
    train_idx: Tensor
    test_idx: Tensor
    targets: Tensor | None = None
    last_fit: LogisticFit | None = None
    teacher_features: Tensor | None = None

    @classmethod
    def build(cls, data: Dataset, cfg: ProbeConfig, loss_fn: LossFn, seed: int) -> Evaluator:
        def pick(labels: Tensor, size: int | None) -> Tensor:
            y = labels.cpu().numpy()
            idx = np.arange(len(y)) if size is None else stratified_subset(y, size, seed)
            return torch.from_numpy(idx).to(labels.device)

        return cls(data, cfg, loss_fn, pick(data.y_train, cfg.train_samples),
                   pick(data.y_test, cfg.test_samples))

    def set_targets(self, targets: Tensor) -> None:
        self.targets = targets

    def state(self) -> dict[str, Tensor]:
        """The warm start, for resumable checkpoints (empty if there is none)."""
        fit = self.last_fit
        if fit is None or not self.cfg.warm_start:
            return {}
        return {"probe.classes": fit.classes, "probe.weight": fit.weight,
                "probe.bias": fit.bias}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Restore the warm start saved by :meth:`state` (none if absent)."""
        if "probe.weight" not in tensors:
            self.last_fit = None
            return
        device = self.data.x_train.device
        self.last_fit = LogisticFit(
            classes=tensors["probe.classes"].to(device),
            weight=tensors["probe.weight"].to(device), bias=tensors["probe.bias"].to(device),
            n_iter=0, objective=math.nan, grad_max=math.nan, converged=False)

    def set_teacher_features(self, features: Tensor) -> None:
        self.teacher_features = features

    def __call__(self, model: EscapeNet) -> dict[str, Any]:
        cfg = self.cfg
        x_tr = self.data.x_train[self.train_idx]
        f_tr, out_tr = extract(model, x_tr, cfg.eval_batch_size)
        f_te, _ = extract(model, self.data.x_test[self.test_idx], cfg.eval_batch_size)
        y_tr, y_te = self.data.y_train[self.train_idx], self.data.y_test[self.test_idx]
        finite = bool(torch.isfinite(f_tr).all())
        acc, fit = linear_probe(f_tr, y_tr, f_te, y_te, cfg.C, cfg.max_iter,
                                solver=cfg.solver, dtype=cfg.dtype, tol=cfg.tol,
                                init=self.last_fit if cfg.warm_start else None)
        if fit is not None:
            self.last_fit = fit
        record: dict[str, Any] = {
            "probe_acc": acc,
            "knn_acc": knn_accuracy(f_tr, y_tr, f_te, y_te, cfg.knn_k, solver=cfg.solver,
                                    dtype=cfg.dtype),
            # Spectrum and dead units of the encoder output on the probe's train samples.
            "erank": effective_rank(f_tr) if finite else None,
            "dead_frac": dead_units(f_tr) / f_tr.shape[1],
        }
        if fit is not None:  # torch solver: did the fit meet probe.tol (grad <= tol)?
            record["probe_iter"] = fit.n_iter
            record["probe_grad"] = fit.grad_max if math.isfinite(fit.grad_max) else None
        if self.teacher_features is not None:
            record["cka_teacher"] = linear_cka(f_tr, self.teacher_features) if finite else None
        if self.targets is not None:
            with torch.no_grad():
                record["loss"] = float(self.loss_fn(out_tr, self.targets))
        return record
