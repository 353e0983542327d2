"""Escape timing and phases: pure functions of a run's records.

Every quantity here is computed from ``metrics/steps.jsonl`` (one record per SGD step:
loss and gradient norm at theta^(k-1)), ``metrics/evals.jsonl`` (probes at the
evaluation schedule) and ``metrics/sharpness.jsonl`` (top Hessian eigenvalue on its
schedule), so it can be recomputed for any finished run (``timeline``) and is written
into ``summary.json`` at the end of a run. The rules:

- **escape step**: the first step whose training loss exceeds ``train.escape_threshold``
  (the student has measurably left its teacher; recorded during the run).
- **collapse step**: checkpoint C's step (``checkpoint.collapse``, by default the
  evaluation after the escape with the lowest effective rank). Its **depth** is
  ``erank_drop`` = erank(T) / erank(C) (how many times the encoder's effective rank
  shrank) and ``probe_drop`` = probe(T) - probe(C) (accuracy fraction lost).
- **recovery step**: the first evaluated step after the collapse step whose linear-probe
  accuracy is back at the teacher's or above (None: it never gets back within the run).
- **oscillation onset**: the first step at or after the escape from which the gradient
  norm alternates: with r_k = log(g_k / g_{k-1}), step k "turns" when r_k and r_{k-1}
  have opposite signs and both |r| >= log(``OSC_JUMP``) (the norm moves by at least 10%
  each step, up then down). The onset is the first turning step k that starts a window
  of ``OSC_WINDOW`` steps (k included) of which at least ``OSC_SHARE`` turn. Gradient
  descent on a quadratic at step size eta oscillates this way along a direction whose
  curvature exceeds 2/eta, so the onset marks where SGD stops following the loss
  landscape smoothly.
- **catapults**: a loss spike, loss_k > ``SPIKE_FACTOR`` x the median loss of the
  ``SPIKE_WINDOW`` steps before it (at least ``SPIKE_MIN_HISTORY`` early in a run),
  after which the top Hessian eigenvalue is lower: the first sharpness measurement
  after k is below ``SHARPNESS_DROP`` x the last one at or before k (Lewkowycz et al.'s
  catapult: the loss grows, the network moves to a flatter region, the loss comes back
  down). Needs sharpness measurements (``sharpness.enabled``);
  consecutive spikes between the same two measurements count once.
- **phase**: ``diverges`` (non-finite or capped loss), ``escapes`` (left the teacher and
  ends at least ``PHASE_MARGIN`` above its probe accuracy), ``collapses`` (left it, fell
  more than the margin below it at some point or at the end, and does not end above),
  ``stays`` otherwise (never left, or left without the probe noticing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PHASE_MARGIN = 0.005  # half a point of probe accuracy
PHASES = ("stays", "escapes", "collapses", "diverges")
OSC_JUMP = 1.1  # the gradient norm moves by at least 10% per step ...
OSC_WINDOW = 20  # ... in a window of this many steps ...
OSC_SHARE = 0.5  # ... of which at least this share turn (up then down, or down then up)
SPIKE_FACTOR = 2.0  # a loss spike: above this multiple of the recent median ...
SPIKE_WINDOW = 10  # ... of this many preceding steps (fewer, at least
SPIKE_MIN_HISTORY = 3  # this many, early in a run: the escape comes within ~5-15 steps)
SHARPNESS_DROP = 0.9  # a catapult: the next sharpness below this multiple of the last


def phase(summary: dict[str, Any], margin: float = PHASE_MARGIN) -> str:
    """The phase label of one run from its summary (module docstring; accuracies are
    fractions, so margin 0.005 = 0.5 points). Unfinished runs get their status."""
    status = summary.get("status")
    if status in ("diverged", "capped"):
        return "diverges"
    if status not in ("completed",):
        return status or "missing"
    teacher, final = summary.get("teacher_probe_acc"), summary.get("final_probe_acc")
    lowest = summary.get("min_probe_acc")
    if summary.get("escape_step") is None or teacher is None or final is None:
        return "stays"
    if final >= teacher + margin:
        return "escapes"
    if (lowest is not None and lowest < teacher - margin) or final < teacher - margin:
        return "collapses"
    return "stays"


def recovery_step(evals: Sequence[dict[str, Any]], teacher_probe: float | None,
                  after: int | None) -> int | None:
    """First student evaluation after step `after` whose probe accuracy is at least the
    teacher's (None if there is none, or nothing to compare)."""
    if teacher_probe is None or after is None:
        return None
    for r in sorted(evals, key=lambda r: r["step"]):
        acc = r.get("probe_acc")
        if r.get("model", "student") == "student" and r["step"] > after and acc is not None \
                and acc >= teacher_probe:
            return int(r["step"])
    return None


