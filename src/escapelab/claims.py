"""The paper's claims, each with the quantity that tests it and a verdict.

Each claim is stated in our words with its figure, measured on a study's folders
(:mod:`escapelab.study`) and judged by a rule written next to it (the constants below,
printed in the report with the rule, so a reader who disagrees with a threshold can see
what it would change). Verdicts:

- ``holds``: the rule is met in every seed (or, for a trend, strongly);
- ``partly``: in some seeds, some layers, or a weaker trend;
- ``does not hold``: in none;
- ``not measured``: the study has no data for it (with the reason);
- ``found``: a follow-up question (Sec. 4) stated as what was measured, no verdict.

:func:`gather` reads a study folder into an :class:`Evidence` (the only I/O here);
:func:`evaluate` is a pure function of it, so every rule can be tested on hand-made
records. Accuracies are fractions; "points" are percentage points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from escapelab.phases import PHASE_MARGIN

HOLDS, PARTLY, NOT_HOLD, NOT_MEASURED, FOUND = ("holds", "partly", "does not hold",
                                                "not measured", "found")
VERDICTS = (HOLDS, PARTLY, NOT_HOLD, NOT_MEASURED, FOUND)

# -- thresholds (each rule's text below quotes them) ---------------------------------------
FAR_RATIO = 10.0  # "far below": the escape departs at >= 10x the supervised divergence
STAGE_RATIO = 3.0  # two stages: the escape's second rise at >= 3x its departure's eta
RHO_STRONG = 0.8  # a trend holds at Spearman rho >= 0.8, partly at rho > 0
MIN_TREND_POINTS = 3  # a trend needs at least this many step / batch sizes
SPIKE_WITHIN = 50  # the loss spike peaks within this many steps ...
SPIKE_RATIO = 10.0  # ... at >= 10x the median loss of the SPIKE_AFTER steps after it
SPIKE_AFTER = 100
PLATEAU_HALF = 5  # plateau: median over the collapse step +- 5 steps ...
PLATEAU_SHARE = 0.1  # ... of loss and gradient norm <= 0.1x their early peaks
GROWTH = 2.0  # GD: the gradient norm before the oscillation >= 2x its collapse value
RANK_DEFICIENT = 0.5  # rank-deficient: erank < half of min(units, samples)
SINGLE_DIGITS = 10.0  # the collapse's effective rank below 10
BETWEEN_FACTOR = 2.0  # "much higher" between-class variance: >= 2x T's and S's
SHARPNESS_BAND = 0.2  # lambda_max within 20% of 2/eta counts as "at the edge"
MARGIN_POINTS = 100 * PHASE_MARGIN  # the phases' margin, in points


@dataclass
class Claim:
    """One claim and its verdict (every text field is shown in the report)."""

    id: str
    group: str  # LR range test, Step size, ...
    figure: str  # the paper's figure, e.g. "Fig. 1c"
    statement: str  # the claim, in our words
    quantity: str  # what is measured
    paper: str  # the paper's value, where it gives one
    value: str  # the study's value, with its spread over seeds
    verdict: str
    rule: str  # the rule behind the verdict, with its thresholds
    detail: str = ""  # per seed / per layer, or why not measured
    link: str | None = None  # the figure that shows it: "<part>/<figure id>"
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunFacts:
    """What one finished (or unfinished) run contributes: its axis values, summary, and
    (for the runs whose dynamics or layers are read) its records and analysis."""

    seed: int
    lr: float
    batch_size: int | str = 0  # "full" for full-batch gradient descent
    n_train: int | None = None  # training images (what "full" means)
    loss: str = ""
    schedule: str = ""
    warmup_steps: int = 0
    summary: dict[str, Any] | None = None  # None: not finished
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # student evaluations
    sharpness: list[dict[str, Any]] = field(default_factory=list)  # student records
    analysis: dict[str, Any] | None = None  # analysis.json

    @property
    def phase(self) -> str | None:
        return self.summary.get("phase") if self.summary else None


@dataclass
class Evidence:
    """Everything the claims read, gathered from a study folder (or built by hand)."""

    lr_range: dict[str, Any] | None = None  # lr_range.json
    step_size: list[RunFacts] = field(default_factory=list)
    batch_size: list[RunFacts] = field(default_factory=list)
    loss_warmup: list[RunFacts] = field(default_factory=list)
    representative_lr: float | None = None
    finetune: dict[str, Any] | None = None  # finetune.json of the first seed's run
    missing: dict[str, str] = field(default_factory=dict)  # part -> why it has no data

    def representatives(self) -> list[RunFacts]:
        return sorted((r for r in self.step_size if r.lr == self.representative_lr),
                      key=lambda r: r.seed)


# ---------------------------------------------------------------------------------------
# Small helpers


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def by_seeds(flags: Sequence[bool | None]) -> str:
    """holds if every measurable flag is true, partly if some, does not hold if none,
    not measured if none is measurable (None)."""
    known = [f for f in flags if f is not None]
    if not known:
        return NOT_MEASURED
    if all(known):
        return HOLDS
    return PARTLY if any(known) else NOT_HOLD


def by_trend(rho: float | None) -> str:
    if rho is None or not math.isfinite(rho):
        return NOT_MEASURED
    return HOLDS if rho >= RHO_STRONG else PARTLY if rho > 0 else NOT_HOLD


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties; +inf allowed in y); None if
    either side is constant or there are fewer than two points."""
    from scipy.stats import spearmanr

    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = spearmanr(x, y).statistic
    return float(rho) if math.isfinite(rho) else None


def spread(values: Sequence[float | None], scale: float = 1.0, unit: str = "",
           digits: int = 3) -> str:
    """"mean ± std (n seeds: a, b)" of the finite values, scaled (std over seeds, ddof 0)."""
    nums = [scale * v for v in values if _finite(v)]
    if not nums:
        return "-"
    unit = f" {unit}" if unit else ""
    if len(nums) == 1:
        return f"{nums[0]:.{digits}g}{unit}"
    each = ", ".join(f"{v:.{digits}g}" for v in nums)
    return (f"{np.mean(nums):.{digits}g} ± {np.std(nums):.2g}{unit} "
            f"({len(nums)} seeds: {each})")


def _pct(value: float | None) -> str:
    return "-" if not _finite(value) else f"{100 * value:.1f}%"


