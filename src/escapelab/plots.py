"""The paper's figures as pure functions of data read from disk.

Every function takes plain data (records from ``metrics/*.jsonl``, ``analysis.json``,
``lr_range.json``...) and returns a matplotlib :class:`~matplotlib.figure.Figure`; none
trains, analyses or reads files. Figures use the object-oriented API (no pyplot state),
so drawing has no global side effects. Each plotted line carries a ``gid`` naming the
series it shows, so that tests can read the data back from the figure.

Accuracies are drawn in percent, steps on a symmetric-log axis (0, then log: the escape
happens within ~10 steps), losses and gradient norms on log axes (exact zeros, as in a
float32 student that equals its teacher, cannot be drawn there and are left out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

CHECKPOINT_STYLE = {"T": ("#6b6b6b", "o", "teacher T"), "C": ("#d62728", "s", "collapse C"),
                    "S": ("#1f77b4", "^", "student S")}
WIDTH, HEIGHT = 6.4, 4.0


def _figure(ncols: int = 1, nrows: int = 1, width: float = WIDTH,
            height: float = HEIGHT) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    return fig, axes


def drawable(fig: Figure) -> Figure:
    """Turn back to linear every log axis that has no positive value to show (e.g. a
    one-step run whose loss is exactly 0 at the teacher): matplotlib cannot draw it."""
    for ax in fig.axes:
        for axis, scale in (("y", ax.get_yscale()), ("x", ax.get_xscale())):
            if scale != "log":
                continue
            values = []
            for line in ax.get_lines():
                data = line.get_ydata() if axis == "y" else line.get_xdata()
                values.extend(np.asarray(data, dtype=float).ravel().tolist())
            for coll in ax.collections:
                offsets = np.asarray(coll.get_offsets(), dtype=float)
                if offsets.size:
                    values.extend(offsets[:, 1 if axis == "y" else 0].tolist())
            if not any(math.isfinite(v) and v > 0 for v in values):
                (ax.set_yscale if axis == "y" else ax.set_xscale)("linear")
                label = ax.get_ylabel() if axis == "y" else ax.get_xlabel()
                (ax.set_ylabel if axis == "y" else ax.set_xlabel)(
                    label.replace(" (log)", "") + " (nothing > 0 to show on a log scale)")
    return fig


def _colors(n: int, cmap: str = "viridis") -> list[Any]:
    from matplotlib import colormaps

    return [colormaps[cmap](x) for x in (np.linspace(0.1, 0.9, n) if n > 1 else [0.5])]


def _finite(xs: Sequence[Any], ys: Sequence[Any], positive: bool = False,
            ) -> tuple[list[float], list[float]]:
    """Pairs whose y is a finite number (and > 0 for log axes)."""
    out_x, out_y = [], []
    for x, y in zip(xs, ys, strict=True):
        if y is None or not math.isfinite(y) or (positive and y <= 0):
            continue
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def _steps_axis(ax: Axes, label: str = "step") -> None:
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{label} (symlog)")
    ax.grid(True, alpha=0.3, which="both")


def teacher_line(ax: Axes, value: float | None, label: str = "teacher") -> None:
    if value is not None:
        ax.axhline(value, color="black", linestyle="--", linewidth=1.0, label=label,
                   gid="teacher")


# ---------------------------------------------------------------------------------------
# Fig. 1a


def lr_range_figure(payload: dict[str, Any]) -> Figure:
    """Loss against step size, escape vs supervised: median over seeds with the min-max
    band, departure (o) and divergence (x) step sizes marked."""
    fig, (ax,) = _figure()
    colors = {"escape": "#1f77b4", "supervised": "#ff7f0e"}
    for curve, band in payload["band"].items():
        color = colors.get(curve, "#2ca02c")
        lr, med = _finite(band["lr"], band["median"], positive=True)
        ax.plot(lr, med, color=color, label=f"{curve} loss (median)", gid=f"{curve}/median")
        lo_x, lo = _finite(band["lr"], band["min"], positive=True)
        hi_x, hi = _finite(band["lr"], band["max"], positive=True)
        if len(lo) == len(hi) == len(lo_x) and lo_x == hi_x and len(lo) > 1:
            ax.fill_between(lo_x, lo, hi, color=color, alpha=0.2, linewidth=0)
        info = payload["curves"][curve]
        for key, marker, word in (("depart_lr", "o", "departs"), ("diverge_lr", "X",
                                                                   "diverges")):
            eta = info.get(key)
            if eta is None or not med:
                continue
            y = float(10 ** np.interp(np.log(eta), np.log(lr), np.log10(med)))
            ax.plot([eta], [y], marker=marker, markersize=10, color=color, linestyle="none",
                    markeredgecolor="black", label=f"{curve} {word} at eta={eta:.3g}",
                    gid=f"{curve}/{key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step size eta (log)")
    ax.set_ylabel("training loss (log)")
    ax.set_title("LR range test: escape vs supervised (Fig. 1a)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return drawable(fig)


# ---------------------------------------------------------------------------------------
# Fig. 1b and per-step series


def loss_grad_figure(series: dict[str, list[dict[str, Any]]],
                     diverged: dict[str, bool] | None = None) -> Figure:
    """Training loss and full-gradient norm over steps, one line per labelled run."""
    fig, (ax_loss, ax_grad) = _figure(ncols=2)
    colors = _colors(len(series))
    for (label, steps), color in zip(series.items(), colors, strict=True):
        x = [r["step"] for r in steps]
        for ax, key in ((ax_loss, "loss"), (ax_grad, "grad_norm")):
            xs, ys = _finite(x, [r[key] for r in steps], positive=True)
            ax.plot(xs, ys, color=color, linewidth=1.0, label=label, gid=f"{label}/{key}")
            if diverged and diverged.get(label) and steps:
                ax.plot([steps[-1]["step"]], [ys[-1] if ys else 1.0], marker="X",
                        markersize=10, color=color, markeredgecolor="black",
                        linestyle="none", gid=f"{label}/diverged")
    for ax, what in ((ax_loss, "training loss"), (ax_grad, "full-gradient norm")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step (log)")
        ax.set_ylabel(f"{what} (log)")
        ax.grid(True, alpha=0.3, which="both")
    ax_loss.set_title("Training loss (Fig. 1b)")
    ax_grad.set_title("Gradient norm (Fig. 1b)")
    ax_loss.legend(fontsize=8)
    return drawable(fig)


def sharpness_figure(steps: list[dict[str, Any]], sharpness: list[dict[str, Any]],
                     lambda0: float | None = None, collapse_step: int | None = None,
                     ) -> Figure:
    """Training loss, full-gradient norm and the top Hessian eigenvalues over steps,
    stacked on one step axis, with the edge of stability 2/eta_k (from each step's step
    size) dashed on the eigenvalue panel, lambda_0 at the teacher dotted and the
    collapse step as a vertical line on every panel.

    `steps`: records of metrics/steps.jsonl; `sharpness`: the student's records of
    metrics/sharpness.jsonl (eigenvalues descending)."""
    fig, (ax_loss, ax_grad, ax_eig) = _figure(nrows=3, height=2.6)
    x = [r["step"] for r in steps]
    for ax, key, color in ((ax_loss, "loss", "#1f77b4"), (ax_grad, "grad_norm", "#ff7f0e")):
        xs, ys = _finite(x, [r[key] for r in steps], positive=True)
        ax.plot(xs, ys, color=color, linewidth=1.0, gid=key)
    k = max((len(r["eigenvalues"]) for r in sharpness), default=0)
    for i, color in zip(range(k), _colors(k, "viridis"), strict=True):
        xs, ys = _finite([r["step"] for r in sharpness],
                         [r["eigenvalues"][i] if i < len(r["eigenvalues"]) else None
                          for r in sharpness], positive=True)
        ax_eig.plot(xs, ys, color="#d62728" if i == 0 else color, marker=".",
                    linewidth=1.2 if i == 0 else 0.8, label=f"lambda_{i + 1}",
                    gid=f"lambda_{i + 1}")
    xs, ys = _finite(x, [2.0 / r["lr"] if r.get("lr") else None for r in steps],
                     positive=True)
    ax_eig.plot(xs, ys, color="black", linestyle="--", linewidth=1.0, label="2 / eta",
                gid="two_over_eta")
    if lambda0 is not None and math.isfinite(lambda0) and lambda0 > 0:
        ax_eig.axhline(lambda0, color="#6b6b6b", linestyle=":", linewidth=1.0,
                       label=f"lambda_0 at the teacher ({lambda0:.3g})", gid="lambda0")
    right = max([*x, *(r["step"] for r in sharpness), 1])
    for ax, label in ((ax_loss, "training loss"), (ax_grad, "full-gradient norm"),
                      (ax_eig, "top Hessian eigenvalue")):
        if collapse_step is not None:
            ax.axvline(collapse_step, color="#d62728", alpha=0.4, linewidth=1.0,
                       gid="collapse")
        ax.set_yscale("log")
        ax.set_ylabel(f"{label} (log)")
        _steps_axis(ax)
        ax.set_xlim(0, right)  # one step axis for the three panels
    ax_loss.set_title("Loss, gradient norm and sharpness against 2/eta")
    ax_eig.legend(fontsize=8)
    return drawable(fig)


def probe_over_steps_figure(series: dict[str, tuple[list[int], list[float | None]]],
                            teacher: float | None, title: str,
                            diverged: dict[str, bool] | None = None,
                            cmap: str = "viridis", ylabel: str = "linear probe accuracy (%)",
                            ) -> Figure:
    """Probe accuracy (fractions, drawn in %) over steps, one line per label, with the
    teacher's accuracy as a dashed reference; diverged runs end in an X."""
    fig, (ax,) = _figure()
    for (label, (steps, acc)), color in zip(series.items(), _colors(len(series), cmap),
                                            strict=True):
        xs, ys = _finite(steps, acc)
        ys = [100 * y for y in ys]
        name = f"{label} (diverged)" if diverged and diverged.get(label) else label
        ax.plot(xs, ys, color=color, marker=".", label=name, gid=label)
        if diverged and diverged.get(label) and xs:
            ax.plot([xs[-1]], [ys[-1]], marker="X", markersize=11, color=color,
                    markeredgecolor="black", linestyle="none", gid=f"{label}/diverged")
    teacher_line(ax, None if teacher is None else 100 * teacher)
    _steps_axis(ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return drawable(fig)


def eval_series_figure(evals: list[dict[str, Any]], teacher: dict[str, Any] | None,
                       keys: Sequence[tuple[str, str, bool]]) -> Figure:
    """Further per-evaluation series of one run (key, axis label, log scale), with the
    teacher's value as reference where it has one."""
    fig, axes = _figure(ncols=len(keys), width=4.6)
    steps = [r["step"] for r in evals]
    for ax, (key, label, log) in zip(axes, keys, strict=True):
        pct = key.endswith("_acc") or key.endswith("_frac")
        values = [None if r.get(key) is None else (100 * r[key] if pct else r[key])
                  for r in evals]
        xs, ys = _finite(steps, values, positive=log)
        ax.plot(xs, ys, marker=".", color="#1f77b4", label="student", gid=key)
        if teacher is not None and teacher.get(key) is not None:
            teacher_line(ax, 100 * teacher[key] if pct else teacher[key])
        if log:
            ax.set_yscale("log")
        _steps_axis(ax)
        ax.set_ylabel(label + (" (%)" if pct else "") + (" (log)" if log else ""))
        ax.legend(fontsize=8)
    return drawable(fig)


# ---------------------------------------------------------------------------------------
# Figs. 2 and 3: per layer at T, C, S


def layer_figure(layers: list[str], values: dict[str, list[Any]], title: str, ylabel: str,
                 log: bool = False, percent: bool = False, reference: float | None = None,
                 steps: dict[str, Any] | None = None) -> Figure:
    """One metric per layer tap (network order), one line per checkpoint."""
    fig, (ax,) = _figure(width=max(WIDTH, 0.42 * len(layers) + 2))
    x = list(range(len(layers)))
    for name, series in values.items():
        color, marker, label = CHECKPOINT_STYLE.get(name, ("#2ca02c", "D", name))
        if steps and steps.get(name) is not None:
            label += f" (step {steps[name]})"
        scaled = [None if v is None else (100 * v if percent else v) for v in series]
        xs, ys = _finite(x, scaled, positive=log)
        ax.plot(xs, ys, color=color, marker=marker, label=label, gid=name)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1.0)
    ax.set_xticks(x, layers, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("layer tap (network order)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return drawable(fig)


# ---------------------------------------------------------------------------------------
# Fig. 4


def loss_warmup_figure(cells: dict[str, dict[str, dict[str, Any]]]) -> Figure:
    """cells[schedule][loss] = {"steps": [...], "evals": [...], "diverged": bool}: per
    schedule (column), the training loss (top) and probe accuracy (bottom) over steps,
    one colour per loss."""
    schedules = list(cells)
    losses = sorted({loss for per in cells.values() for loss in per})
    colors = dict(zip(losses, _colors(len(losses), "tab10"), strict=True))
    fig, axes = _figure(ncols=len(schedules), nrows=2, width=4.6, height=3.4)
    axes = axes.reshape(2, len(schedules))
    for col, schedule in enumerate(schedules):
        top, bottom = axes[0, col], axes[1, col]
        for loss, data in cells[schedule].items():
            color = colors[loss]
            label = f"{loss} (diverged)" if data["diverged"] else loss
            xs, ys = _finite([r["step"] for r in data["steps"]],
                             [r["loss"] for r in data["steps"]], positive=True)
            top.plot(xs, ys, color=color, linewidth=1.0, label=label,
                     gid=f"{schedule}/{loss}/loss")
            ex, ey = _finite([r["step"] for r in data["evals"]],
                             [r.get("probe_acc") for r in data["evals"]])
            bottom.plot(ex, [100 * y for y in ey], color=color, marker=".", label=label,
                        gid=f"{schedule}/{loss}/probe_acc")
            if data["diverged"]:
                for ax, px, py in ((top, xs, ys), (bottom, ex, [100 * y for y in ey])):
                    if px:
                        ax.plot([px[-1]], [py[-1]], marker="X", markersize=10, color=color,
                                markeredgecolor="black", linestyle="none",
                                gid=f"{schedule}/{loss}/diverged")
        teachers = [d["teacher"] for d in cells[schedule].values()
                    if d.get("teacher") is not None]
        teacher_line(bottom, 100 * teachers[0] if teachers else None)
        top.set_title(schedule)
        top.set_xscale("log")
        top.set_yscale("log")
        top.set_xlabel("step (log)")
        top.set_ylabel("training loss (log)")
        top.grid(True, alpha=0.3, which="both")
        _steps_axis(bottom)
        bottom.set_ylabel("linear probe accuracy (%)")
        top.legend(fontsize=8)
    fig.suptitle("Stabilizing huge step sizes: loss x warm-up (Fig. 4)")
    return drawable(fig)


PHASE_COLORS = {"escapes": "#2a7a2a", "collapses": "#e08a1e", "stays": "#9a9a9a",
                "diverges": "#c0392b"}


def phase_diagram_figure(rows: Sequence[dict[str, Any]], x_axis: str, y_axis: str | None,
                         x_label: str, y_label: str | None) -> Figure:
    """The phase of each swept cell (the majority over seeds) on a grid of two axes
    (or one row for one axis): colour = phase, text = mean gain over the teacher in
    points and, where measured, eta * lambda_0. `rows` are the sweep's table rows
    (``phase``, ``gain_mean``, ``eta_lambda0_mean`` and the axes' values)."""

    def order(values: list[Any]) -> list[Any]:
        try:
            return sorted(set(values), key=float)
        except (TypeError, ValueError):
            return sorted(set(values), key=str)

    xs = order([r[x_axis] for r in rows])
    ys = order([r[y_axis] for r in rows]) if y_axis else [None]
    fig, (ax,) = _figure(width=max(4.0, 1.1 * len(xs) + 2.0),
                         height=max(2.4, 0.9 * len(ys) + 1.6))
    for r in rows:
        i, j = xs.index(r[x_axis]), ys.index(r[y_axis]) if y_axis else 0
        phase = str(r.get("phase") or "missing")
        ax.add_patch(_square(i, j, PHASE_COLORS.get(phase, "#ffffff"), phase))
        lines = [phase]
        gain = _number(r.get("gain_mean"))
        if gain is not None:
            lines.append(f"{100 * gain:+.1f} pt")
        eta_l0 = _number(r.get("eta_lambda0_mean"))
        if eta_l0 is not None:
            lines.append(f"ηλ₀ {eta_l0:.3g}")
        ax.text(i, j, "\n".join(lines), ha="center", va="center", fontsize=8,
                color="black" if phase in ("stays", "missing") else "white")
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(-0.5, len(ys) - 0.5)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys] if y_axis else [""])
    ax.set_xlabel(x_label)
    if y_label:
        ax.set_ylabel(y_label)
    ax.set_title("Phase per configuration (majority over seeds)")
    return fig