def oscillation_onset(steps: Sequence[dict[str, Any]], start: int | None,
                      jump: float = OSC_JUMP, window: int = OSC_WINDOW,
                      share: float = OSC_SHARE) -> int | None:
    """The first step >= `start` that begins a window of `window` steps in which at least
    `share` of the steps turn (module docstring); None if none does or no escape."""
    if start is None:
        return None
    k = np.array([r["step"] for r in steps], dtype=np.int64)
    g = np.array([r.get("grad_norm") if r.get("grad_norm") is not None else math.nan
                  for r in steps], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.diff(np.log(g))  # r[i] = log(g[i+1] / g[i])
    big = np.abs(r) >= math.log(jump)
    # turn[i] refers to step k[i + 2]: r[i+1] and r[i] opposite and both large
    turn = (np.sign(r[1:]) * np.sign(r[:-1]) < 0) & big[1:] & big[:-1]
    turn &= np.diff(k)[1:] == 1  # consecutive steps only (a gap is no evidence)
    turn_steps = k[2:]
    if len(turn) < window:
        return None
    counts = np.convolve(turn.astype(np.int64), np.ones(window, np.int64), "valid")
    need = math.ceil(share * window)
    for i in np.flatnonzero(turn[:len(counts)] & (counts >= need)):
        if turn_steps[i] >= start:
            return int(turn_steps[i])
    return None


def catapults(steps: Sequence[dict[str, Any]], sharpness: Sequence[dict[str, Any]],
              factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
              drop: float = SHARPNESS_DROP) -> list[int]:
    """Steps of loss spikes followed by a drop of the top Hessian eigenvalue (module
    docstring): one per pair of consecutive sharpness measurements at most."""
    measured = sorted((int(r["step"]), top) for r in sharpness
                      if r.get("model", "student") == "student"
                      and (top := _top(r)) is not None)
    if len(measured) < 2:
        return []
    at = np.array([m[0] for m in measured])
    tops = np.array([m[1] for m in measured])
    loss = [(int(r["step"]), r.get("loss")) for r in steps]
    events: list[int] = []
    seen: set[int] = set()
    for i in range(SPIKE_MIN_HISTORY, len(loss)):
        step, value = loss[i]
        recent = [v for _, v in loss[max(0, i - window):i]
                  if v is not None and math.isfinite(v)]
        if value is None or not math.isfinite(value) or len(recent) < SPIKE_MIN_HISTORY:
            continue
        if value <= factor * float(np.median(recent)):
            continue
        before = np.flatnonzero(at <= step)
        after = np.flatnonzero(at > step)
        if len(before) == 0 or len(after) == 0:
            continue
        b, a = int(before[-1]), int(after[0])
        if b in seen:
            continue
        if tops[a] < drop * tops[b]:
            events.append(step)
            seen.add(b)
    return events


def _top(record: dict[str, Any]) -> float | None:
    """The top eigenvalue of a sharpness.jsonl record (None if absent or not finite)."""
    values = record.get("eigenvalues") or [None]
    top = values[0]
    return float(top) if top is not None and math.isfinite(top) else None


@dataclass(frozen=True)
class Timeline:
    """A run's escape timing (module docstring); steps are SGD steps."""

    escape_step: int | None = None
    collapse_step: int | None = None
    erank_drop: float | None = None  # erank(T) / erank(C)
    probe_drop: float | None = None  # probe(T) - probe(C), fraction
    recovery_step: int | None = None
    oscillation_onset: int | None = None
    catapult_steps: list[int] = field(default_factory=list)
    phase: str = "missing"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def timeline(summary: dict[str, Any], steps: Sequence[dict[str, Any]],
             evals: Sequence[dict[str, Any]], sharpness: Sequence[dict[str, Any]],
             ) -> Timeline:
    """The timing of one run from its summary's escape and collapse steps and its
    records (module docstring)."""
    escape, collapse = summary.get("escape_step"), summary.get("collapse_step")
    e_t, e_c = summary.get("erank_teacher"), summary.get("erank_collapse")
    p_t, p_c = summary.get("teacher_probe_acc"), summary.get("probe_acc_collapse")
    students = [r for r in evals if r.get("model", "student") == "student"]
    return Timeline(
        escape_step=escape,
        collapse_step=collapse,
        erank_drop=e_t / e_c if e_t is not None and e_c else None,
        probe_drop=p_t - p_c if p_t is not None and p_c is not None else None,
        recovery_step=recovery_step(students, p_t, collapse),
        oscillation_onset=oscillation_onset(steps, escape),
        catapult_steps=catapults(steps, sharpness),
        phase=phase(summary),
    )