def _eta(value: float | None) -> str:
    return "-" if not _finite(value) else f"{value:.3g}"


def _layers(analysis: dict[str, Any]) -> list[str]:
    """The post-activation taps (ReLU outputs and the encoder output), network order:
    the layers the paper's Figs. 2 and 3 draw."""
    return [t for t in analysis["layers"] if t.startswith("relu") or t == "encoder"]


def _tap(analysis: dict[str, Any], checkpoint: str, layer: str, metric: str) -> float | None:
    for r in analysis["rows"]:
        if (r["checkpoint"], r["layer"], r["metric"]) == (checkpoint, layer, metric):
            value = r["value"]
            return float(value) if _finite(value) else None
    return None


def _window(steps: list[dict[str, Any]], key: str, lo: int, hi: int) -> float | None:
    vals = [r[key] for r in steps if lo <= r["step"] <= hi and _finite(r.get(key))]
    return float(np.median(vals)) if vals else None


def _last_eval_at_or_before(evals: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    before = [r for r in evals if r["step"] <= step and _finite(r.get("probe_acc"))]
    return max(before, key=lambda r: r["step"]) if before else None


def _analysed(runs: list[RunFacts]) -> list[RunFacts]:
    return [r for r in runs if r.analysis is not None]


def _missing(claim: Claim, why: str) -> Claim:
    claim.verdict, claim.detail, claim.value = NOT_MEASURED, why, "-"
    return claim


# ---------------------------------------------------------------------------------------
# The claims. Each function takes the evidence and returns one Claim.


def lr_range_supervised_first(ev: Evidence) -> Claim:
    c = Claim("lr-range-supervised-first", "LR range test", "Fig. 1a",
              "Supervised training diverges at a step size far below the one at which "
              "the student leaves its teacher.",
              "eta where the escape loss departs / eta where the supervised loss diverges",
              "supervised diverges at eta ~10, escape's second stage at ~500 (50x)", "", "",
              f"per seed: holds if the ratio is >= {FAR_RATIO:g}; holds in every seed -> "
              "holds, in some -> partly, in none -> does not hold",
              link="lr-range/fig1a_lr_range")
    curves = (ev.lr_range or {}).get("curves", {})
    if "escape" not in curves or "supervised" not in curves:
        return _missing(c, ev.missing.get("lr-range", "no LR range test with both curves"))
    ratios: list[float] = []
    flags: list[bool | None] = []
    details: list[str] = []
    for seed, esc in curves["escape"]["seeds"].items():
        sup = curves["supervised"]["seeds"].get(seed, {})
        a, b = esc.get("depart_lr"), sup.get("diverge_lr")
        if not (_finite(a) and _finite(b)):
            flags.append(None)
            details.append(f"seed {seed}: escape departs at {_eta(a)}, supervised "
                           f"diverges at {_eta(b)}")
            continue
        ratios.append(a / b)
        flags.append(a / b >= FAR_RATIO)
        details.append(f"seed {seed}: {_eta(a)} / {_eta(b)} = {a / b:.3g}")
    c.verdict = by_seeds(flags)
    c.value = f"ratio {spread(ratios)}" if ratios else "-"
    c.detail = "; ".join(details)
    c.numbers = {"ratios": ratios}
    return c


def lr_range_two_stages(ev: Evidence) -> Claim:
    c = Claim("lr-range-two-stages", "LR range test", "Fig. 1a",
              "The student leaves its teacher in two stages, the second at a large step "
              "size.",
              "the escape curve's departure and its second rise (lr_range.py's rules): eta "
              "of each, and their ratio",
              "second stage at eta ~500", "", "",
              f"per seed: holds if both stages are detected and the second comes at >= "
              f"{STAGE_RATIO:g}x the first's eta; every seed -> holds, some -> partly, none "
              "-> does not hold", link="lr-range/fig1a_lr_range")
    curves = (ev.lr_range or {}).get("curves", {})
    if "escape" not in curves:
        return _missing(c, ev.missing.get("lr-range", "no LR range test"))
    flags, seconds, details = [], [], []
    for seed, esc in curves["escape"]["seeds"].items():
        a, b = esc.get("depart_lr"), esc.get("diverge_lr")
        both = _finite(a) and _finite(b)
        flags.append(bool(both and b >= STAGE_RATIO * a))
        if both:
            seconds.append(b)
        details.append(f"seed {seed}: first at {_eta(a)}, second at {_eta(b)}")
    c.verdict = by_seeds(flags)
    c.value = f"second stage at eta {spread(seconds)}" if seconds else "no second stage"
    c.detail = "; ".join(details)
    return c


def _by_lr(runs: list[RunFacts]) -> dict[float, list[RunFacts]]:
    out: dict[float, list[RunFacts]] = {}
    for r in sorted(runs, key=lambda r: (r.lr, r.seed)):
        out.setdefault(r.lr, []).append(r)
    return out


def _gain(r: RunFacts) -> float | None:
    return r.summary.get("gain") if r.summary else None


def step_small_stays(ev: Evidence) -> Claim:
    c = Claim("step-small-stays", "Step size", "Fig. 1c",
              "A small step size makes no progress: the student stays at its teacher.",
              "phase of the runs at the smallest step size (escapelab.phases)",
              "eta 32 makes no progress", "", "",
              "per seed: holds if the phase is 'stays' (never leaves, or leaves without the "
              f"probe moving by {MARGIN_POINTS:g} points); every seed -> holds, some -> "
              "partly, none -> does not hold", link="step-size/fig1c_probe_by_lr")
    return _phase_at_end(ev, c, min, ("stays",))


def _phase_at_end(ev: Evidence, c: Claim, end: Callable[[list[float]], float],
                  phases: tuple[str, ...]) -> Claim:
    """Judge the runs at the smallest or largest step size (`end`) per seed: does their
    phase belong to `phases`? Needs two step sizes at least (one is no range)."""
    lrs = _by_lr([r for r in ev.step_size if r.summary])
    if len(lrs) < 2:
        return _missing(c, ev.missing.get("step-size", "fewer than two step sizes finished"))
    lr = end(list(lrs))
    runs = lrs[lr]
    c.verdict = by_seeds([r.phase in phases for r in runs])
    c.value = (f"eta {lr:g}: " + ", ".join(f"seed {r.seed} {r.phase}" for r in runs)
               + f"; gain {spread([_gain(r) for r in runs], 100, 'points')}")
    return c


def step_larger_escape(ev: Evidence) -> Claim:
    c = Claim("step-larger-escape", "Step size", "Fig. 1c",
              "Larger step sizes escape: the student leaves its teacher.",
              "runs above the smallest step size whose loss rises past "
              "train.escape_threshold (an escape step)", "every eta >= 316 escapes", "", "",
              "holds if every run above the smallest step size has an escape step, partly "
              "if some do, does not hold if none", link="step-size/fig1c_probe_by_lr")
    lrs = _by_lr([r for r in ev.step_size if r.summary])
    if len(lrs) < 2:
        return _missing(c, ev.missing.get("step-size", "fewer than two step sizes finished"))
    runs = [r for lr in sorted(lrs)[1:] for r in lrs[lr]]
    flags = [r.summary.get("escape_step") is not None for r in runs if r.summary]
    c.verdict = by_seeds(flags)
    c.value = f"{sum(flags)} of {len(flags)} runs leave the teacher"
    c.detail = "; ".join(
        f"eta {lr:g}: escape step " + "/".join(str(r.summary.get('escape_step'))
                                                for r in lrs[lr] if r.summary)
        for lr in sorted(lrs)[1:])
    return c


def step_probe_increases(ev: Evidence) -> Claim:
    c = Claim("step-probe-increases", "Step size", "Fig. 1c",
              "Among the step sizes that escape, the final probe accuracy increases with "
              "the step size.",
              "Spearman rho between log eta and the seed-mean final probe accuracy, over "
              "the step sizes at which every seed ends in phase 'escapes'",
              "correlation between step size and probing performance", "", "",
              f"holds if rho >= {RHO_STRONG:g}, partly if rho > 0, does not hold if rho <= "
              f"0; not measured with fewer than {MIN_TREND_POINTS} escaping step sizes",
              link="step-size/fig1c_probe_by_lr")
    lrs = _by_lr([r for r in ev.step_size if r.summary])
    escaping = {lr: runs for lr, runs in lrs.items()
                if runs and all(r.phase == "escapes" for r in runs)}
    if len(escaping) < MIN_TREND_POINTS:
        return _missing(c, f"{len(escaping)} step size(s) escape in every seed "
                        f"({', '.join(f'{x:g}' for x in escaping) or 'none'}); the trend "
                        f"needs {MIN_TREND_POINTS}")
    xs = sorted(escaping)
    ys = [float(np.mean([(r.summary or {})["final_probe_acc"] for r in escaping[x]]))
          for x in xs]
    rho = spearman([math.log(x) for x in xs], ys)
    c.verdict = by_trend(rho)
    c.value = f"rho = {rho:.2f}" if rho is not None else "rho undefined"
    c.detail = "; ".join(f"eta {x:g}: {_pct(y)}" for x, y in zip(xs, ys, strict=True))
    c.numbers = {"rho": rho, "lrs": xs, "final_probe": ys}
    return c


def step_drop_recover(ev: Evidence) -> Claim:
    lr = ev.representative_lr
    c = Claim("step-drop-recover", "Step size", "Fig. 1c",
              "The probe accuracy first drops, then recovers and ends above the teacher's.",
              f"at the representative eta {_eta(lr)}: teacher -> lowest -> final probe "
              "accuracy, and the gain (final - teacher)",
              "CIFAR-10 / VGG11: ends above the teacher after a collapse", "", "",
              f"per seed: holds if the lowest probe is > {MARGIN_POINTS:g} points below the "
              f"teacher's and the final one > {MARGIN_POINTS:g} points above; every seed -> "
              "holds, some -> partly, none -> does not hold",
              link="step-size/fig1c_probe_by_lr")
    runs = [r for r in ev.representatives() if r.summary]
    if not runs:
        return _missing(c, ev.missing.get("step-size", "no finished representative run"))
    flags: list[bool | None] = []
    for r in runs:
        s = r.summary or {}
        t, lo, f = s.get("teacher_probe_acc"), s.get("min_probe_acc"), s.get("final_probe_acc")
        if _finite(t) and _finite(lo) and _finite(f):
            flags.append(lo < t - PHASE_MARGIN and f > t + PHASE_MARGIN)
        else:
            flags.append(None)
    c.verdict = by_seeds(flags)

    def mean(key: str) -> float | None:
        vals = [r.summary[key] for r in runs if r.summary and _finite(r.summary.get(key))]
        return float(np.mean(vals)) if vals else None

    c.value = (f"{_pct(mean('teacher_probe_acc'))} -> {_pct(mean('min_probe_acc'))} -> "
               f"{_pct(mean('final_probe_acc'))}; gain "
               f"{spread([_gain(r) for r in runs], 100, 'points')}")
    c.numbers = {"gain": [_gain(r) for r in runs]}
    return c


def step_largest_unrecovered(ev: Evidence) -> Claim:
    c = Claim("step-largest-unrecovered", "Step size", "Fig. 1c",
              "The largest step size collapses and does not recover within the run.",
              "phase of the runs at the largest step size",
              "eta > 1e4 collapses without recovering in 20k steps", "", "",
              "per seed: holds if the phase is 'collapses' or 'diverges' (does not end "
              f"{MARGIN_POINTS:g} points above the teacher); every seed -> holds, some -> "
              "partly, none -> does not hold", link="step-size/fig1c_probe_by_lr")
    return _phase_at_end(ev, c, max, ("collapses", "diverges"))


def _batch_number(r: RunFacts) -> float:
    if r.batch_size == "full":
        return float(r.n_train or math.inf)
    return float(r.batch_size)


def batch_slower_recovery(ev: Evidence) -> Claim:
    c = Claim("batch-slower-recovery", "Batch size", "Fig. 1d",
              "Larger batches take longer to recover from the collapse.",
              "Spearman rho between the batch size and the seed-mean recovery step (the "
              "first evaluation after C back at the teacher's probe; a run that never "
              "recovers counts as slowest)",
              "with less noise the model takes longer to uncollapse in 6k steps", "", "",
              f"holds if rho >= {RHO_STRONG:g}, partly if rho > 0, does not hold if rho <= "
              f"0; not measured with fewer than {MIN_TREND_POINTS} batch sizes or if no run "
              "recovers", link="batch-size/fig1d_probe_by_batch")
    groups: dict[float, list[RunFacts]] = {}
    for r in ev.batch_size:
        if r.summary:
            groups.setdefault(_batch_number(r), []).append(r)
    if len(groups) < MIN_TREND_POINTS:
        return _missing(c, ev.missing.get("batch-size", f"{len(groups)} batch size(s) "
                                          "finished"))
    xs = sorted(groups)
    ys = []
    for x in xs:
        steps = [r.summary.get("recovery_step") for r in groups[x] if r.summary]
        known = [float(s) for s in steps if s is not None]
        ys.append(math.inf if len(known) < len(steps) else float(np.mean(known)))
    if all(math.isinf(y) for y in ys):
        return _missing(c, "no batch size recovers to the teacher's probe accuracy")
    rho = spearman(xs, ys)
    c.verdict = by_trend(rho)
    c.value = f"rho = {rho:.2f}" if rho is not None else "rho undefined (equal steps)"
    c.detail = "; ".join(f"B {_batch_label(groups[x][0])}: "
                         + ("never" if math.isinf(y) else f"step {y:.0f}")
                         for x, y in zip(xs, ys, strict=True))
    c.numbers = {"batch": xs, "recovery_step": ys}
    return c


def _batch_label(r: RunFacts) -> str:
    return f"full ({r.n_train})" if r.batch_size == "full" else str(r.batch_size)


def batch_full_escapes(ev: Evidence) -> Claim:
    c = Claim("batch-full-escapes", "Batch size", "Fig. 1d",
              "Full-batch gradient descent (no gradient noise) still escapes and ends above "
              "the teacher.", "phase and gain of the full-batch runs",
              "full-batch GD escapes and probes better (B = 49,152)", "", "",
              "per seed: holds if the phase is 'escapes' (ends > "
              f"{MARGIN_POINTS:g} points above the teacher); every seed -> holds, some -> "
              "partly, none -> does not hold", link="batch-size/fig1d_probe_by_batch")
    runs = [r for r in ev.batch_size if r.batch_size == "full" and r.summary]
    if not runs:
        return _missing(c, ev.missing.get("batch-size", "no finished full-batch run"))
    c.verdict = by_seeds([r.phase == "escapes" for r in runs])
    c.value = (f"B = {runs[0].n_train}: gain {spread([_gain(r) for r in runs], 100, 'points')}"
               f"; phases {', '.join(str(r.phase) for r in runs)}")
    return c


def _spike(steps: list[dict[str, Any]]) -> tuple[int, float, float] | None:
    """(step, loss) of the largest loss within SPIKE_WITHIN steps, and the median loss of
    the SPIKE_AFTER steps after it."""
    early = [r for r in steps if r["step"] <= SPIKE_WITHIN and _finite(r.get("loss"))]
    if not early:
        return None
    peak = max(early, key=lambda r: r["loss"])
    after = _window(steps, "loss", peak["step"] + 1, peak["step"] + SPIKE_AFTER)
    if after is None:
        return None
    return int(peak["step"]), float(peak["loss"]), after


def dynamics_spike(ev: Evidence) -> Claim:
    c = Claim("dynamics-spike", "Dynamics", "Fig. 1b",
              "Within the first few steps the loss spikes, then falls.",
              f"the largest training loss of the first {SPIKE_WITHIN} steps, against the "
              f"median loss of the {SPIKE_AFTER} steps after it (representative runs)",
              "a spike within the first three steps", "", "",
              f"per seed: holds if that peak is >= {SPIKE_RATIO:g}x the later median; "
              "every seed -> holds, some -> partly, none -> does not hold",
              link="rep/fig1b_loss_grad")
    runs = [r for r in ev.representatives() if r.steps]
    if not runs:
        return _missing(c, ev.missing.get("step-size", "no representative run's steps"))
    flags: list[bool | None] = []
    ratios: list[float] = []
    details: list[str] = []
    for r in runs:
        found = _spike(r.steps)
        if found is None or found[2] <= 0:
            flags.append(None if found is None else True)
            continue
        step, peak, after = found
        ratios.append(peak / after)
        flags.append(peak >= SPIKE_RATIO * after)
        details.append(f"seed {r.seed}: peak {peak:.3g} at step {step}, then {after:.3g}")
    c.verdict = by_seeds(flags)
    c.value = f"peak / later median {spread(ratios)}" if ratios else "-"
    c.detail = "; ".join(details)
    return c


def dynamics_plateau(ev: Evidence) -> Claim:
    c = Claim("dynamics-plateau", "Dynamics", "Fig. 1b",
              "After the spike comes a plateau of small loss and gradient that coincides "
              "with the collapse.",
              f"median loss and gradient norm over the collapse step C +- {PLATEAU_HALF} "
              f"steps, relative to their largest values in the first {SPIKE_WITHIN} steps",
              "the plateau corresponds to low probing and rank-collapsed representations",
              "", "",
              f"per seed: holds if both are <= {PLATEAU_SHARE:g}x their early peaks; every "
              "seed -> holds, some -> partly, none -> does not hold",
              link="rep/fig1b_loss_grad")
    runs = [r for r in ev.representatives() if r.steps and r.summary]
    if not runs:
        return _missing(c, ev.missing.get("step-size", "no representative run's steps"))
    flags: list[bool | None] = []
    details: list[str] = []
    for r in runs:
        k = (r.summary or {}).get("collapse_step")
        early = [x for x in r.steps if x["step"] <= SPIKE_WITHIN]
        loss_peak = max((x["loss"] for x in early if _finite(x.get("loss"))), default=None)
        grad_peak = max((x["grad_norm"] for x in early if _finite(x.get("grad_norm"))),
                        default=None)
        if k is None or not loss_peak or not grad_peak:
            flags.append(None)
            continue
        loss = _window(r.steps, "loss", k - PLATEAU_HALF, k + PLATEAU_HALF)
        grad = _window(r.steps, "grad_norm", k - PLATEAU_HALF, k + PLATEAU_HALF)
        if loss is None or grad is None:
            flags.append(None)
            continue
        flags.append(loss <= PLATEAU_SHARE * loss_peak and grad <= PLATEAU_SHARE * grad_peak)
        details.append(f"seed {r.seed}: at C (step {k}) loss {loss / loss_peak:.2g}x and "
                       f"gradient {grad / grad_peak:.2g}x their peaks")
    c.verdict = by_seeds(flags)
    c.value = "; ".join(details) or "-"
    return c


def dynamics_gd_oscillation(ev: Evidence) -> Claim:
    c = Claim("dynamics-gd-oscillation", "Dynamics", "Fig. 1b",
              "Under full-batch gradient descent the gradient norm grows progressively into "
              "an oscillation, and the probe accuracy rises after it.",
              "full-batch runs: the oscillation onset (escapelab.phases), the gradient norm "
              "just before it against the one at the collapse, and the probe at the onset "
              "against the final probe",
              "GD: gradient magnitude increases until it oscillates; then probing rises",
              "", "",
              f"per seed: holds if an onset is found, the gradient norm (median of the 10 "
              f"steps before it) is >= {GROWTH:g}x its value at C, and the final probe is > "
              f"{MARGIN_POINTS:g} points above the probe at the onset; every seed -> holds, "
              "some -> partly, none -> does not hold", link="batch-size/fig1b_loss_grad")
    runs = [r for r in ev.batch_size if r.batch_size == "full" and r.summary and r.steps]
    if not runs:
        return _missing(c, ev.missing.get("batch-size", "no finished full-batch run"))
    flags: list[bool | None] = []
    details: list[str] = []
    for r in runs:
        s = r.summary or {}
        onset, k = s.get("oscillation_onset"), s.get("collapse_step")
        if onset is None:
            flags.append(False)
            details.append(f"seed {r.seed}: no oscillation")
            continue
        before = _window(r.steps, "grad_norm", onset - 10, onset - 1)
        at_c = _window(r.steps, "grad_norm", (k or onset) - PLATEAU_HALF,
                       (k or onset) + PLATEAU_HALF)
        probe_at = _last_eval_at_or_before(r.evals, onset)
        final = s.get("final_probe_acc")
        if before is None or not at_c or probe_at is None or not _finite(final):
            flags.append(None)
            continue
        grows = before >= GROWTH * at_c
        rises = final > probe_at["probe_acc"] + PHASE_MARGIN
        flags.append(grows and rises)
        details.append(f"seed {r.seed}: onset step {onset}, gradient x{before / at_c:.3g} "
                       f"since C (step {k}), probe {_pct(probe_at['probe_acc'])} -> "
                       f"{_pct(final)}")
    c.verdict = by_seeds(flags)
    c.value = "; ".join(details) or "-"
    return c


def _layer_verdict(runs: list[RunFacts], test: Callable[[dict[str, Any], str], bool | None],
                   ) -> tuple[str, str]:
    counts = []
    for r in runs:
        assert r.analysis is not None
        results = [test(r.analysis, layer) for layer in _layers(r.analysis)]
        counts.append([x for x in results if x is not None])
    known = [k for k in counts if k]
    if not known:
        return NOT_MEASURED, ""
    if all(all(k) for k in known):
        verdict = HOLDS
    elif any(any(k) for k in known):
        verdict = PARTLY
    else:
        verdict = NOT_HOLD
    detail = "; ".join(f"seed {r.seed}: {sum(k)} of {len(k)} layers"
                       for r, k in zip(runs, counts, strict=True))
    return verdict, detail


LAYER_RULE = ("over the post-activation layers (ReLU outputs and the encoder output) of "
              "every seed's representative run: holds if at every layer in every seed, "
              "partly if at some, does not hold if at none")


def signal_teacher_rank_deficient(ev: Evidence) -> Claim:
    c = Claim("signal-teacher-rank-deficient", "Signal propagation", "Fig. 2a",
              "The teacher's representations are rank-deficient.",
              "erank(T) / min(units, samples) per layer",
              "rank-deficient across the layers", "", "",
              f"a layer is rank-deficient if that ratio is < {RANK_DEFICIENT:g}; " + LAYER_RULE,
              link="rep/fig2a_erank")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))

    def test(a: dict[str, Any], layer: str) -> bool | None:
        e, units = _tap(a, "T", layer, "erank"), _tap(a, "T", layer, "units")
        if e is None or not units:
            return None
        return e / min(units, a.get("samples") or units) < RANK_DEFICIENT

    c.verdict, c.detail = _layer_verdict(runs, test)
    enc = [(_tap(r.analysis, "T", "encoder", "erank"), _tap(r.analysis, "T", "encoder", "units"))
           for r in runs if r.analysis]
    c.value = "encoder output: " + ", ".join(f"{e:.3g} of {u:.0f}" for e, u in enc
                                             if e is not None and u is not None)
    return c