def _square(i: int, j: int, color: str, phase: str) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.48, j - 0.48), 0.96, 0.96, facecolor=color, edgecolor="white",
                     gid=f"phase:{i}:{j}:{phase}")


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def finetune_figure(curves: Sequence[dict[str, Any]], teacher_probe: float | None) -> Figure:
    """Test accuracy (%) over finetuning steps per start: the seed mean as a line (gid
    ``finetune/<start>``), the seeds' range as a band."""
    starts: dict[str, dict[int, list[float]]] = {}
    for r in curves:
        starts.setdefault(r["start"], {}).setdefault(int(r["step"]), []).append(
            100 * float(r["test_acc"]))
    fig, (ax,) = _figure()
    colors = {**{k: v[0] for k, v in CHECKPOINT_STYLE.items()}}
    others = iter(_colors(max(1, len(starts)), "tab10"))
    for start, by_step in starts.items():
        steps = sorted(by_step)
        values = [by_step[k] for k in steps]
        color = colors.get(start) or next(others)
        ax.plot(steps, [float(np.mean(v)) for v in values], color=color,
                label=f"from {start}", gid=f"finetune/{start}")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values],
                        color=color, alpha=0.2, linewidth=0)
    if teacher_probe is not None:
        ax.axhline(100 * teacher_probe, color="#6b6b6b", linestyle=":", linewidth=1,
                   label="teacher's linear probe")
    ax.set_xlabel("finetuning step")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Finetuning from T, C and S")
    ax.legend(fontsize=8)
    return fig
