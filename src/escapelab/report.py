"""Figures and a readable HTML report from what a run, sweep or LR range test left on disk.

``write_report(PATH)`` draws every figure the data in PATH supports (PNG and PDF under
``PATH/figures/``) and writes ``PATH/report.html``: one self-contained file with the
figures embedded, the config, the summary, phase labels, layerwise tables, and a caption
per figure saying what to look for and what the paper found. Nothing here trains or
analyses: it only reads files (the run directory is the only bridge).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from escapelab import plots
from escapelab.errors import EscapelabError
from escapelab.store import (
    REPORT_FILE,
    SWEEP_TABLE_CSV,
    RangeDir,
    RunDir,
    StudyDir,
    SweepDir,
    atomic_write_text,
    kind_of,
    write_figures,
)


@dataclass
class Drawn:
    """One figure of a report."""

    id: str
    title: str
    caption: str
    figure: Figure


@dataclass
class RunData:
    path: Path
    config_text: str
    summary: dict[str, Any] | None
    steps: list[dict[str, Any]]
    evals: list[dict[str, Any]]  # student evaluations
    teacher: dict[str, Any] | None
    analysis: dict[str, Any] | None
    state: str = ""  # what the run is doing (running, dead, interrupted, ...)
    sharpness: list[dict[str, Any]] = field(default_factory=list)  # student measurements
    lambda0: float | None = None  # top Hessian eigenvalue at the teacher
    finetune: dict[str, Any] | None = None  # finetune.json (escapelab finetune)
    finetune_curves: list[dict[str, Any]] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return bool(self.summary and self.summary.get("status") in ("diverged", "capped"))


def load_run(path: Path) -> RunData:
    run = RunDir.open(path)
    evals = run.evals()
    summary = run.summary()
    sharpness = run.sharpness()
    return RunData(
        path=path,
        config_text=run.config_text(),
        summary=summary.model_dump() if summary is not None else None,
        steps=run.steps(),
        evals=[r for r in evals if r.get("model") == "student"],
        teacher=next((r for r in evals if r.get("model") == "teacher"), None),
        analysis=run.analysis(),
        state=run.state_text(),
        sharpness=[r.model_dump() for r in sharpness if r.model == "student"],
        lambda0=next((r.top for r in sharpness if r.model == "teacher"), None),
        finetune=(finetune := run.finetune()),
        finetune_curves=[r for r in run.finetune_curves()
                         if finetune is not None and r.get("digest") == finetune["digest"]],
    )


def _kind(path: Path) -> str:
    kind = kind_of(path)
    if kind is None:
        raise EscapelabError(f"{path} is not a run directory, a sweep folder, an LR range "
                             "test folder or a study folder")
    return kind


# ---------------------------------------------------------------------------------------
# Captions: what to look for, and what the paper found

CAPTIONS = {
    "fig1a": "LR range test: the training loss while the step size grows exponentially, "
             "for the escape loss and for the same network trained on labels. Circles mark "
             "where a curve departs from its starting level, crosses where it diverges. "
             "The paper (CIFAR-10, VGG11) finds the supervised loss diverging near eta = 10 "
             "while the escape from the teacher happens in two steps, the second near "
             "eta = 500: escaping needs step sizes far beyond what supervised training "
             "tolerates.",
    "fig1b": "Training loss and norm of the full gradient over steps. Look for the spike "
             "within the first few steps (the escape), the overshoot into a plateau of "
             "small loss and gradient (the collapse), and, under full-batch gradient "
             "descent, a gradient norm that grows until it oscillates before the probe "
             "accuracy recovers (paper Fig. 1b). Steps where the student still equals the "
             "teacher exactly (loss and gradient 0) cannot appear on the log scale.",
    "fig1b_sharpness": "Training loss, full-gradient norm and the top eigenvalue of the "
                       "training loss's Hessian (Lanczos on a fixed subset, "
                       "metrics/sharpness.jsonl) on one step axis; dashed: the edge of "
                       "stability 2/eta (per step if the step size varies); dotted: "
                       "lambda_0 at the teacher; vertical line: the collapse C. GD is "
                       "stable along a curvature lambda only while lambda < 2/eta: a "
                       "teacher with eta * lambda_0 > 2 cannot hold the student. Look for "
                       "the edge-of-stability signature (Cohen et al. 2021): the top "
                       "eigenvalue rising to and hovering near 2/eta while the gradient "
                       "norm oscillates. The paper (Sec. 4) asks whether the escape "
                       "relates to it.",
    "phase": "Phase of each swept configuration, the majority over its seeds "
             "(escapelab.phases: escapes = ends at least 0.5 points above the teacher's "
             "probe; collapses = fell more than 0.5 points below it and does not end above; "
             "stays = never left or the probe did not notice; diverges = non-finite loss). "
             "Each cell gives the mean gain over the teacher and, where measured, "
             "eta * lambda_0 (lambda_0: the top Hessian eigenvalue at the teacher; plain "
             "gradient descent is unstable there once it exceeds 2).",
    "finetune": "Test accuracy while each start's encoder and a fresh linear classifier "
                "are trained on the labels (escapelab finetune): the line is the mean over "
                "seeds, the band their range; one seed gives every start the same classifier "
                "initialization and batch order. The dotted line is the teacher's linear "
                "probe (its frozen encoder).",
    "fig1c": "Linear-probe accuracy of the student's encoder over training, one line per "
             "step size (mean over seeds); dashed: the teacher. The paper sees no progress "
             "at eta = 32, then a collapse (accuracy drops) followed by recovery above the "
             "teacher that grows with the step size, and unrecoverable collapse beyond "
             "eta = 1e4 within 20k steps.",
    "fig1d": "Linear-probe accuracy over training, one line per batch size up to full-batch "
             "gradient descent, at eta = 1e4 (mean over seeds); dashed: the teacher. The "
             "paper: with less gradient noise the model takes longer to uncollapse, but "
             "full-batch gradient descent still escapes and ends above the teacher: large "
             "step sizes, not noise, drive the escape.",
    "fig1": "Linear-probe accuracy of the student's encoder over training; dashed: the "
            "teacher. Look for the drop right after the escape (the collapse) and the "
            "recovery above the teacher (paper Figs. 1c, 1d).",
    "fig2a": "Effective rank (exp of the entropy of the normalized singular values) of each "
             "layer's representation at the teacher T, the collapse C and the final student "
             "S. The paper: the teacher is rank deficient, the collapse drives the rank to "
             "single digits, and the student keeps more rank per layer than the teacher.",
    "fig2b": "Fraction of dead units (zero on every sample; conv units per channel and "
             "position) per layer. The paper: some neurons are dead at initialization, up "
             "to 60% at the collapse, and the student recovers.",
    "fig2c": "Condition number (largest singular value over the one at which 99.9% of the "
             "singular-value mass is reached) per layer. The paper: the student's features "
             "are better conditioned than at collapse and at initialization.",
    "fig3a": "Between-class variance tr(Sigma_b) per layer. The paper finds it much higher "
             "at the collapse than for the student or the teacher.",
    "fig3b": "Fisher discriminant tr(pinv(Sigma_w) Sigma_b) relative to the teacher's at "
             "the same layer (dashed line: 1 = the teacher). The paper: the student "
             "separates classes better than the teacher; the collapsed network cannot.",
    "fig3b_kmeans": "The discriminant of Fig. 3b with k-means cluster assignments in place "
                    "of the labels (the paper's footnote 1: no labels needed).",
    "fig3c": "Layerwise linear-probe accuracy. The paper: the teacher encodes good features "
             "in early layers that deteriorate with depth (loss of signal); the escape "
             "preserves them better.",
    "fig4": "MSE, ND-MSE and N-MSE under a constant step size and linear warm-ups: training "
            "loss (top) and probe accuracy (bottom). The paper (App. A): plain MSE diverges "
            "at such step sizes; a detached normalization (ND-MSE) with a slow warm-up and "
            "N-MSE stabilize the dynamics. On the small digits convnet, ND-MSE instead "
            "drives every encoder unit dead once the step size passes ~1e3, warm-up or not "
            "(a collapse without recovery); N-MSE is the stable choice there.",
    "extra_eval": "Further series measured at each evaluation: kNN accuracy, effective "
                  "rank and dead-unit fraction of the encoder output, and its linear CKA "
                  "with the teacher's encoder output on the same images; dashed: the "
                  "teacher.",
    "extra_cka_teacher": "Linear CKA (Kornblith et al. 2019) between each layer's "
                         "features and the teacher's at the same layer, on the same "
                         "images (dashed: 1 = the teacher itself). Invariant to rotations "
                         "and scale: low values mean the layer's representation is no "
                         "longer the teacher's in any rotated or rescaled form. Not in the "
                         "paper; it asks how far the escape moves each layer.",
    "extra_distance": "Distance of the student's parameters to the teacher's, "
                      "||theta - theta_T||, after each step: it starts at the realized "
                      "1e-10 offset and jumps by many orders of magnitude at the escape.",
}


# ---------------------------------------------------------------------------------------
# Figures of a run


def run_figures(data: RunData) -> list[Drawn]:
    out: list[Drawn] = []
    label = "this run" + (" (diverged)" if data.diverged else "")
    if data.steps:
        out.append(Drawn("fig1b_loss_grad", "Training loss and gradient norm",
                         CAPTIONS["fig1b"], plots.loss_grad_figure(
                             {label: data.steps}, {label: data.diverged})))
        if data.sharpness:
            collapse = data.summary.get("collapse_step") if data.summary else None
            out.append(Drawn("fig1b_sharpness", "Loss, gradient norm and sharpness against "
                             "2/eta", CAPTIONS["fig1b_sharpness"], plots.sharpness_figure(
                                 data.steps, data.sharpness, data.lambda0, collapse)))
        out.append(Drawn("extra_distance", "Distance to the teacher", CAPTIONS[
            "extra_distance"], plots.eval_series_figure(
                data.steps, None, [("dist_teacher", "||theta - theta_T||", True)])))
    if data.evals:
        teacher_acc = data.teacher.get("probe_acc") if data.teacher else None
        out.append(Drawn("fig1_probe", "Linear probe over training", CAPTIONS["fig1"],
                         plots.probe_over_steps_figure(
                             {label: ([r["step"] for r in data.evals],
                                      [r.get("probe_acc") for r in data.evals])},
                             teacher_acc, "Linear probe over training",
                             {label: data.diverged})))
        out.append(Drawn("extra_eval", "kNN accuracy, rank and dead units over training",
                         CAPTIONS["extra_eval"], plots.eval_series_figure(
                             data.evals, data.teacher,
                             [("knn_acc", "kNN accuracy (k=20)", False),
                              ("erank", "encoder effective rank", False),
                              ("dead_frac", "dead encoder units", False),
                              ("cka_teacher", "linear CKA with the teacher", False)])))
    if data.analysis is not None:
        out.extend(analysis_figures(data.analysis))
    if data.finetune_curves:
        opts = (data.finetune or {}).get("options", {})
        out.append(Drawn("fig_finetune", "Finetuning from T, C and S", CAPTIONS["finetune"]
                         + f" Here: {opts.get('optimizer')}, {opts.get('epochs')} epochs, "
                         f"batch {opts.get('batch_size')}, standardized features: "
                         f"{opts.get('standardize')}.",
                         plots.finetune_figure(data.finetune_curves,
                                               data.teacher.get("probe_acc")
                                               if data.teacher else None)))
    return out


def _series(analysis: dict[str, Any], checkpoint: str, metric: str) -> list[Any]:
    table = {r["layer"]: r["value"] for r in analysis["rows"]
             if r["checkpoint"] == checkpoint and r["metric"] == metric}
    return [table.get(layer) for layer in analysis["layers"]]


def analysis_figures(analysis: dict[str, Any]) -> list[Drawn]:
    names = [n for n in ("T", "C", "S") if n in analysis["checkpoints"]]
    steps = {n: analysis["checkpoints"][n].get("step") for n in names}
    metrics = {r["metric"] for r in analysis["rows"]}
    specs = [
        ("fig2a_erank", "erank", "Effective rank per layer (Fig. 2a)", "effective rank", True,
         False, None, "fig2a"),
        ("fig2b_dead", "dead_frac", "Dead units per layer (Fig. 2b)", "dead units (%)", False,
         True, None, "fig2b"),
        ("fig2c_condition", "condition_number", "Condition number per layer (Fig. 2c)",
         "condition number at 99.9% mass (log)", True, False, None, "fig2c"),
        ("fig3a_between", "tr_between", "Between-class variance per layer (Fig. 3a)",
         "tr(Sigma_b) (log)", True, False, None, "fig3a"),
        ("fig3b_discriminant", "discriminant_rel_teacher",
         "Discriminant relative to the teacher (Fig. 3b)",
         "tr(pinv(S_w) S_b) / teacher's (log)", True, False, 1.0, "fig3b"),
        ("fig3b_kmeans", "kmeans_discriminant_rel_teacher",
         "Label-free discriminant relative to the teacher (k-means)",
         "k-means tr(pinv(S_w) S_b) / teacher's (log)", True, False, 1.0, "fig3b_kmeans"),
        ("fig3c_layer_probe", "probe_acc", "Layerwise linear probe (Fig. 3c)",
         "linear probe accuracy (%)", False, True, None, "fig3c"),
        ("extra_cka_teacher", "cka_T", "Linear CKA with the teacher per layer",
         "linear CKA with T at the same tap", False, False, 1.0, "extra_cka_teacher"),
    ]
    out = []
    for fid, metric, title, ylabel, log, pct, ref, caption in specs:
        if metric not in metrics:
            continue
        values = {n: _series(analysis, n, metric) for n in names}
        out.append(Drawn(fid, title, CAPTIONS[caption], plots.layer_figure(
            analysis["layers"], values, title, ylabel, log=log, percent=pct, reference=ref,
            steps=steps)))
    return out


# ---------------------------------------------------------------------------------------
# Figures of a sweep


def _mean_over_seeds(runs: list[RunData], key: str) -> tuple[list[int], list[float | None]]:
    by_step: dict[int, list[float]] = {}
    for run in runs:
        for r in run.evals:
            v = r.get(key)
            by_step.setdefault(r["step"], [])
            if v is not None and math.isfinite(v):
                by_step[r["step"]].append(v)
    steps = sorted(by_step)
    return steps, [float(np.mean(by_step[s])) if by_step[s] else None for s in steps]


def _sort_key(value: str) -> tuple[int, float, str]:
    try:
        return (0, float(value), value)
    except ValueError:
        return (1 if value == "full" else 2, math.inf, value)


def sweep_groups(path: Path) -> tuple[list[str], dict[str, list[RunData]], dict[str, dict]]:
    """Runs of a sweep grouped by their non-seed values (label -> runs), in value order."""
    sweep = SweepDir(path)
    meta = sweep.meta()
    axes = [a for a in meta["axes"] if a != "seed"]
    groups: dict[str, list[RunData]] = {}
    values: dict[str, dict] = {}
    for point in meta["points"]:
        run_dir = sweep.run_path(point["run"])
        if kind_of(run_dir) != "run":
            continue
        label = ", ".join(f"{_axis_name(a)}={point['values'][a]}" for a in axes) or "runs"
        groups.setdefault(label, []).append(load_run(run_dir))
        values[label] = {a: point["values"][a] for a in axes}
    if len(axes) == 1:
        order = sorted(groups, key=lambda g: _sort_key(values[g][axes[0]]))
        groups = {g: groups[g] for g in order}
    return axes, groups, values


def _axis_name(axis: str) -> str:
    return {"optim.lr": "eta", "data.batch_size": "B", "loss.name": "loss"}.get(
        axis, axis.rsplit(".", 1)[-1])


def sweep_figures(path: Path) -> list[Drawn]:
    axes, groups, values = sweep_groups(path)
    if not groups:
        return []
    diverged = {g: any(r.diverged for r in runs) for g, runs in groups.items()}
    probe = {g: _mean_over_seeds(runs, "probe_acc") for g, runs in groups.items()}
    teachers = [r.teacher["probe_acc"] for runs in groups.values() for r in runs
                if r.teacher and r.teacher.get("probe_acc") is not None]
    teacher = float(np.mean(teachers)) if teachers else None
    out = []
    if axes == ["optim.lr"]:
        out.append(Drawn("fig1c_probe_by_lr", "Probe accuracy by step size (Fig. 1c)",
                         CAPTIONS["fig1c"], plots.probe_over_steps_figure(
                             probe, teacher, "Probe accuracy by step size (Fig. 1c)",
                             diverged)))
    elif axes == ["data.batch_size"]:
        out.append(Drawn("fig1d_probe_by_batch", "Probe accuracy by batch size (Fig. 1d)",
                         CAPTIONS["fig1d"], plots.probe_over_steps_figure(
                             probe, teacher, "Probe accuracy by batch size (Fig. 1d)",
                             diverged, cmap="plasma")))
        first = {g: runs[0].steps for g, runs in groups.items()}
        out.append(Drawn("fig1b_loss_grad", "Loss and gradient norm by batch size (Fig. 1b)",
                         CAPTIONS["fig1b"] + " One seed per batch size.",
                         plots.loss_grad_figure(first, {g: runs[0].diverged
                                                        for g, runs in groups.items()})))
    elif "loss.name" in axes and len(axes) == 2:
        other = next(a for a in axes if a != "loss.name")
        cells: dict[str, dict[str, dict[str, Any]]] = {}
        for g, runs in groups.items():
            run = runs[0]
            cells.setdefault(values[g][other], {})[values[g]["loss.name"]] = {
                "steps": run.steps, "evals": run.evals, "diverged": run.diverged,
                "teacher": run.teacher.get("probe_acc") if run.teacher else None}
        out.append(Drawn("fig4_loss_warmup", "Loss x warm-up (Fig. 4)", CAPTIONS["fig4"]
                         + " One seed per cell.", plots.loss_warmup_figure(cells)))
    else:
        out.append(Drawn("fig_sweep_probe", "Probe accuracy per configuration",
                         CAPTIONS["fig1"], plots.probe_over_steps_figure(
                             probe, teacher, "Probe accuracy per configuration", diverged)))
    table = _sweep_table(path)
    if table and 1 <= len(axes) <= 2:
        x_axis = "optim.lr" if "optim.lr" in axes else axes[0]
        y_axis = next((a for a in axes if a != x_axis), None)
        out.append(Drawn("fig_phase_diagram", "Phase diagram", CAPTIONS["phase"],
                         plots.phase_diagram_figure(
                             table, x_axis, y_axis, _axis_name(x_axis),
                             _axis_name(y_axis) if y_axis else None)))
    return out


def _sweep_table(path: Path) -> list[dict[str, Any]]:
    """The sweep's table.csv rows (mean over seeds per configuration), [] if absent."""
    return _csv_rows(SweepDir(path).tables()[SWEEP_TABLE_CSV])