def signal_collapse_single_digit(ev: Evidence) -> Claim:
    c = Claim("signal-collapse-single-digit", "Signal propagation", "Fig. 2a",
              "At the collapse the effective rank falls to single digits.",
              "the encoder output's effective rank at C (training-time evaluation)",
              "single digits", "", "",
              f"per seed: holds if erank(C) < {SINGLE_DIGITS:g}; every seed -> holds, some -> "
              "partly, none -> does not hold", link="rep/fig2a_erank")
    runs = [r for r in ev.representatives() if r.summary]
    if not runs:
        return _missing(c, ev.missing.get("step-size", "no finished representative run"))
    values = [(r.summary or {}).get("erank_collapse") for r in runs]
    c.verdict = by_seeds([v < SINGLE_DIGITS if _finite(v) else None for v in values])
    c.value = (f"erank T {spread([(r.summary or {}).get('erank_teacher') for r in runs])} -> "
               f"C {spread(values)}")
    return c


def signal_student_higher_rank(ev: Evidence) -> Claim:
    c = Claim("signal-student-higher-rank", "Signal propagation", "Fig. 2a",
              "The final student keeps a higher effective rank than the teacher at every "
              "layer.", "erank(S) > erank(T) per layer", "S above T at every layer", "", "",
              LAYER_RULE, link="rep/fig2a_erank")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))

    def test(a: dict[str, Any], layer: str) -> bool | None:
        s, t = _tap(a, "S", layer, "erank"), _tap(a, "T", layer, "erank")
        return None if s is None or t is None else s > t

    c.verdict, c.detail = _layer_verdict(runs, test)
    ratios = [_ratio(r.analysis, "S", "T", "encoder", "erank") for r in runs]
    c.value = f"encoder output erank S / T {spread(ratios)}"
    return c


