"""The LR range test (paper Fig. 1a, after Smith 2017), for escape and supervised losses.

The step size grows exponentially from ``start_lr`` to ``end_lr`` (paper: 1e-6 -> 1e6)
while the student trains, once on the escape loss (student vs teacher) and once,
side by side, on the labels with cross-entropy (the same architecture and data).
Nothing stops a curve early except a non-finite value or the user's cap: the
"stop at 4x the best loss" rule of torch-lr-finder, Lightning and fastai would end an
escape at once, since its loss starts near 1e-20 and rises by many orders of magnitude.

Detection rules (on each curve, per seed; documented in :func:`detect`):

- losses below ``floor`` (default 1e-12) count as ``floor``: near the teacher a float32
  escape loss is exactly 0 on most batches and ~1e-22 on a few (rounding noise, not
  signal);
- the *starting band* is [min, max] of log10(loss) over the first ``start_steps``
  steps (default: 5% of the steps, at least ``window``);
- the loss is smoothed by a centred running median of log10(loss) over ``window`` steps
  (no lag, robust to single-step spikes);
- *departure*: the first step whose smoothed loss leaves the starting band widened by
  ``depart_factor`` on both sides (default 2): the escape's rise, or the start of
  supervised learning;
- *divergence*: the first step whose smoothed loss exceeds the lowest smoothed loss
  since the departure settled (``window`` steps after it) by ``diverge_factor``
  (default 10), or whose loss is non-finite (or capped): the supervised blow-up, or
  the escape's second rise.

The paper (CIFAR-10, VGG11, 5 epochs at B=256) finds the supervised loss diverging near
eta = 10 and the escape rising in two steps, the second near eta = 500.

Each curve and seed also records lambda_0, the top Hessian eigenvalue of its loss at the
teacher (:mod:`escapelab.sharpness`), the step size ``edge_lr`` = 2 / lambda_0 beyond
which gradient descent cannot stay there, and eta * lambda_0 at the detected departure
and divergence (Kalra and Barkeshli compare step sizes as c = eta * lambda_0).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from escapelab.config import (
    Config,
    RangeOptions,
    build_config,
    config_to_dict,
    merge,
    parse_overrides,
)
from escapelab.store import RangeDir
from escapelab.train import train_or_reuse


def detect(lrs: list[float] | np.ndarray, losses: list[float | None] | np.ndarray,
           window: int = 5, start_steps: int | None = None, depart_factor: float = 2.0,
           diverge_factor: float = 10.0, floor: float = 1e-12, ended_early: bool = False,
           ) -> dict[str, Any]:
    """Departure and divergence of one LR-range curve (see the module docstring).

    Args:
        lrs, losses: per step; a None / non-finite loss marks divergence there.
        ended_early: the run stopped after the last step (capped): divergence there at
            the latest.
    Returns:
        start_low/start_high (the starting band), depart_step/lr, diverge_step/lr (steps
        are 1-based; None if absent).
    """
    lr = np.asarray(lrs, dtype=np.float64)
    raw = np.array([np.nan if v is None else v for v in losses], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(raw))
    end = int(bad[0]) if bad.size else len(raw)  # values before the first non-finite one
    log = np.log10(np.maximum(raw[:end], floor))
    out: dict[str, Any] = {"start_low": None, "start_high": None, "depart_step": None,
                           "depart_lr": None, "diverge_step": None, "diverge_lr": None}
    if end == 0:
        if len(raw):
            out.update(diverge_step=1, diverge_lr=float(lr[0]), depart_step=1,
                       depart_lr=float(lr[0]))
        return out
    w = max(1, window | 1)  # odd
    half = w // 2
    smooth = np.array([np.median(log[max(0, i - half):i + half + 1]) for i in range(end)])
    n_start = min(end, max(w, start_steps or int(math.ceil(0.05 * len(raw)))))
    low, high = float(log[:n_start].min()), float(log[:n_start].max())
    out.update(start_low=10.0**low, start_high=10.0**high)
    margin = math.log10(depart_factor)
    left = np.flatnonzero((smooth > high + margin) | (smooth < low - margin))
    depart = int(left[0]) if left.size else None
    diverge = None
    if depart is not None and depart + w < end:
        # The departure itself is a transient (an escape overshoots, then settles on a
        # plateau): the reference minimum is tracked from `window` steps after it.
        settled = depart + w
        lowest = np.minimum.accumulate(smooth[settled:])
        above = np.flatnonzero(smooth[settled:] > lowest + math.log10(diverge_factor))
        if above.size:
            diverge = settled + int(above[0])
    if diverge is None and (bad.size or ended_early):
        diverge = end if bad.size else end - 1
        if depart is None:
            depart = diverge
    if depart is not None:
        out.update(depart_step=depart + 1, depart_lr=float(lr[depart]))
    if diverge is not None:
        out.update(diverge_step=diverge + 1, diverge_lr=float(lr[diverge]))
    return out


def curve_config(base: Config, options: RangeOptions, curve: str, seed: int) -> Config:
    """The run config of one curve: the base with the range schedule and no probing."""
    over: dict[str, Any] = {
        "seed": seed,
        "schedule.name": "exponential", "schedule.start_lr": options.start_lr,
        "optim.lr": options.end_lr, "probe.enabled": False, "checkpoint.every": 0,
        "sharpness.enabled": False,  # lambda_0 at the teacher is measured anyway
        "train.steps": options.steps, "train.epochs": options.epochs,
        "train.max_loss": options.cap, "name": f"{base.name}-lr-range-{curve}",
    }
    if options.mode == "fixed":
        over["data.sampling"] = "fixed"
    elif options.mode == "full":
        over["data.batch_size"] = "full"
    if curve == "supervised":
        over["loss.name"] = options.supervised
    tree = parse_overrides([f"{k}={_text(v)}" for k, v in over.items()])
    return build_config(merge(config_to_dict(base), tree))


def _text(value: Any) -> str:
    return "null" if value is None else str(value)


def run_lr_range(base: Config, out: Path | str, options: RangeOptions | None = None,
                 progress: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run every curve and seed into ``out/runs/``, write lr_range.csv and lr_range.json
    into `out`, and return the JSON payload."""
    options = options or RangeOptions()
    folder = RangeDir(out)
    curves = ["escape"] + (["supervised"] if options.supervised != "none" else [])
    rows: list[dict[str, Any]] = []
    detected: dict[str, dict[str, Any]] = {}
    for curve in curves:
        per_seed = {}
        for seed in options.seeds:
            if progress is not None:
                progress(curve, seed)
            cfg = curve_config(base, options, curve, seed)
            run = folder.run(curve, seed)
            summary = train_or_reuse(cfg, run.path)
            steps = run.steps()
            for r in steps:
                rows.append({"curve": curve, "seed": seed, "step": r["step"], "lr": r["lr"],
                             "loss": r["loss"], "grad_norm": r["grad_norm"]})
            found = detect([r["lr"] for r in steps], [r["loss"] for r in steps],
                           options.window, options.start_steps, options.depart_factor,
                           options.diverge_factor, options.floor,
                           ended_early=summary["status"] == "capped")
            per_seed[str(seed)] = {"status": summary["status"], **found,
                                   **_curvature(summary["lambda0"], found)}
        detected[curve] = {"seeds": per_seed, **_aggregate(per_seed)}
    payload = {"options": options.model_dump(mode="json"), "rules": _RULES,
               "curves": detected, "band": _band(rows, curves)}
    folder.write(_csv_text(rows), payload)
    return payload


