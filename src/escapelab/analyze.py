"""Layerwise signal propagation and separability at saved checkpoints (paper Sec. 3).

For each checkpoint of a run (T teacher, C collapse, S final, and any ``step_<k>``) and
each layer tap, on a fixed stratified sample of one split:

- ``erank``, ``condition_number`` (99.9% mass): the spectrum of the tap's features
  (Fig. 2a, 2c), one column per channel-and-position for conv taps;
- ``dead_units`` / ``dead_frac`` (Fig. 2b): units zero on every sample, a unit being a
  channel-and-position (the paper) or a channel (``dead="channel"``);
- ``tr_between``, ``tr_within``, ``tr_total``, ``discriminant`` under the true labels,
  and ``discriminant_rel_teacher`` = discriminant / the teacher's at the same tap
  (Fig. 3a, 3b); the same four with k-means cluster labels as ``kmeans_*`` (the paper's
  footnote 1: no labels needed; k-means in torch on the analysis device,
  :func:`escapelab.metrics.kmeans_labels`, or scikit-learn's with ``kmeans_solver``);
- ``probe_acc`` (Fig. 3c): a logistic-regression probe on the tap's standardized
  features, fit on training images and scored on test images, on the analysis device
  with the run's probe settings (:mod:`escapelab.probe`; ``probe_solver`` overrides the
  solver).
- ``cka_T``: linear CKA (:func:`escapelab.metrics.linear_cka`) between the tap's
  features and the teacher's at the same tap on the same images (1 at T): how much of
  the teacher's representation, up to rotation and scale, each layer keeps at C and S.

Features are gathered tap group by tap group under a memory budget, and every spectral
quantity comes from the smaller Gram matrix (see :mod:`escapelab.metrics`).
The result is a tidy table (checkpoint, layer, metric, value) in ``analysis.csv``.
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from escapelab.config import AnalysisOptions
from escapelab.data import load_dataset, stratified_subset
from escapelab.errors import EscapelabError
from escapelab.metrics import GramView, dead_units, kmeans_labels, linear_cka
from escapelab.metrics import condition_number_from_singular_values as _cond
from escapelab.metrics import effective_rank_from_singular_values as _erank
from escapelab.models import EscapeNet, build_model
from escapelab.probe import linear_probe_accuracy
from escapelab.runtime import resolve_device
from escapelab.store import RunDir

CHECKPOINT_ORDER = {"T": 0, "C": 1, "S": 2}
SEPARABILITY = ("tr_between", "tr_within", "tr_total", "discriminant")


@dataclass
class Analysis:
    """The tidy result: one row per (checkpoint, layer, metric)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)

    def value(self, checkpoint: str, layer: str, metric: str) -> Any:
        for r in self.rows:
            if (r["checkpoint"], r["layer"], r["metric"]) == (checkpoint, layer, metric):
                return r["value"]
        raise KeyError((checkpoint, layer, metric))

    def series(self, checkpoint: str, metric: str) -> list[Any]:
        """Values of `metric` at `checkpoint` over the layers, in network order."""
        table = {(r["layer"]): r["value"] for r in self.rows
                 if r["checkpoint"] == checkpoint and r["metric"] == metric}
        return [table.get(layer) for layer in self.layers]


def _ordered(names: list[str]) -> list[str]:
    def key(name: str) -> tuple[int, int]:
        if name in CHECKPOINT_ORDER:
            return (CHECKPOINT_ORDER[name], 0)
        return (3, int(name.split("_", 1)[1]) if name.startswith("step_") else 0)

    return sorted(names, key=key)


def _collect(model: EscapeNet, x: Tensor, taps: list[str], batch_size: int,
             device: torch.device) -> dict[str, Tensor]:
    """Features of `taps` on `x`, batch by batch, as float32 tensors on `device`."""
    out: dict[str, list[Tensor]] = {t: [] for t in taps}
    with torch.no_grad():
        for chunk in x.split(batch_size):
            feats = model.forward_taps(chunk, taps)
            for t in taps:
                out[t].append(feats[t].to(device=device, dtype=torch.float32))
    return {t: torch.cat(v) for t, v in out.items()}


def _groups(sizes: dict[str, int], n: int, budget: float) -> list[list[str]]:
    """Split taps (in order) into groups whose stored features fit `budget` bytes."""
    groups: list[list[str]] = []
    used = math.inf
    for tap, d in sizes.items():
        need = 4.0 * n * d
        if used + need > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(tap)
        used += need
    return groups


