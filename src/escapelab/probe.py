"""Probing a network's encoder: linear probe, kNN, effective rank, dead units.

The linear probe is a multinomial logistic regression (scikit-learn, L-BFGS, L2 with
inverse strength C) on encoder features standardized with training-split statistics,
fit on the train split and scored on the test split (paper Sec. 2, "linear probe").
The kNN probe is a k=20 cosine-similarity majority vote (DINO's protocol without its
temperature weighting). Both are deterministic for fixed features.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from escapelab.config import ProbeConfig
from escapelab.data import Dataset, stratified_subset
from escapelab.losses import LossFn
from escapelab.metrics import dead_units, effective_rank, linear_cka
from escapelab.models import EscapeNet


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


def linear_probe_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                          y_test: np.ndarray, C: float = 1.0, max_iter: int = 1000,
                          ) -> float | None:
    """Test accuracy in [0, 1] of a logistic regression on standardized features;
    None if the features are not finite."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if not (np.isfinite(f_train).all() and np.isfinite(f_test).all()):
        return None
    scaler = StandardScaler().fit(f_train.astype(np.float64))
    clf = LogisticRegression(C=C, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in exp at collapse
        clf.fit(scaler.transform(f_train.astype(np.float64)), y_train)
    return float(clf.score(scaler.transform(f_test.astype(np.float64)), y_test))


def knn_accuracy(f_train: np.ndarray, y_train: np.ndarray, f_test: np.ndarray,
                 y_test: np.ndarray, k: int = 20) -> float | None:
    """Test accuracy in [0, 1] of a k-nearest-neighbour vote under cosine distance;
    None if the features are not finite."""
    from sklearn.neighbors import KNeighborsClassifier

    if not (np.isfinite(f_train).all() and np.isfinite(f_test).all()):
        return None
    knn = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), metric="cosine",
                               algorithm="brute")
    knn.fit(f_train.astype(np.float64), y_train)
    return float(knn.score(f_test.astype(np.float64), y_test))


@dataclass
class Evaluator:
    """Measures a network on fixed probe splits (the same samples at every step).

    ``targets`` are the training loss's targets on the probe's train samples (teacher
    outputs, or labels for supervised losses), so that ``loss`` is the training
    objective on those samples. ``teacher_features`` are the teacher's encoder outputs
    on the same samples, computed once: ``cka_teacher`` is the linear CKA between them
    and the network's (1 at the teacher; how much of the teacher's representation
    survives the escape, up to rotation and scale).
    """

    data: Dataset
    cfg: ProbeConfig
    loss_fn: LossFn
    train_idx: Tensor
    test_idx: Tensor
    targets: Tensor | None = None
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

    def set_teacher_features(self, features: Tensor) -> None:
        self.teacher_features = features

    def __call__(self, model: EscapeNet) -> dict[str, Any]:
        x_tr = self.data.x_train[self.train_idx]
        f_tr, out_tr = extract(model, x_tr, self.cfg.eval_batch_size)
        f_te, _ = extract(model, self.data.x_test[self.test_idx], self.cfg.eval_batch_size)
        y_tr = self.data.y_train[self.train_idx].cpu().numpy()
        y_te = self.data.y_test[self.test_idx].cpu().numpy()
        np_tr, np_te = f_tr.double().cpu().numpy(), f_te.double().cpu().numpy()
        finite = bool(np.isfinite(np_tr).all())
        record: dict[str, Any] = {
            "probe_acc": linear_probe_accuracy(np_tr, y_tr, np_te, y_te, self.cfg.C,
                                               self.cfg.max_iter),
            "knn_acc": knn_accuracy(np_tr, y_tr, np_te, y_te, self.cfg.knn_k),
            # Spectrum and dead units of the encoder output on the probe's train samples.
            "erank": effective_rank(np_tr) if finite else None,
            "dead_frac": dead_units(f_tr) / f_tr.shape[1],
        }
        if self.teacher_features is not None:
            record["cka_teacher"] = linear_cka(f_tr, self.teacher_features) if finite else None
        if self.targets is not None:
            with torch.no_grad():
                record["loss"] = float(self.loss_fn(out_tr, self.targets))
        return record