def _curvature(lambda0: float | None, found: dict[str, Any]) -> dict[str, Any]:
    """lambda_0, the edge 2 / lambda_0, and eta * lambda_0 at departure and divergence."""
    out: dict[str, Any] = {"lambda0": lambda0, "edge_lr": None, "depart_eta_lambda0": None,
                           "diverge_eta_lambda0": None}
    if lambda0 is not None and lambda0 > 0:
        out["edge_lr"] = 2.0 / lambda0
        for key in ("depart", "diverge"):
            lr = found[f"{key}_lr"]
            out[f"{key}_eta_lambda0"] = lr * lambda0 if lr is not None else None
    return out


_RULES = ("losses below `floor` count as `floor`; starting band: [min, max] of log10 loss "
          "over the first 5% of steps (>= window); smoothed: centred running median of "
          "log10 loss over `window` steps; departure: first step whose smoothed loss leaves "
          "the starting band widened by depart_factor on both sides; divergence: first "
          "step whose smoothed loss exceeds the lowest smoothed loss since `window` steps "
          "after departure by diverge_factor, or a non-finite/capped loss.")


def _aggregate(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("depart_lr", "diverge_lr"):
        values = [v[key] for v in per_seed.values() if v[key] is not None]
        out[key] = float(np.exp(np.median(np.log(values)))) if values else None
        out[f"{key}_min"] = min(values) if values else None
        out[f"{key}_max"] = max(values) if values else None
    return out


def _band(rows: list[dict[str, Any]], curves: list[str]) -> dict[str, Any]:
    """Per curve and step: the step size and the min / median / max loss over seeds."""
    band: dict[str, Any] = {}
    for curve in curves:
        by_step: dict[int, list[float]] = {}
        lrs: dict[int, float] = {}
        for r in rows:
            if r["curve"] == curve:
                lrs[r["step"]] = r["lr"]
                if r["loss"] is not None and math.isfinite(r["loss"]):
                    by_step.setdefault(r["step"], []).append(r["loss"])
        steps = sorted(by_step)
        band[curve] = {"step": steps, "lr": [lrs[s] for s in steps],
                       "min": [min(by_step[s]) for s in steps],
                       "median": [float(np.median(by_step[s])) for s in steps],
                       "max": [max(by_step[s]) for s in steps]}
    return band


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["curve", "seed", "step", "lr", "loss",
                                                "grad_norm"], lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buffer.getvalue()