def _dead(feats: Tensor, mode: str) -> tuple[int, int]:
    """(dead units, units) of one tap's features (n, C, H, W) or (n, d)."""
    if mode == "channel" and feats.ndim == 4:
        per_channel = feats.abs().amax(dim=(2, 3))  # (n, C): zero iff zero everywhere
        return dead_units(per_channel), per_channel.shape[1]
    flat = feats.flatten(1)
    return dead_units(flat), flat.shape[1]


def analyze(run_dir: Path | str, options: AnalysisOptions | None = None,
            progress: Callable[[str, str], None] | None = None) -> Analysis:
    """Measure every tap at every requested checkpoint of a run directory and write
    ``analysis.csv`` and ``analysis.json`` into it."""
    options = options or AnalysisOptions()
    run = RunDir.open(run_dir)
    cfg = run.config()
    derived = run.derived()
    available = run.checkpoint_names()
    if not available:
        raise EscapelabError(f"{run.path} has no checkpoints to analyse ("
                             f"{run.state_text()}); a run saves T at its start and C, S as "
                             "it goes")
    device = resolve_device(options.device)
    dtype = getattr(torch, cfg.dtype)
    data = load_dataset(cfg.data)
    names = list(options.checkpoints) if options.checkpoints else _ordered(available)
    missing = [n for n in names if n not in available]
    if missing:
        raise EscapelabError(f"checkpoints {missing} not in {run.path / 'checkpoints'}; "
                             f"available: {', '.join(_ordered(available)) or 'none'}")
    template = build_model(cfg.model, data.input_shape, derived.head_dim)
    all_taps = template.tap_names()
    taps = list(options.layers) if options.layers else all_taps
    unknown = [t for t in taps if t not in all_taps]
    if unknown:
        raise EscapelabError(f"unknown layers {unknown}; this model's taps: "
                             f"{', '.join(all_taps)}")
    taps = [t for t in all_taps if t in taps]  # network order

    x_split = data.x_test if options.split == "test" else data.x_train
    y_split = data.y_test if options.split == "test" else data.y_train
    if options.samples is not None and options.samples > len(y_split):
        raise EscapelabError(f"--samples {options.samples} exceeds the {len(y_split)} "
                             f"images of the {options.split} split")
    idx = stratified_subset(y_split.numpy(), options.samples or len(y_split), options.seed)
    x_a, y_a = x_split[idx].to(device, dtype), y_split[idx].numpy()
    if options.probe:
        n_fit = min(options.probe_samples or len(data.y_train), len(data.y_train))
        fit = stratified_subset(data.y_train.numpy(), n_fit, options.seed)
        x_fit, y_fit = data.x_train[fit].to(device, dtype), data.y_train[fit].numpy()
        if options.split == "test":
            x_score, y_score = x_a, y_a
        else:
            score = stratified_subset(data.y_test.numpy(), min(len(idx), len(data.y_test)),
                                      options.seed)
            x_score, y_score = data.x_test[score].to(device, dtype), data.y_test[score].numpy()

    with torch.no_grad():
        probe_shapes = template.forward_taps(torch.zeros(1, *data.input_shape), taps)
    sizes = {t: int(np.prod(probe_shapes[t].shape[1:])) for t in taps}
    teacher = _load(run, "T", template, device, dtype)[0] if "T" in available else None
    n_store = 2 * len(idx) + ((len(y_fit) + (len(y_score) if options.split != "test" else 0))
                              if options.probe else 0)  # 2x: the teacher's features too
    groups = _groups(sizes, n_store, options.memory_gb * 2**30)
    num_classes = derived.num_classes
    probe = cfg.probe  # the training-time probe's settings (C, tol, dtype, solver)

    result = Analysis(layers=taps)
    t0 = time.perf_counter()
    for name in names:
        model, meta = _load(run, name, template, device, dtype)
        result.checkpoints[name] = {"step": meta.get("step"), "kind": meta.get("kind")}
        for group in groups:
            feats = _collect(model, x_a, group, options.batch_size, device)
            t_feats = (feats if name == "T" or teacher is None
                       else _collect(teacher, x_a, group, options.batch_size, device))
            if options.probe:
                f_fit = _collect(model, x_fit, group, options.batch_size, device)
                f_score = (feats if options.split == "test"
                           else _collect(model, x_score, group, options.batch_size, device))
            for tap in group:
                if progress is not None:
                    progress(name, tap)
                values = _tap_metrics(feats[tap], y_a, num_classes, options)
                if teacher is not None:
                    values["cka_T"] = _cka(feats[tap], t_feats[tap])
                if options.probe:
                    values["probe_acc"] = linear_probe_accuracy(
                        f_fit[tap].flatten(1), y_fit, f_score[tap].flatten(1), y_score,
                        probe.C, probe.max_iter, solver=options.probe_solver or probe.solver,
                        dtype=probe.dtype, tol=probe.tol)
                for metric, value in values.items():
                    result.rows.append({"checkpoint": name, "layer": tap, "metric": metric,
                                        "value": value})
            del feats, t_feats
            if options.probe:
                del f_fit, f_score
    _relative_to_teacher(result)
    write(run, result, options, time.perf_counter() - t0, len(idx))
    return result