def _ratio(a: dict[str, Any] | None, x: str, y: str, layer: str, metric: str) -> float | None:
    if a is None:
        return None
    u, v = _tap(a, x, layer, metric), _tap(a, y, layer, metric)
    return u / v if u is not None and v else None


def signal_dead_units(ev: Evidence) -> Claim:
    c = Claim("signal-dead-units", "Signal propagation", "Fig. 2b",
              "Some units are dead at the teacher, a large share at the collapse, fewer "
              "again at the end.",
              "share of dead units (zero on every analysed image) over the post-activation "
              "layers, at T, C and S; the largest layer share at C",
              "some dead at T, up to 60% at C, recovered at S", "", "",
              "per seed: holds if T's share is > 0, C's is above T's and S's below C's; "
              "every seed -> holds, some -> partly, none -> does not hold",
              link="rep/fig2b_dead")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))
    flags: list[bool | None] = []
    shares: dict[str, list[float | None]] = {"T": [], "C": [], "S": []}
    peaks: list[float | None] = []
    for r in runs:
        a = r.analysis or {}
        share = {}
        for ck in ("T", "C", "S"):
            dead = [_tap(a, ck, layer, "dead_units") for layer in _layers(a)]
            units = [_tap(a, ck, layer, "units") for layer in _layers(a)]
            pairs = [(d, u) for d, u in zip(dead, units, strict=True) if d is not None and u]
            share[ck] = sum(d for d, _ in pairs) / sum(u for _, u in pairs) if pairs else None
            shares[ck].append(share[ck])
        peaks.append(max((v for layer in _layers(a)
                          if (v := _tap(a, "C", layer, "dead_frac")) is not None),
                         default=None))
        t, k, s = share["T"], share["C"], share["S"]
        if t is None or k is None or s is None:
            flags.append(None)
            continue
        flags.append(t > 0 and k > t and s < k)
    c.verdict = by_seeds(flags)
    c.detail = "; ".join(
        f"seed {r.seed} at the encoder output alone: " + " -> ".join(
            _pct((r.summary or {}).get(f"dead_frac_{k}")) for k in ("teacher", "collapse",
                                                                    "final"))
        for r in runs)
    c.value = (f"T {spread(shares['T'], 100, '%')}; C {spread(shares['C'], 100, '%')} "
               f"(largest layer at C {spread(peaks, 100, '%')}); S "
               f"{spread(shares['S'], 100, '%')}")
    return c