def _csv_rows(file: Path) -> list[dict[str, Any]]:
    import csv

    if not file.exists():
        return []
    with file.open() as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# The HTML page


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 900px; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.phase-escapes { color: #2a7a2a; font-weight: bold; } .phase-diverges { color: #b00; }
.phase-collapses { color: #b06000; } .phase-stays { color: #555; }
.answer { font-size: 1.15em; } td.verdict { text-align: left; font-weight: bold; }
.v-holds { color: #2a7a2a; } .v-partly { color: #b06000; } .v-does-not-hold { color: #b00; }
.v-not-measured { color: #777; } .v-found { color: #235a9c; }
td.text { text-align: left; max-width: 28em; } td.rule { font-size: 0.85em; color: #555; }
.wide { overflow-x: auto; } #claims th { text-align: left; }
#claims th.group { background: #e8eef6; }
"""


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if pct:
            return f"{100 * value:.2f}%"
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def run_sentence(summary: dict[str, Any]) -> str:
    """One sentence of result for a finished run, in steps, ranks and points."""
    status, steps = summary.get("status"), summary.get("steps_completed")
    if status in ("diverged", "capped"):
        why = f" ({summary['reason']})" if summary.get("reason") else ""
        return f"The run {status} at step {steps} of {summary.get('total_steps')}{why}."
    parts = []
    escape, collapse = summary.get("escape_step"), summary.get("collapse_step")
    if escape is None:
        parts.append("never left its teacher (the loss stayed below train.escape_threshold)")
    else:
        parts.append(f"escaped at step {escape}")
        rank = summary.get("erank_collapse")
        if collapse is not None and rank is not None:
            parts.append(f"collapsed to effective rank {rank:.3g} at step {collapse}")
        recovery = summary.get("recovery_step")
        if recovery is not None:
            parts.append(f"was back at the teacher's probe accuracy by step {recovery}")
    gain, teacher, final = (summary.get("gain"), summary.get("teacher_probe_acc"),
                            summary.get("final_probe_acc"))
    if gain is not None and teacher is not None and final is not None:
        where = "above" if gain >= 0 else "below"
        parts.append(f"ended {abs(100 * gain):.2f} points {where} its teacher "
                     f"({100 * teacher:.2f}% -> {100 * final:.2f}% linear probe accuracy) "
                     f"after {steps} steps")
    text = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    return "The student " + text + "."


def _summary_section(summary: dict[str, Any] | None, state: str = "") -> str:
    if summary is None:
        return (f"<p><b>This run has not finished</b> ({html.escape(state)}): figures show "
                "what was recorded so far.</p>")
    pct = {"teacher_probe_acc", "final_probe_acc", "min_probe_acc", "probe_acc_collapse",
           "teacher_knn_acc", "final_knn_acc", "dead_frac_teacher",
           "dead_frac_collapse", "dead_frac_final", "changed_frac"}
    s = summary
    tcs = _table(["", "teacher T", "collapse C", "final S"], [
        ["linear probe accuracy", *(html.escape(_fmt(s.get(k), True)) for k in (
            "teacher_probe_acc", "probe_acc_collapse", "final_probe_acc"))],
        ["kNN accuracy", html.escape(_fmt(s.get("teacher_knn_acc"), True)), "-",
         html.escape(_fmt(s.get("final_knn_acc"), True))],
        ["encoder effective rank", *(html.escape(_fmt(s.get(k))) for k in (
            "erank_teacher", "erank_collapse", "erank_final"))],
        ["dead encoder units", *(html.escape(_fmt(s.get(k), True)) for k in (
            "dead_frac_teacher", "dead_frac_collapse", "dead_frac_final"))],
        ["step", "0", html.escape(_fmt(s.get("collapse_step"))),
         html.escape(_fmt(s.get("steps_completed")))]])
    rows = []
    for k, v in summary.items():
        if k == "gain":
            text = "-" if v is None else f"{100 * v:+.2f} points"
        elif k == "wall_s":
            text = f"{v:.1f} s"
        else:
            text = _fmt(v, k in pct)
        rows.append([html.escape(k), html.escape(text)])
    return (f'<p class="answer" id="run-sentence">{html.escape(run_sentence(summary))}</p>'
            + f'<div id="tcs">{tcs}</div>'
            + "<details><summary>every summary value (summary.json)</summary>"
            + _table(["key", "value"], rows) + "</details>")


def _layer_table(analysis: dict[str, Any]) -> str:
    names = [n for n in ("T", "C", "S") if n in analysis["checkpoints"]]
    metrics = [("erank", "erank", False), ("dead_frac", "dead", True),
               ("condition_number", "cond", False),
               ("discriminant_rel_teacher", "disc/T", False), ("probe_acc", "probe", True),
               ("cka_T", "CKA/T", False)]
    present = {r["metric"] for r in analysis["rows"]}
    metrics = [m for m in metrics if m[0] in present]
    header = ["layer"] + [f"{short} {n}" for _, short, _ in metrics for n in names]
    series = {(m, n): _series(analysis, n, m) for m, _, _ in metrics for n in names}
    rows = []
    for i, layer in enumerate(analysis["layers"]):
        rows.append([html.escape(layer)] + [html.escape(_fmt(series[(m, n)][i], pct))
                                            for m, _, pct in metrics for n in names])
    return _table(header, rows)


def _sweep_section(path: Path) -> str:
    parts = []
    for (name, file), title in zip(SweepDir(path).tables().items(),
                                   ("Aggregate over seeds", "Every run"), strict=True):
        rows = _csv_rows(file)
        if not rows:
            continue
        header = [h for h in rows[0] if not h.endswith("_std") and h != "error"]
        body = []
        for r in rows:
            cells = []
            for h in header:
                v = r[h]
                if h in ("phase",):
                    cells.append(f'<span class="phase-{html.escape(v)}">{html.escape(v)}'
                                 "</span>")
                else:
                    try:
                        num = float(v)
                        std = r.get(h.replace("_mean", "_std"))
                        text = f"{num:.4g}" + (f" ± {float(std):.2g}" if h.endswith("_mean")
                                               and std not in (None, "") else "")
                    except ValueError:
                        text = v or "-"
                    cells.append(html.escape(text))
            body.append(cells)
        parts.append(f"<h3>{title} ({name})</h3>" + _table(header, body))
    return "".join(parts)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _pdf(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="pdf")
    return buffer.getvalue()


STUDY_SOURCES = (("lr-range", "lr-range"), ("step-size", "step-size"),
                 ("batch-size", "batch-size"), ("loss-warmup", "loss-warmup"))


def _study_content(path: Path) -> tuple[list[str], list[Drawn], str]:
    """A study's page: the answer, the claims table, the parts, then every part's
    figures (ids prefixed by the part; ``rep`` is the first seed's representative run)."""
    from escapelab.study import read_plan, representatives

    plan, state = read_plan(path)
    sources = [(prefix, path / folder) for prefix, folder in STUDY_SOURCES]
    first = representatives(plan)[0]
    rep = SweepDir(path / "step-size").run_path(first.dirname)
    sources.append(("rep", rep))
    drawn: list[Drawn] = []
    for prefix, folder in sources:
        kind = kind_of(folder) if folder.is_dir() else None
        if kind is None:
            continue
        what = (f"representative run (eta {first.config.optim.lr:g}, seed "
                f"{first.config.seed})" if prefix == "rep" else prefix)
        for d in _content(folder, kind)[1]:
            drawn.append(Drawn(f"{prefix}-{d.id}", f"{what}: {d.title}", d.caption, d.figure))
    ids = {d.id for d in drawn}
    claims = (StudyDir(path).claims() or {}).get("claims", [])
    sections = [_claims_section(plan.name, claims, ids), _parts_section(state)]
    return sections, drawn, json.dumps(state["plan"], indent=2)


def _claims_section(scale: str, claims: list[dict[str, Any]], ids: set[str]) -> str:
    if not claims:
        return "<p>No claims evaluated yet: run <code>escapelab study</code>.</p>"
    counts = {v: sum(1 for c in claims if c["verdict"] == v)
              for v in ("holds", "partly", "does not hold", "not measured", "found")}
    judged = len(claims) - counts["found"]
    answer = (f"At the {scale} scale, {counts['holds']} of the paper's {judged} claims "
              f"hold, {counts['partly']} hold partly, {counts['does not hold']} do not hold"
              f" and {counts['not measured']} were not measured; {counts['found']} "
              "follow-up questions are answered with what was found.")
    rows = []
    group = None
    for c in claims:
        if c.get("group") != group:
            group = c.get("group")
            rows.append([f'<th colspan="6" class="group">{html.escape(str(group))}</th>'])
        anchor = (c.get("link") or "").replace("/", "-")
        figure = html.escape(c["figure"])
        if anchor in ids:
            figure = f'<a href="#{html.escape(anchor)}">{figure}</a>'
        verdict = html.escape(c["verdict"])
        detail = (f'<br><small>{html.escape(c["detail"])}</small>' if c.get("detail") else "")
        rows.append([figure, f'<td class="text">{html.escape(c["statement"])}',
                     f'<td class="verdict v-{verdict.replace(" ", "-")}">{verdict}',
                     f'<td class="text">{html.escape(c["value"])}{detail}',
                     f'<td class="text">{html.escape(c["paper"])}',
                     f'<td class="text rule"><i>{html.escape(c["quantity"])}.</i> '
                     f'{html.escape(c["rule"])}'])
    head = "".join(f"<th>{h}</th>" for h in ("figure", "claim", "verdict", "measured here",
                                              "paper", "quantity and rule"))
    body = "".join(f"<tr>{row[0]}</tr>" if len(row) == 1 else
                   "<tr><td>" + row[0] + "</td>" + "</td>".join(row[1:]) + "</td></tr>"
                   for row in rows)
    return (f'<p class="answer" id="study-answer">{html.escape(answer)}</p>'
            "<h2>Claims</h2><p>Each claim of the paper in our words, the quantity that "
            "tests it on this study's runs (mean ± std over seeds), the paper's value, and "
            "the rule behind the verdict (thresholds are constants in "
            "<code>escapelab.claims</code>). Accuracies are linear-probe accuracies; "
            "points are percentage points.</p>"
            f'<table id="claims"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def _parts_section(state: dict[str, Any]) -> str:
    rows = [[html.escape(name), html.escape(entry.get("state", "")),
             html.escape(entry.get("message", "")),
             html.escape(f"{entry.get('wall_s', 0.0) / 60:.1f} min")]
            for name, entry in state["parts"].items()]
    return ("<h2>Parts</h2><p>Each part is an ordinary escapelab folder inside this one "
            "(<code>escapelab report</code> and <code>status</code> work on each).</p>"
            + _table(["part", "state", "", "wall time"], rows))


def _content(path: Path, kind: str) -> tuple[list[str], list[Drawn], str]:
    """The sections, figures and configuration text of the report of `path`."""
    sections: list[str] = []
    drawn: list[Drawn]
    if kind == "study":
        return _study_content(path)
    if kind == "run":
        data = load_run(path)
        drawn = run_figures(data)
        sections.append("<h2>Summary</h2>" + _summary_section(data.summary, data.state))
        if data.analysis is not None:
            sections.append("<h2>Layerwise analysis</h2><p>Per layer tap at the teacher T, "
                            "the collapse C and the student S (see Figs. 2 and 3 below; "
                            "analysis.csv has every metric).</p>"
                            + f'<div class="wide">{_layer_table(data.analysis)}</div>')
        else:
            sections.append("<p>No layerwise analysis yet: run <code>escapelab analyze "
                            f"{html.escape(str(path))}</code> and then <code>escapelab "
                            "report</code> again for Figs. 2 and 3.</p>")
        config = data.config_text
    elif kind == "sweep":
        drawn = sweep_figures(path)
        sections.append("<h2>Runs and phases</h2><p>Phases: <i>stays</i> at the teacher, "
                        "<i>escapes</i> and ends at least 0.5 points of probe accuracy above "
                        "it, <i>collapses</i> (drops below it and does not end above), "
                        "<i>diverges</i> (non-finite loss).</p>" + _sweep_section(path))
        config = json.dumps(SweepDir(path).meta(), indent=2)
    else:
        payload = RangeDir(path).payload()
        drawn = [Drawn("fig1a_lr_range", "LR range test (Fig. 1a)", CAPTIONS["fig1a"],
                       plots.lr_range_figure(_numeric_marks(payload)))]
        rows = [[html.escape(c), html.escape(_fmt(info["depart_lr"])),
                 html.escape(_fmt(info["diverge_lr"]))]
                for c, info in payload["curves"].items()]
        sections.append("<h2>Detected step sizes (median over seeds)</h2>"
                        + _table(["curve", "departs at eta", "diverges at eta"], rows)
                        + f"<p>Rules: {html.escape(str(payload['rules']))}</p>")
        config = str(payload["options"])
    return sections, drawn, config


def _numeric_marks(payload: dict[str, Any]) -> dict[str, Any]:
    """The LR range payload with every detected step size that is not a finite number
    (a hand-edited or foreign lr_range.json) dropped from the figure's marks."""
    def number(value: Any) -> float | None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return float(value) if ok and math.isfinite(value) and value > 0 else None

    def marks(info: dict[str, Any]) -> dict[str, Any]:
        return {k: number(v) if k.endswith("_lr") or k.endswith("_lr_min")
                or k.endswith("_lr_max") else v for k, v in info.items()}

    curves = {}
    for name, info in payload.get("curves", {}).items():
        curves[name] = {**marks(info), "seeds": {seed: marks(v) for seed, v in
                                                 info.get("seeds", {}).items()}}
    return {**payload, "curves": curves}


def write_report(path: Path | str) -> Path:
    """Draw every figure the data in `path` supports and write ``report.html``."""
    path = Path(path)
    kind = _kind(path)
    title = f"escapelab {kind}: {path.name}"
    # Labels are text, never mathtext: a sweep label or folder name with "$...$" (a
    # user's choice) must not make matplotlib parse, and fail on, TeX.
    with matplotlib.rc_context({"text.parse_math": False}):
        sections, drawn, config = _content(path, kind)
    figure_html = []
    pngs = {d.id: _png(d.figure) for d in drawn}
    files = {f"{d.id}.png": pngs[d.id] for d in drawn}
    files.update({f"{d.id}.pdf": _pdf(d.figure) for d in drawn})
    write_figures(path, files)
    for d in drawn:
        png = pngs[d.id]
        encoded = base64.b64encode(png).decode()
        figure_html.append(
            f'<figure id="{d.id}"><img src="data:image/png;base64,{encoded}" '
            f'alt="{html.escape(d.title)}"><figcaption><b>{html.escape(d.title)}.</b> '
            f"{html.escape(d.caption)}</figcaption></figure>")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>"
            "<p>Escaping a random teacher: a student initialized next to a frozen random "
            "teacher and trained with huge step sizes first collapses, then recovers "
            "better representations than the teacher (Sarnthein et al.). This page is "
            "drawn from the files in this folder only.</p>"
            + "".join(sections)
            + "<h2>Figures</h2>" + ("".join(figure_html) or "<p>No data to draw yet.</p>")
            + "<h2>Configuration</h2><details><summary>show</summary><pre>"
            + html.escape(config) + "</pre></details></body></html>\n")
    atomic_write_text(path / REPORT_FILE, page)
    return path / REPORT_FILE