def _load(run: RunDir, name: str, template: EscapeNet, device: torch.device,
          dtype: torch.dtype) -> tuple[EscapeNet, dict[str, Any]]:
    """The network of checkpoint `name` in evaluation mode, and its metadata."""
    tensors, meta = run.load_checkpoint(name)
    model = copy.deepcopy(template)
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval(), meta


def _cka(feats: Tensor, teacher: Tensor) -> float | None:
    """Linear CKA of one tap's features with the teacher's (None if undefined: a layer
    without variance, or non-finite features)."""
    a, b = feats.flatten(1), teacher.flatten(1)
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return None
    value = linear_cka(a, b)
    return value if math.isfinite(value) else None


def _tap_metrics(feats: Tensor, labels: np.ndarray, num_classes: int,
                 options: AnalysisOptions) -> dict[str, Any]:
    dead, units = _dead(feats, options.dead)
    flat = feats.flatten(1)
    finite = bool(torch.isfinite(flat).all())
    out: dict[str, Any] = {"units": units, "dead_units": dead, "dead_frac": dead / units}
    if not finite:  # a diverged checkpoint: nothing spectral can be said
        out.update({k: None for k in ("erank", "condition_number", *SEPARABILITY)})
        return out
    view = GramView(flat)
    s = view.singular_values(options.center)
    out["erank"] = _erank(s)
    out["condition_number"] = _cond(s, options.mass)
    out.update(view.fisher(labels, options.pinv_rtol))
    if options.label_free:
        clusters = kmeans_labels(flat, num_classes, seed=options.seed,
                                 solver=options.kmeans_solver)
        out.update({f"kmeans_{k}": v
                    for k, v in view.fisher(clusters, options.pinv_rtol).items()})
    return out


def _relative_to_teacher(result: Analysis) -> None:
    teacher = {(r["layer"], r["metric"]): r["value"] for r in result.rows
               if r["checkpoint"] == "T"}
    extra = []
    for r in result.rows:
        if r["metric"] in ("discriminant", "kmeans_discriminant"):
            base = teacher.get((r["layer"], r["metric"]))
            value = (r["value"] / base if base and r["value"] is not None
                     else None)
            extra.append({**r, "metric": f"{r['metric']}_rel_teacher", "value": value})
    result.rows.extend(extra)
    order = {layer: i for i, layer in enumerate(result.layers)}
    checkpoints = list(result.checkpoints)
    result.rows.sort(key=lambda r: (checkpoints.index(r["checkpoint"]), order[r["layer"]]))


def write(run: RunDir, result: Analysis, options: AnalysisOptions, wall_s: float,
          n: int) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["checkpoint", "layer", "metric", "value"],
                            lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        value = r["value"]
        writer.writerow({**r, "value": "" if value is None or (
            isinstance(value, float) and not math.isfinite(value)) else value})
    run.write_analysis(buffer.getvalue(), {
        "options": options.model_dump(mode="json"),
        "samples": n, "checkpoints": result.checkpoints, "layers": result.layers,
        "wall_s": wall_s, "rows": result.rows,
    })


def read_analysis(run_dir: Path | str) -> Analysis:
    """Load ``analysis.json`` from a run directory."""
    payload = RunDir.open(run_dir).analysis()
    if payload is None:
        raise EscapelabError(f"{run_dir} has no analysis yet: run escapelab analyze first")
    return Analysis(rows=payload["rows"], checkpoints=payload["checkpoints"],
                    layers=payload["layers"])