def signal_conditioning(ev: Evidence) -> Claim:
    c = Claim("signal-conditioning", "Signal propagation", "Fig. 2c",
              "The final student is better conditioned than the teacher and the collapse.",
              "condition number (99.9% of the singular-value mass) per layer: S below both "
              "T and C", "S better conditioned than T and C", "", "", LAYER_RULE,
              link="rep/fig2c_condition")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))

    def test(a: dict[str, Any], layer: str) -> bool | None:
        s, t, k = (_tap(a, ck, layer, "condition_number") for ck in ("S", "T", "C"))
        return None if s is None or t is None or k is None else s < t and s < k

    c.verdict, c.detail = _layer_verdict(runs, test)
    ratios = [_ratio(r.analysis, "S", "T", "encoder", "condition_number") for r in runs]
    c.value = f"encoder output cond S / T {spread(ratios)}"
    return c


def _enc(r: RunFacts, checkpoint: str, metric: str) -> float | None:
    return _tap(r.analysis, checkpoint, "encoder", metric) if r.analysis else None


def sep_student_discriminant(ev: Evidence) -> Claim:
    c = Claim("sep-student-discriminant", "Separability", "Fig. 3b",
              "The final student's Fisher discriminant, relative to the teacher's, is "
              "above 1.", "tr(pinv(S_w) S_b) of S / of T at the encoder output",
              "above 1 (S more separable than T)", "", "",
              "per seed: holds if the ratio is > 1; every seed -> holds, some -> partly, "
              "none -> does not hold", link="rep/fig3b_discriminant")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))
    values = [_enc(r, "S", "discriminant_rel_teacher") for r in runs]
    c.verdict = by_seeds([v > 1 if v is not None else None for v in values])
    c.value = f"S / T {spread(values)}"
    layers = [sum(1 for layer in _layers(r.analysis or {})
                  if (v := _tap(r.analysis or {}, "S", layer, "discriminant_rel_teacher"))
                  is not None and v > 1) for r in runs]
    c.detail = "; ".join(f"seed {r.seed}: above 1 at {n} of {len(_layers(r.analysis or {}))} "
                         "layers" for r, n in zip(runs, layers, strict=True))
    return c


