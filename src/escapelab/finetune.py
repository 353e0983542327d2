"""Finetuning from T, C and S (the paper's closing question, Sec. 4).

For every start checkpoint (T the teacher, C the collapse, S the final student, or any
saved step) and every seed, the start's *encoder* is trained together with a fresh
linear classifier (d_enc -> number of classes) on the labels of the run's training
split, by cross-entropy, with Adam or SGD, for a fixed number of epochs. The encoder's
old head (the escape's output layer) is dropped. The test accuracy is measured before the
first step and ``evals_per_epoch`` times per epoch.

Fairness: for one seed every start gets the same classifier initialization (drawn
from the seed), the same order of batches (drawn from the seed) and the same optimizer
settings; only the encoder's starting weights differ. So the spread over seeds is the
part of the difference that the classifier's init and the data order explain.

Outputs (in the run directory, under ``finetune/``):

- ``curves.jsonl``: one record per (start, seed, evaluation): step, epoch, the mean
  training loss since the previous evaluation, test accuracy.
- ``finetune.json``: the options, and per start the final test accuracy (mean, std and
  per seed), the accuracy after the first epoch, and ``steps_to_target``: the first
  evaluated step at which the seed-mean accuracy reaches ``TARGET_SHARE`` of the best
  final seed-mean accuracy among the starts (one common target, so "faster" compares
  like with like).

A (start, seed) pair is written whole once it finishes; a second call with the same
options skips the pairs already there (so an interrupted call loses at most the pair in
progress), and a call with other options is refused unless ``overwrite``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from escapelab.config import FinetuneOptions
from escapelab.data import Dataset, load_dataset, stratified_subset
from escapelab.errors import EscapelabError
from escapelab.models import EscapeNet, build_model
from escapelab.probe import Standardizer
from escapelab.runtime import resolve_device
from escapelab.store import RunDir

TARGET_SHARE = 0.95
Progress = Callable[[str, int, int, int], None]  # start, seed, step, total steps


def finetune(run_dir: Path | str, options: FinetuneOptions | None = None, *,
             overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Finetune every start x seed of `options` from the run in `run_dir`; returns (and
    writes) the comparison, ``finetune.json``'s payload."""
    options = options or FinetuneOptions()
    run = RunDir.open(run_dir)
    cfg, derived = run.config(), run.derived()
    available = run.checkpoint_names()
    missing = [s for s in options.starts if s not in available]
    if missing:
        raise EscapelabError(f"checkpoints {missing} not in {run.path / 'checkpoints'}; "
                             f"available: {', '.join(sorted(available)) or 'none'}")
    digest = _digest(options)
    run.acquire()
    try:
        earlier = run.finetune()
        if earlier is not None and earlier.get("digest") != digest:
            if not overwrite:
                raise EscapelabError(f"{run.path} already holds finetuning results with other "
                                     "options; pass --overwrite to replace them")
            run.clear_finetune()
        elif earlier is None and run.finetune_curves() and overwrite:
            run.clear_finetune()
        device = resolve_device(options.device)
        dtype = getattr(torch, cfg.dtype)
        data = _subset(load_dataset(cfg.data), options).to(device, dtype)
        template = build_model(cfg.model, data.input_shape, derived.head_dim)
        done = {(r["start"], r["seed"]) for r in run.finetune_curves()
                if r.get("digest") == digest}
        run.write_finetune(_payload(options, digest, run.finetune_curves()))
        for seed in options.seeds:
            for start in options.starts:
                if (start, seed) in done:
                    continue
                tensors, _ = run.load_checkpoint(start)
                records = finetune_one(template, tensors, data, options, seed, start,
                                       progress=progress)
                run.append_finetune_curve([{**r, "digest": digest} for r in records])
        payload = _payload(options, digest, [r for r in run.finetune_curves()
                                             if r.get("digest") == digest])
        run.write_finetune(payload)
        return payload
    finally:
        run.release()


def _digest(options: FinetuneOptions) -> str:
    """What makes two calls' curves comparable: every option but the starts, the seeds
    and the device."""
    import hashlib
    import json

    kept = options.model_dump(mode="json", exclude={"starts", "seeds", "device"})
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def _subset(data: Dataset, options: FinetuneOptions) -> Dataset:
    def pick(labels: Tensor, size: int | None) -> Tensor:  # all of it if size is None
        return torch.from_numpy(stratified_subset(labels.numpy(), size or len(labels), 0))

    tr, te = pick(data.y_train, options.train_samples), pick(data.y_test, options.test_samples)
    return Dataset(data.name, data.x_train[tr], data.y_train[tr], data.x_test[te],
                   data.y_test[te], data.num_classes, data.mean, data.std)