def sep_collapse_lowest(ev: Evidence) -> Claim:
    c = Claim("sep-collapse-lowest", "Separability", "Fig. 3b",
              "The collapse's discriminant is the lowest of T, C and S.",
              "tr(pinv(S_w) S_b) relative to T at the encoder output: C against 1 (T) and "
              "against S", "C cannot discriminate between classes", "", "",
              "per seed: holds if C's ratio is below 1 and below S's; every seed -> holds, "
              "some -> partly, none -> does not hold", link="rep/fig3b_discriminant")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))
    cs = [_enc(r, "C", "discriminant_rel_teacher") for r in runs]
    ss = [_enc(r, "S", "discriminant_rel_teacher") for r in runs]
    c.verdict = by_seeds([x < 1 and x < y if x is not None and y is not None else None
                          for x, y in zip(cs, ss, strict=True)])
    c.value = f"C / T {spread(cs)}; S / T {spread(ss)}"
    return c


def sep_collapse_between(ev: Evidence) -> Claim:
    c = Claim("sep-collapse-between", "Separability", "Fig. 3a",
              "The collapse's between-class variance is much higher than the teacher's and "
              "the student's.", "tr(Sigma_b) at the encoder output: C / max(T, S)",
              "C much higher than T and S", "", "",
              f"per seed: holds if C's is >= {BETWEEN_FACTOR:g}x both T's and S's; every "
              "seed -> holds, some -> partly, none -> does not hold",
              link="rep/fig3a_between")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))
    ratios = []
    for r in runs:
        t, k, s = (_enc(r, ck, "tr_between") for ck in ("T", "C", "S"))
        ratios.append(k / max(t, s) if t is not None and k is not None and s is not None
                      and max(t, s) > 0 else None)
    c.verdict = by_seeds([x >= BETWEEN_FACTOR if x is not None else None for x in ratios])
    c.value = f"C / max(T, S) {spread(ratios)}"
    return c


def sep_teacher_early_layers(ev: Evidence) -> Claim:
    c = Claim("sep-teacher-early-layers", "Separability", "Fig. 3c",
              "Layerwise probes: the teacher's early layers separate the classes well, its "
              "later ones worse.",
              "the teacher's best layerwise probe accuracy in the first half of the "
              "post-activation layers against its probe at the encoder output",
              "good features early, deteriorating later", "", "",
              f"per seed: holds if the early best is > {MARGIN_POINTS:g} points above the "
              "encoder output's; every seed -> holds, some -> partly, none -> does not hold",
              link="rep/fig3c_layer_probe")
    runs = _analysed(ev.representatives())
    if not runs:
        return _missing(c, ev.missing.get("analyze", "no analysed representative run"))
    flags: list[bool | None] = []
    gaps: list[float] = []
    details: list[str] = []
    for r in runs:
        a = r.analysis or {}
        layers = _layers(a)
        early = [(layer, v) for layer in layers[:max(1, len(layers) // 2)]
                 if (v := _tap(a, "T", layer, "probe_acc")) is not None]
        last = _tap(a, "T", "encoder", "probe_acc")
        if not early or last is None:
            flags.append(None)
            continue
        layer, best = max(early, key=lambda x: x[1])
        gaps.append(best - last)
        flags.append(best > last + PHASE_MARGIN)
        details.append(f"seed {r.seed}: {layer} {_pct(best)} vs encoder {_pct(last)}")
    c.verdict = by_seeds(flags)
    c.value = f"early best - encoder output {spread(gaps, 100, 'points')}"
    c.detail = "; ".join(details)
    return c


def stab_mse_diverges(ev: Evidence) -> Claim:
    c = Claim("stab-mse-diverges", "Stabilizing", "Fig. 4",
              "Plain MSE diverges at the paper's step size.",
              "phase of the MSE runs with a constant step size (loss-warmup part)",
              "MSE diverges at eta 1e4", "", "",
              "per seed: holds if the phase is 'diverges'; every seed -> holds, some -> "
              "partly, none -> does not hold", link="loss-warmup/fig4_loss_warmup")
    runs = [r for r in ev.loss_warmup if r.loss == "mse" and r.warmup_steps == 0 and r.summary]
    if not runs:
        return _missing(c, ev.missing.get("loss-warmup", "no finished constant-step MSE run"))
    c.verdict = by_seeds([r.phase == "diverges" for r in runs])
    others = [r for r in ev.loss_warmup if r.loss == "mse" and r.warmup_steps and r.summary]
    c.value = (f"eta {runs[0].lr:g}: " + ", ".join(f"seed {r.seed} {r.phase}" for r in runs))
    c.detail = "; ".join(f"{r.schedule}: {r.phase}" for r in others)
    return c


def stab_normalized_stable(ev: Evidence) -> Claim:
    c = Claim("stab-normalized-stable", "Stabilizing", "Fig. 4",
              "N-MSE, and ND-MSE with a slow warm-up, stay stable at that step size.",
              "phase of the N-MSE run with a constant step size and of the ND-MSE run with "
              "the slowest warm-up", "both stable at eta 1e4", "", "",
              "stable: finishes without diverging and ends within "
              f"{MARGIN_POINTS:g} points of the teacher's probe or above (phase 'escapes' or "
              "'stays'; a dead encoder is not stable); holds if both are stable in every "
              "seed, partly if one is, does not hold if neither",
              link="loss-warmup/fig4_loss_warmup")
    done = [r for r in ev.loss_warmup if r.summary]
    nmse = [r for r in done if r.loss == "nmse" and r.warmup_steps == 0]
    slowest = max((r.warmup_steps for r in done if r.loss == "ndmse"), default=None)
    ndmse = [r for r in done if r.loss == "ndmse" and r.warmup_steps == slowest and slowest]
    if not nmse and not ndmse:
        return _missing(c, ev.missing.get("loss-warmup", "no finished N-MSE / ND-MSE run"))

    def stable(runs: list[RunFacts]) -> bool | None:
        return None if not runs else all(r.phase in ("escapes", "stays") for r in runs)

    a, b = stable(nmse), stable(ndmse)
    known = [x for x in (a, b) if x is not None]
    c.verdict = (NOT_MEASURED if not known else HOLDS if all(known) and len(known) == 2
                 else PARTLY if any(known) else NOT_HOLD)
    c.value = (f"N-MSE constant: {', '.join(str(r.phase) for r in nmse) or '-'}; ND-MSE "
               f"warm-up {slowest}: {', '.join(str(r.phase) for r in ndmse) or '-'}")
    c.detail = "; ".join(f"{r.loss} {r.schedule}: {r.phase}, final probe "
                         f"{_pct((r.summary or {}).get('final_probe_acc'))}" for r in done)
    return c


def found_sharpness(ev: Evidence) -> Claim:
    c = Claim("found-sharpness", "Follow-up (Sec. 4)", "Sec. 4",
              "Sharpness against the edge of stability: where the top Hessian eigenvalue "
              "sits relative to 2/eta.",
              "lambda_0 * eta at the teacher; the top eigenvalue of the last third of the "
              "run's sharpness measurements, in units of 2/eta",
              "asks whether the escape relates to the edge of stability", "", FOUND,
              f"no verdict; 'at the edge' means within {100 * SHARPNESS_BAND:g}% of 2/eta",
              link="rep/fig1b_sharpness")
    runs = [r for r in ev.representatives() if r.sharpness and r.summary]
    if not runs:
        return _missing(c, "no sharpness measurements (sharpness.enabled is off or no "
                        "finished representative run)")
    at_start, late, near = [], [], []
    for r in runs:
        edge = 2.0 / r.lr
        at_start.append((r.summary or {}).get("eta_lambda0"))
        tops = [(x["step"], x["eigenvalues"][0]) for x in r.sharpness
                if x.get("eigenvalues") and _finite(x["eigenvalues"][0])]
        tail = [v / edge for _, v in tops[len(tops) - max(1, len(tops) // 3):]]
        if tail:
            late.append(float(np.median(tail)))
            near.append(float(np.mean([abs(v - 1) <= SHARPNESS_BAND for v in tail])))
    c.verdict = FOUND
    c.value = (f"lambda_0 eta at T {spread(at_start)}; late lambda_max / (2/eta) "
               f"{spread(late)}; share of late measurements at the edge {spread(near, 100, '%')}")
    return c


def found_finetune(ev: Evidence) -> Claim:
    c = Claim("found-finetune", "Follow-up (Sec. 4)", "Sec. 4",
              "Finetuning from T, C and S: which start finetunes best on the labels.",
              "final test accuracy (mean ± std over finetuning seeds) and the steps to 95% of "
              "the best final accuracy, per start", "an open question in the paper", "",
              FOUND, "no verdict", link="rep/fig_finetune")
    starts = (ev.finetune or {}).get("starts")
    if not starts:
        return _missing(c, ev.missing.get("finetune", "not finetuned"))
    c.verdict = FOUND

    def reach(v: dict[str, Any]) -> str:
        k = v.get("steps_to_target")
        return f"at 95% of the best by step {k}" if k is not None else "never at 95% of the best"

    c.value = "; ".join(f"{s}: {100 * v['final_test_acc_mean']:.2f} ± "
                        f"{100 * v['final_test_acc_std']:.2f}% ({reach(v)})"
                        for s, v in starts.items())
    return c


CLAIMS: tuple[Callable[[Evidence], Claim], ...] = (
    lr_range_supervised_first, lr_range_two_stages,
    step_small_stays, step_larger_escape, step_probe_increases, step_drop_recover,
    step_largest_unrecovered,
    batch_slower_recovery, batch_full_escapes,
    dynamics_spike, dynamics_plateau, dynamics_gd_oscillation,
    signal_teacher_rank_deficient, signal_collapse_single_digit, signal_student_higher_rank,
    signal_dead_units, signal_conditioning,
    sep_student_discriminant, sep_collapse_lowest, sep_collapse_between,
    sep_teacher_early_layers,
    stab_mse_diverges, stab_normalized_stable,
    found_sharpness, found_finetune,
)


def evaluate(ev: Evidence) -> list[Claim]:
    """Every claim of :data:`CLAIMS`, judged on `ev` (pure)."""
    return [claim(ev) for claim in CLAIMS]


# ---------------------------------------------------------------------------------------
# Reading a study folder


def gather(out: Path | str) -> Evidence:
    """The evidence in the study folder `out` (unfinished runs count as missing)."""
    from escapelab.store import RangeDir, StudyDir
    from escapelab.study import part_runs, read_plan, representative_lr, representatives

    plan, state = read_plan(out)
    folder = StudyDir(out)
    ev = Evidence(representative_lr=representative_lr(plan))
    for name, entry in state.get("parts", {}).items():
        if entry.get("state") != "done":
            ev.missing[name] = (f"the {name} part is {entry.get('state', 'not run')}"
                                + (f" ({entry['message']})" if entry.get("message") else ""))
    lr_dir = folder.part_path("lr-range")
    if (lr_dir / "lr_range.json").exists():
        ev.lr_range = RangeDir(lr_dir).payload()
    reps = [p.dirname for p in representatives(plan)]
    for part, target in (("step-size", ev.step_size), ("batch-size", ev.batch_size),
                         ("loss-warmup", ev.loss_warmup)):
        for point, run in part_runs(plan, out, part):
            cfg = point.config
            facts = RunFacts(seed=cfg.seed, lr=cfg.optim.lr, batch_size=cfg.data.batch_size,
                             loss=cfg.loss.name, schedule=str(point.values.get("schedule", "")),
                             warmup_steps=(cfg.schedule.warmup_steps
                                           if cfg.schedule.name == "linear_warmup" else 0))
            summary = run.summary() if run.path.is_dir() else None
            if summary is None:
                target.append(facts)
                continue
            facts.summary = summary.model_dump()
            full = part == "batch-size" and cfg.data.batch_size == "full"
            if full:
                facts.n_train = run.derived().n_train
            if (part == "step-size" and point.dirname in reps) or full:
                evals = run.evals()
                facts.steps = run.steps()
                facts.evals = [r for r in evals if r.get("model") == "student"]
                facts.sharpness = [r.model_dump() for r in run.sharpness()
                                   if r.model == "student"]
                facts.analysis = run.analysis()
                if point.dirname == reps[0]:
                    ev.finetune = run.finetune()
            target.append(facts)
    return ev


def run_evidence(run_dir: Path | str) -> Evidence:
    """The evidence of one finished run on its own (e.g. the paper preset run once): the
    claims about the representative run get verdicts, the others are not measured."""
    from escapelab.store import RunDir

    run = RunDir.open(run_dir)
    cfg, summary = run.config(), run.summary()
    facts = RunFacts(seed=cfg.seed, lr=cfg.optim.lr, batch_size=cfg.data.batch_size,
                     loss=cfg.loss.name)
    if summary is not None:
        facts.summary = summary.model_dump()
        facts.steps = run.steps()
        facts.evals = [r for r in run.evals() if r.get("model") == "student"]
        facts.sharpness = [r.model_dump() for r in run.sharpness() if r.model == "student"]
        facts.analysis = run.analysis()
    why = "a single run: no sweep or LR range test"
    return Evidence(step_size=[facts], representative_lr=cfg.optim.lr,
                    finetune=run.finetune() if summary is not None else None,
                    missing={p: why for p in ("lr-range", "batch-size", "loss-warmup")})


def evaluate_study(out: Path | str) -> dict[str, Any]:
    """claims.json's payload for the study in `out`."""
    claims = evaluate(gather(out))
    counts = {v: sum(1 for c in claims if c.verdict == v) for v in VERDICTS}
    return {"claims": [asdict(c) for c in claims], "counts": counts,
            "thresholds": {k: v for k, v in globals().items()
                           if k.isupper() and isinstance(v, int | float)
                           and not isinstance(v, bool)}}