def finetune_one(template: EscapeNet, tensors: dict[str, Tensor], data: Dataset,
                 options: FinetuneOptions, seed: int, start: str = "",
                 progress: Progress | None = None) -> list[dict[str, Any]]:
    """Train `tensors`' encoder plus a fresh classifier on `data` (on its device and
    dtype); the curve as records (module docstring)."""
    device, dtype = data.x_train.device, data.x_train.dtype
    model = copy.deepcopy(template)
    model.load_state_dict(tensors)
    encoder = model.encoder.to(device, dtype).train()
    linear = fresh_classifier(model.feature_dim, data.num_classes, seed).to(device, dtype)
    classifier: nn.Module = (nn.Sequential(Standardize.of(encoder, data.x_train), linear)
                             if options.standardize else linear)
    params = [*encoder.parameters(), *linear.parameters()]
    lr = options.step_size()
    optimizer: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr, weight_decay=options.weight_decay)
        if options.optimizer == "adam" else
        torch.optim.SGD(params, lr=lr, momentum=options.momentum,
                        weight_decay=options.weight_decay))
    n = len(data.y_train)
    per_epoch = math.ceil(n / options.batch_size)
    total = per_epoch * options.epochs
    marks = _eval_steps(per_epoch, options.epochs, options.evals_per_epoch)
    records = [_record(start, seed, 0, 0.0, None, encoder, classifier, data)]
    step, losses, t0 = 0, [], time.perf_counter()
    for epoch in range(options.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + epoch)).to(device)
        for batch in order.split(options.batch_size):
            logits = classifier(encoder(data.x_train[batch]))
            loss = nn.functional.cross_entropy(logits, data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.detach())
            if step in marks:
                mean_loss = float(torch.stack(losses).double().mean())
                losses = []
                records.append(_record(start, seed, step, step / per_epoch, mean_loss,
                                       encoder, classifier, data))
                if not math.isfinite(mean_loss):
                    records[-1]["diverged"] = True
                    return _timed(records, t0)
                if progress is not None:
                    progress(start, seed, step, total)
    return _timed(records, t0)


class Standardize(nn.Module):
    """x -> (x - mean) / std with fixed (not trained) statistics."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    @classmethod
    @torch.no_grad()
    def of(cls, encoder: nn.Module, x: Tensor) -> Standardize:
        """The statistics of encoder(x), as the linear probe takes them
        (:class:`escapelab.probe.Standardizer`: population std, 1 where a feature is
        constant to rounding)."""
        encoder.eval()
        stats = Standardizer.fit(torch.cat([encoder(c) for c in x.split(1024)]))
        encoder.train()
        return cls(stats.mean.to(x.dtype), stats.scale.to(x.dtype))


def fresh_classifier(d_in: int, num_classes: int, seed: int) -> nn.Linear:
    """nn.Linear's default initialization (uniform in +-1/sqrt(d_in)) drawn from `seed`
    alone: the same classifier for every start."""
    layer = nn.Linear(d_in, num_classes)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=gen)
        layer.bias.uniform_(-bound, bound, generator=gen)
    return layer


def _eval_steps(per_epoch: int, epochs: int, per_epoch_evals: int) -> set[int]:
    marks = {round(per_epoch * (e + (i + 1) / per_epoch_evals))
             for e in range(epochs) for i in range(per_epoch_evals)}
    return {m for m in marks if m >= 1} | {per_epoch * epochs}


@torch.no_grad()
def _record(start: str, seed: int, step: int, epoch: float, train_loss: float | None,
            encoder: nn.Module, classifier: nn.Module, data: Dataset) -> dict[str, Any]:
    encoder.eval()
    correct = 0
    for x, y in zip(data.x_test.split(1024), data.y_test.split(1024), strict=True):
        correct += int((classifier(encoder(x)).argmax(1) == y).sum())
    encoder.train()
    return {"start": start, "seed": seed, "step": step, "epoch": epoch,
            "train_loss": train_loss, "test_acc": correct / len(data.y_test)}


def _timed(records: list[dict[str, Any]], t0: float) -> list[dict[str, Any]]:
    seconds = time.perf_counter() - t0
    for r in records:
        r["seconds"] = seconds
    return records


def compare(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Per start: final and first-epoch test accuracy over seeds, and the first step at
    which the seed-mean accuracy reaches TARGET_SHARE of the best final seed-mean."""
    starts: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in curves:
        starts.setdefault(r["start"], {}).setdefault(r["seed"], []).append(r)
    out: dict[str, Any] = {}
    for start, seeds in starts.items():
        finals = {s: sorted(rs, key=lambda r: r["step"])[-1]["test_acc"]
                  for s, rs in seeds.items()}
        first = {s: next((r["test_acc"] for r in sorted(rs, key=lambda r: r["step"])
                          if r["epoch"] >= 1.0), None) for s, rs in seeds.items()}
        values = np.array(list(finals.values()), dtype=np.float64)
        ones = np.array([v for v in first.values() if v is not None], dtype=np.float64)
        out[start] = {
            "seeds": sorted(seeds), "final_test_acc": {str(s): v for s, v in finals.items()},
            "final_test_acc_mean": float(values.mean()),
            "final_test_acc_std": float(values.std()),
            "epoch1_test_acc_mean": float(ones.mean()) if ones.size else None,
            "diverged": sorted(s for s, rs in seeds.items() if any(r.get("diverged")
                                                                    for r in rs)),
        }
    if out:
        target = TARGET_SHARE * max(v["final_test_acc_mean"] for v in out.values())
        for start, seeds in starts.items():
            mean = _mean_curve(seeds)
            out[start]["target_acc"] = target
            out[start]["steps_to_target"] = next((k for k, v in mean if v >= target), None)
    return out


def _mean_curve(seeds: dict[int, list[dict[str, Any]]]) -> list[tuple[int, float]]:
    """(step, mean test accuracy over the seeds evaluated at that step)."""
    by_step: dict[int, list[float]] = {}
    for rs in seeds.values():
        for r in rs:
            by_step.setdefault(r["step"], []).append(r["test_acc"])
    return [(k, float(np.mean(v))) for k, v in sorted(by_step.items())]


def _payload(options: FinetuneOptions, digest: str,
             curves: list[dict[str, Any]]) -> dict[str, Any]:
    return {"options": options.model_dump(mode="json"), "digest": digest,
            "target_share": TARGET_SHARE, "starts": compare(curves)}
