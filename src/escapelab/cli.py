"""The ``escapelab`` command: thin wrappers that parse, call the library, and print.

Every command is a plain library call underneath (see each command's module); errors a
user can cause are printed as one line naming the problem, with a non-zero exit.
"""

from __future__ import annotations

import sys
import time
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError

from escapelab.config import AnalysisOptions, FinetuneOptions, RangeOptions, SlurmOptions
from escapelab.errors import EscapelabError

OVERRIDES_HELP = """
Overrides are `key=value` pairs on dotted config keys, e.g.

\b
  escapelab run --out runs/x seed=1 optim.lr=100 loss.name=mse data.batch_size=full

`escapelab config --keys` lists every key with its default and advice.
"""

MAIN_HELP = """Escaping random teacher initializations (Sarnthein et al.).

A frozen random teacher (He init), a student at theta_T + 1e-10 * theta_tilde, and plain
SGD at huge step sizes under N-MSE. The paper (CIFAR-10, VGG11, B=256) escapes at
eta >~ 500 and uses eta = 1e4: the student's representation first collapses (effective
rank to single digits, probe accuracy drops), then recovers above the teacher's.

\b
Start here:
  escapelab run                      the embedded default (digits, ~30 s on a CPU)
  escapelab run --preset cifar10-vgg11  the paper's setup (needs CIFAR-10 and a GPU)
  escapelab config --keys            every config key, its default and advice
"""


@click.group(help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.version_option(package_name="escapelab")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug: bool) -> None:
    _state["debug"] = debug


_state: dict[str, Any] = {"debug": False}


# ---------------------------------------------------------------------------------------
# Options from pydantic models: one definition, its field text the help


def _field_type(annotation: Any) -> tuple[Any, bool]:
    """(click type, is a comma-separated tuple) for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _field_type(args[0])
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if origin is tuple:
        return click.STRING, True
    return {int: click.INT, float: click.FLOAT, bool: click.BOOL}.get(annotation,
                                                                        click.STRING), False


def model_options(model: type[BaseModel], names: dict[str, str] | None = None,
                  exclude: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Click options for every field of `model`: --field-name, its description as the
    help, its default shown. Booleans get --x/--no-x; tuples are comma-separated."""
    names = names or {}

    def decorate(command: Any) -> Any:
        for name, field in reversed(model.model_fields.items()):
            if name in exclude:
                continue
            flag = names.get(name, "--" + name.replace("_", "-"))
            default = field.default
            if field.annotation is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", name, default=default,
                                      show_default=True, help=field.description)
            else:
                kind, is_tuple = _field_type(field.annotation)
                shown = ",".join(map(str, default)) if is_tuple and default else default
                option = click.option(flag, name, type=kind, default=None,
                                      show_default=str(shown) if shown is not None else False,
                                      help=field.description)
            command = option(command)
        return command

    return decorate


def build_options(model: type[BaseModel], values: dict[str, Any]) -> Any:
    """Validate the options a command received into `model` (one line per problem)."""
    given: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name not in values or values[name] is None:
            continue
        value = values[name]
        if _field_type(field.annotation)[1] and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())
        given[name] = value
    try:
        return model.model_validate(given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else "options"
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise EscapelabError("; ".join(problems)) from None


@cli.command(help=f"""Run the escape experiment and write a run directory.

Trains a student away from its random teacher, probing the encoder on a log-spaced
then regular schedule, and saves checkpoints T (teacher), C (collapse) and S (final).
Defaults to the `digits` preset: eta 3e4, B 64, 3000 steps, N-MSE (on digits the
collapse-and-recovery shows at eta 1e4-3e4; eta <= 100 stays at the teacher; plain
MSE at 1e4 diverges). The paper's run is `--preset cifar10-vgg11`.

One run over several processes or GPUs: `torchrun --nproc_per_node N -m escapelab run
...` shards every batch over the ranks (gloo on CPUs, NCCL on GPUs) and all-reduces to
exactly the batch's mean gradient; rank 0 evaluates and writes.
{OVERRIDES_HELP}""")
@click.option("--preset", default="digits", show_default=True,
              help="Preset name (digits, cifar10-vgg11) or a YAML file.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Run directory (default: runs/<preset>-<time>-s<seed>).")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), default=None,
              help="Continue an interrupted run directory (its own config is used).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("overrides", nargs=-1)
def run(preset: str, out: Path | None, resume_dir: Path | None, overwrite: bool, quiet: bool,
        overrides: tuple[str, ...]) -> None:
    from escapelab import train as training
    from escapelab.config import load_config

    if resume_dir is not None:
        if overrides or out is not None:
            raise EscapelabError("--resume continues a run with its saved config; drop "
                                 "--out and the overrides")
        with _progress_bar(quiet) as progress:
            summary = training.resume(resume_dir, progress=progress)
        _print_summary(summary, resume_dir)
        from escapelab.report import write_report

        click.echo(f"report: {write_report(resume_dir)}")
        return
    cfg = load_config(preset, overrides)
    if out is None:
        out = Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-s{cfg.seed}"
    from escapelab.runtime import Ranks

    main_rank = Ranks.from_env().main  # under torchrun only rank 0 reports
    if main_rank:
        click.echo(f"escapelab: {cfg.name}, {cfg.model.name} on {cfg.data.name}, "
                   f"{cfg.loss.name}, eta {cfg.optim.lr:g}, batch {cfg.data.batch_size}, "
                   f"seed {cfg.seed} -> {out}", err=True)
    with _progress_bar(quiet or not main_rank) as progress:
        summary = training.train(cfg, out, overwrite=overwrite, progress=progress)
    if main_rank:
        _print_summary(summary, out)
        from escapelab.report import write_report

        click.echo(f"report: {write_report(out)}")


@cli.command(help=f"""Run a grid of configurations and aggregate them (paper Figs. 1c, 1d, 4).

SPEC is a sweep preset (step-size, batch-size, loss-warmup) or a YAML file with base,
overrides and grid; or build a grid with --grid key=v1,v2 (repeatable). Every point runs
into OUT/runs/<label>-<hash>; re-launching skips finished runs and resumes interrupted
ones; a failed or diverged run never stops the others. Writes OUT/runs.csv (one row per
run, with its phase: stays / escapes / collapses / diverges) and OUT/table.csv (mean and
std over seeds), and prints the table.

\b
  escapelab sweep --preset step-size --out runs/steps          (digits, 18 runs)
  escapelab sweep --preset step-size --scale fashion-mnist --out DIR   (CPU, hours)
  escapelab sweep --preset step-size --scale paper --out DIR   (CIFAR-10, needs GPUs)
  escapelab sweep --grid optim.lr=1e3,1e4 --grid seed=0,1 --out DIR train.steps=500
{OVERRIDES_HELP}""")
@click.argument("spec", required=False)
@click.option("--preset", default=None, help="A sweep preset: " + "step-size, batch-size, "
              "loss-warmup.")
# The choices are escapelab.sweep.SCALES, spelled out so that --help does not import torch.
@click.option("--scale", type=click.Choice(["digits", "fashion-mnist", "paper"]),
              default="digits", show_default=True,
              help="Which section of the spec: digits (CPU, minutes), fashion-mnist (CPU, "
              "~10 min per run) or paper (CIFAR-10 / VGG11, a GPU per run).")
@click.option("--base", default=None, help="Base config preset (default: the spec's).")
@click.option("--grid", "grid_items", multiple=True, help="key=v1,v2,... (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Sweep folder (default: runs/sweep-<name>).")
@click.option("--backend", type=click.Choice(["local", "slurm"]), default="local",
              show_default=True, help="Local worker processes, or a Slurm job array "
              "(submitit).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes (default: one per core; cores are split).")
@click.option("--group/--no-group", default=True, show_default=True,
              help="Train points that differ only in step size, seed, offset or schedule "
              "together, several runs per process (torch.func.vmap; each keeps its own "
              "run directory); --no-group runs one process per point. Local backend only.")
@model_options(SlurmOptions)
@click.argument("overrides", nargs=-1)
def sweep(spec: str | None, preset: str | None, scale: str, base: str | None,
          grid_items: tuple[str, ...], out: Path | None, backend: str,
          workers: int | None, group: bool, overrides: tuple[str, ...], **slurm: Any) -> None:
    from escapelab import sweep as sweeps

    if spec is not None and "=" in spec:  # an override, not a spec
        overrides, spec = (spec, *overrides), None
    source = spec or preset
    if source is not None:
        loaded = sweeps.load_spec(source, scale)
    elif grid_items:
        loaded = sweeps.SweepSpec(name="grid", base=base or "digits")
    else:
        raise EscapelabError("give a SPEC, --preset NAME or at least one --grid key=values")
    extra = {k: v for k, v in (o.partition("=")[::2] for o in overrides)}
    if any(not k for k in extra) or any("=" not in o for o in overrides):
        raise EscapelabError(f"overrides must be key=value, got {list(overrides)}")
    loaded = loaded.replace(base=base or loaded.base, overrides={**loaded.overrides, **extra},
                            grid={**loaded.grid, **sweeps.parse_grid(grid_items)})
    out = out or Path("runs") / f"sweep-{loaded.name}"

    def report(i: int, total: int, point: Any, result: dict[str, Any]) -> None:
        result = result if isinstance(result, dict) else result.model_dump()
        acc = result.get("final_probe_acc")
        click.echo(f"[{i}/{total}] {point.label}: {result.get('status')}"
                   + (f", final probe {100 * acc:.2f}%" if acc is not None else "")
                   + (f" ({result['error'].strip().splitlines()[-1]})"
                      if result.get("error") else ""), err=True)

    result = sweeps.run_sweep(loaded, out, backend=backend, workers=workers,
                              slurm=build_options(SlurmOptions, slurm), progress=report,
                              group=group)
    click.echo(f"{result['points']} points: {result['ran']} run, {result['skipped']} "
               "already finished")
    _print_sweep_table(result["table"], list(loaded.grid))
    from escapelab.store import SweepDir

    click.echo("wrote " + " and ".join(str(p) for p in SweepDir(out).tables().values()))


def _print_sweep_table(table: list[dict[str, Any]], axes: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = [a for a in axes if a != "seed"]
    t = Table(box=None, title="sweep (mean ± std over seeds; accuracies in %)")
    for a in shown:
        t.add_column(a)
    for col in ("runs", "phase", "teacher", "min", "final", "gain", "escape step",
                "collapse depth"):
        t.add_column(col, justify="right")

    def pm(row: dict[str, Any], key: str, scale: float = 100.0) -> str:
        mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
        if mean is None:
            return "-"
        return f"{scale * mean:.2f}±{scale * (std or 0):.2f}"

    for row in table:
        t.add_row(*[str(row[a]) for a in shown], str(row["runs"]), row["phases"],
                  pm(row, "teacher_probe_acc"), pm(row, "min_probe_acc"),
                  pm(row, "final_probe_acc"), pm(row, "gain"), pm(row, "escape_step", 1.0),
                  pm(row, "collapse_depth"))
    Console(width=160).print(t)


@cli.command("lr-range", help=f"""LR range test (paper Fig. 1a): escape vs supervised loss.

The step size grows exponentially from --start to --end (paper: 1e-6 to 1e6 over 5
epochs) while the student trains on the escape loss and, side by side, the same
architecture trains on the labels (cross-entropy). No early stop except non-finite
values or --cap. Prints, per curve, the step size where the loss departs from its
starting level and where it diverges (rules in `escapelab.lr_range`); writes
lr_range.csv (curve, seed, step, lr, loss, grad_norm), lr_range.json and the runs.
The paper: the supervised loss diverges near eta = 10; the escape needs eta ~ 500.
{OVERRIDES_HELP}""")
@click.option("--preset", default="digits", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: runs/lr-range-<preset>-<time>).")
@model_options(RangeOptions, names={"start_lr": "--start", "end_lr": "--end"})
@click.argument("overrides", nargs=-1)
def lr_range(preset: str, out: Path | None, overrides: tuple[str, ...], **options: Any,
             ) -> None:
    from escapelab import lr_range as range_test
    from escapelab.config import load_config

    base = load_config(preset, overrides)
    opts = build_options(RangeOptions, options)
    if out is None:
        out = Path("runs") / f"lr-range-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    payload = range_test.run_lr_range(base, out, opts, progress=lambda c, s: click.echo(
        f"lr-range: {c} curve, seed {s}", err=True))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LR range test {opts.start_lr:g} -> {opts.end_lr:g} ({opts.mode})",
                  box=None)
    for col in ("curve", "departs at eta", "diverges at eta", "per seed (depart / diverge)"):
        table.add_column(col, justify="right" if col != "curve" else "left")
    for curve, info in payload["curves"].items():
        per_seed = "  ".join(f"s{k}: {_eta(v['depart_lr'])} / {_eta(v['diverge_lr'])}"
                             for k, v in info["seeds"].items())
        table.add_row(curve, _eta(info["depart_lr"]), _eta(info["diverge_lr"]), per_seed)
    Console(width=140).print(table)
    from escapelab.store import RangeDir

    click.echo(f"wrote {RangeDir(out).csv_path} and {RangeDir(out).json_path}")


def _eta(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


@cli.command(help="""Layerwise signal propagation and separability (paper Sec. 3).

For the checkpoints T (teacher), C (collapse), S (final) and any saved step of RUN_DIR,
measures every layer tap: effective rank, dead units, condition number (Fig. 2),
between/within/total variance, the Fisher discriminant tr(pinv(S_w) S_b) absolute and
relative to the teacher's (Fig. 3a-b), the same with k-means clusters instead of labels,
and a layerwise linear probe (Fig. 3c). Writes RUN_DIR/analysis.csv (checkpoint, layer,
metric, value) and analysis.json. The paper finds, at C, rank down to single digits and
up to 60% dead units; at S, higher rank and better conditioning than at T.
""")
@click.argument("run_dir", type=click.Path(path_type=Path))
@model_options(AnalysisOptions, exclude=("batch_size",))
def analyze(run_dir: Path, **options: Any) -> None:
    from escapelab import analyze as analysis
    from escapelab.store import ANALYSIS_CSV, ANALYSIS_JSON, RunDir

    opts = build_options(AnalysisOptions, options)
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("analyzing", total=None)
        result = analysis.analyze(run_dir, opts, progress=lambda ckpt, tap: bar.update(
            task, description=f"checkpoint {ckpt}, layer {tap}"))
    _print_analysis(result)
    click.echo(f"wrote {run_dir / ANALYSIS_CSV} and {run_dir / ANALYSIS_JSON}")
    from escapelab.report import write_report

    if RunDir(run_dir).report_path.exists():  # keep the run's report in step with its data
        click.echo(f"report: {write_report(run_dir)}")


def _print_analysis(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    names = list(result.checkpoints)
    table = Table(title="layerwise analysis (" + ", ".join(
        f"{n}=step {result.checkpoints[n]['step']}" if result.checkpoints[n]["step"]
        is not None else f"{n}=teacher" for n in names) + ")", box=None)
    table.add_column("layer", style="bold")
    columns = [("erank", "erank", "{:.3g}"), ("dead %", "dead_frac", "pct"),
               ("cond", "condition_number", "{:.3g}"),
               ("disc/T", "discriminant_rel_teacher", "{:.3g}"), ("probe %", "probe_acc", "pct")]
    for title, _, _ in columns:
        table.add_column(f"{title} " + "/".join(names), justify="right")
    for layer in result.layers:
        cells = []
        for _, metric, fmt in columns:
            values = []
            for name in names:
                try:
                    v = result.value(name, layer, metric)
                except KeyError:
                    v = None
                values.append("-" if v is None else f"{100 * v:.1f}" if fmt == "pct"
                              else fmt.format(v))
            cells.append(" ".join(values))
        table.add_row(layer, *cells)
    Console(width=160).print(table)


@cli.command(help="""Finetune the encoders of T, C and S on the labels (paper Sec. 4).

For each start checkpoint and seed, trains the start's encoder plus a fresh linear
classifier by cross-entropy on RUN_DIR's training split, with the same classifier
initialization and batch order for every start of one seed, and measures the test
accuracy along the way. Writes RUN_DIR/finetune/curves.jsonl and finetune.json; the
report draws the curves. A second call with the same options skips what is done.
""")
@click.argument("run_dir", type=click.Path(path_type=Path))
@model_options(FinetuneOptions, names={"starts": "--from"})
@click.option("--overwrite", is_flag=True, help="Replace finetuning results made with "
              "other options.")
def finetune(run_dir: Path, overwrite: bool, **options: Any) -> None:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from escapelab import finetune as finetuning
    from escapelab.store import FINETUNE_CURVES, FINETUNE_JSON, RunDir

    opts = build_options(FinetuneOptions, options)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("finetuning", total=None)

        def show(start: str, seed: int, step: int, total: int) -> None:
            bar.update(task, description=f"from {start}, seed {seed}", completed=step,
                       total=total)

        payload = finetuning.finetune(run_dir, opts, overwrite=overwrite, progress=show)
    table = Table(title=f"finetuning ({opts.optimizer}, lr {opts.step_size():g}, "
                  f"{opts.epochs} epochs, seeds {','.join(map(str, opts.seeds))}; "
                  "test accuracy in %)", box=None)
    for col in ("start", "final (mean ± std)", "after epoch 1", "steps to target"):
        table.add_column(col, justify="left" if col == "start" else "right")
    for start, info in payload["starts"].items():
        epoch1 = info["epoch1_test_acc_mean"]
        table.add_row(start, f"{100 * info['final_test_acc_mean']:.2f} ± "
                      f"{100 * info['final_test_acc_std']:.2f}",
                      "-" if epoch1 is None else f"{100 * epoch1:.2f}",
                      str(info["steps_to_target"] or "-"))
    Console(width=140).print(table)
    click.echo(f"target: {100 * finetuning.TARGET_SHARE:.0f}% of the best final mean; "
               f"wrote {run_dir / FINETUNE_CURVES} and {run_dir / FINETUNE_JSON}")
    from escapelab.report import write_report

    if RunDir(run_dir).report_path.exists():
        click.echo(f"report: {write_report(run_dir)}")


@cli.command(help="""Draw the paper's figures and an HTML report from PATH.

PATH is a run directory, a sweep folder or an LR range test folder. Draws every figure
its data supports (PNG and PDF under PATH/figures/): 1a (LR range test), 1b (loss and
gradient norm), 1c/1d (probe accuracy by step size / batch size), 2a-c and 3a-c (after
`escapelab analyze`), 4 (loss x warm-up), and further series; writes PATH/report.html,
one self-contained page with the summary, phases, layerwise tables and captions. Reads
files only: never trains or analyses.
""")
@click.argument("path", type=click.Path(path_type=Path))
def report(path: Path) -> None:
    from escapelab.report import write_report
    from escapelab.store import FIGURES_DIR

    page = write_report(path)
    figures = sorted(p.stem for p in (path / FIGURES_DIR).glob("*.png"))
    click.echo(f"figures: {', '.join(figures) or 'none'}")
    click.echo(f"report: {page}")


@cli.command(help="""Turn a run directory's records into TensorBoard event files.

Writes metrics/steps.jsonl (train/...), metrics/evals.jsonl (teacher/... at step 0,
eval/...) and, for a finished run, summary.json (summary/... at the last step) into
RUN_DIR/tensorboard/: the same series that `logger=tensorboard` writes live. View with
`tensorboard --logdir RUN_DIR/tensorboard` (or the parent of several runs). Needs
tensorboardX: pip install 'escapelab[tensorboard]'.
""")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["tensorboard"]), default="tensorboard",
              show_default=True, help="What to export to.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder of the event files (default: RUN_DIR/tensorboard).")
@click.option("--overwrite", is_flag=True, help="Replace the event files already in that "
              "folder (e.g. those a live logger wrote).")
def export(run_dir: Path, target: str, out: Path | None, overwrite: bool) -> None:
    from escapelab.loggers import export_tensorboard

    folder = export_tensorboard(run_dir, out, overwrite=overwrite)
    click.echo(f"wrote {folder} (view with: tensorboard --logdir {folder})")


@cli.command(help="""Say what a run directory (or every run of a sweep folder) is doing.

running (its writer holds the lock; with its PID, host and last heartbeat), dead (says
running but its writer is gone: killed, out of memory, node lost; resume it), starting,
interrupted (resumable or not), failed (with the reason), completed, diverged, capped.
Exits 0 if every run is completed, 1 otherwise.
""")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def status(paths: tuple[Path, ...]) -> None:
    from escapelab.store import RunDir, SweepDir, kind_of

    done = True
    for path in paths:
        kind = kind_of(path)
        if kind == "study":
            done = _study_status(path) and done
            continue
        if kind == "sweep":
            sweep = SweepDir(path)
            runs = [(p["run"], sweep.run(p["run"])) for p in sweep.meta()["points"]]
        elif kind == "run":
            runs = [(str(path), RunDir.open(path))]
        else:
            raise EscapelabError(f"{path} is not a run directory, a sweep folder or a "
                                 "study folder")
        for name, run in runs:
            text = run.state_text() if run.path.is_dir() else "not started"
            done = done and text.startswith("completed")
            click.echo(f"{name}: {text}")
    sys.exit(0 if done else 1)


@cli.command(help="""The paper's whole study at one scale, and a verdict on each claim.

Runs the LR range test (Fig. 1a), the step-size, batch-size and loss x warm-up sweeps
(Figs. 1b-d, 4), the layerwise analysis of the representative runs (Figs. 2, 3) and
finetuning from T, C and S (Sec. 4), each part an ordinary escapelab folder inside OUT;
then judges every claim of the paper (escapelab.claims: the quantity, the rule, the
verdict holds / partly / does not hold / not measured), prints the claims table and
writes OUT/claims.json and OUT/report.html. A second call skips what is finished and
resumes what was interrupted.


Scales (escapelab/studies/*.yaml, or a YAML plan of the same form):
  digits               scikit-learn digits, small convnet: ~10 min on 2 CPU cores
  fashion-mnist        Fashion-MNIST, convnet 16-128: <= 60 min on 2 CPU cores
  fashion-mnist-vgg11  VGG11 on Fashion-MNIST padded to 32x32: a GPU
  cifar10-vgg11        the paper's: CIFAR-10, VGG11, 20k-step runs: GPUs
""")
@click.option("--scale", default="digits", show_default=True,
              help="A study scale (digits, fashion-mnist, fashion-mnist-vgg11, "
              "cifar10-vgg11) or a YAML plan.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Study folder (default: runs/study-<scale>).")
@click.option("--parts", default=None, help="Comma-separated parts to run now (default: "
              "all): lr-range, step-size, batch-size, loss-warmup, analyze, finetune.")
@click.option("--slurm", "use_slurm", is_flag=True, help="Send the sweeps' runs to Slurm "
              "(as `escapelab sweep --backend slurm`); the rest runs here.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes of the sweeps (default: one per core).")
@click.option("--group/--no-group", default=True, show_default=True,
              help="Train sweep points that can share a process together (as `sweep`).")
@model_options(SlurmOptions)
def study(scale: str, out: Path | None, parts: str | None, use_slurm: bool,
          workers: int | None, group: bool, **slurm: Any) -> None:
    from escapelab import study as studies

    plan = studies.load_plan(scale)
    out = out or Path("runs") / f"study-{plan.name}"
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip()) if parts else None
    t0 = time.perf_counter()
    result = studies.run_study(
        plan, out, parts=chosen, backend="slurm" if use_slurm else "local", workers=workers,
        slurm=build_options(SlurmOptions, slurm), group=group,
        say=lambda text: click.echo(text, err=True))
    _print_claims(result["claims"]["claims"])
    states = {name: entry["state"] for name, entry in result["parts"].items()}
    asked = chosen or tuple(states)
    unfinished = [f"{n} ({s})" for n, s in states.items() if s != "done" and n in asked]
    later = [f"{n} ({s})" for n, s in states.items() if s != "done" and n not in asked]
    click.echo(f"study {plan.name}: {time.perf_counter() - t0:.0f} s this call; "
               + (f"unfinished parts: {', '.join(unfinished)}" if unfinished
                  else "every part done" if not later else "the parts asked for are done")
               + (f"; other parts not done: {', '.join(later)}" if later else ""))
    click.echo(f"claims: {out / 'claims.json'}")
    click.echo(f"report: {out / 'report.html'}")
    if unfinished:
        sys.exit(1)


def _print_claims(claims: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    colors = {"holds": "green", "partly": "yellow", "does not hold": "red",
              "not measured": "dim", "found": "blue"}
    table = Table(title="The paper's claims, here", box=None, show_lines=False)
    table.add_column("figure")
    table.add_column("claim", max_width=48)
    table.add_column("verdict")
    table.add_column("measured here (mean ± std over seeds)", max_width=60)
    for c in claims:
        verdict = c["verdict"]
        table.add_row(c["figure"], c["statement"], f"[{colors[verdict]}]{verdict}[/]",
                      c["value"] if verdict != "not measured" else c["detail"])
    Console(width=170).print(table)


def _study_status(path: Path) -> bool:
    """Print a study's parts and its unfinished runs; True if every part is done."""
    from escapelab.study import SWEEP_PARTS, part_runs, read_plan

    plan, state = read_plan(path)
    done = True
    for name, entry in state["parts"].items():
        message = f" ({entry['message']})" if entry.get("message") else ""
        click.echo(f"{name}: {entry['state']}{message}, {entry.get('wall_s', 0.0):.0f} s")
        done = done and entry["state"] == "done"
        if name in SWEEP_PARTS:
            for point, run in part_runs(plan, path, name):
                if not run.path.is_dir():
                    click.echo(f"  {point.dirname}: not started")
                elif run.summary() is None:  # an ended run (diverged included) is done
                    click.echo(f"  {point.dirname}: {run.state_text()}")
    return done


@cli.command(help=f"""Print the resolved config of a preset with overrides (YAML).
{OVERRIDES_HELP}""")
@click.option("--preset", default="digits", show_default=True)
@click.option("--keys", is_flag=True, help="List every key with its default and advice.")
@click.argument("overrides", nargs=-1)
def config(preset: str, keys: bool, overrides: tuple[str, ...]) -> None:
    from escapelab.config import describe_keys, dump_yaml, load_config

    if keys:
        from rich.console import Console
        from rich.table import Table

        table = Table("key", "default", "meaning", show_lines=False, box=None)
        for key, default, text in describe_keys():
            table.add_row(key, default, text)
        Console(width=140).print(table)
        return
    click.echo(dump_yaml(load_config(preset, overrides)), nl=False)


@cli.command(help="List the presets shipped with escapelab.")
def presets() -> None:
    from escapelab.config import load_config, preset_names

    for name in preset_names():
        cfg = load_config(name)
        click.echo(f"{name:16s} {cfg.model.name} on {cfg.data.name}, {cfg.loss.name}, "
                   f"eta {cfg.optim.lr:g}, batch {cfg.data.batch_size}")


class _progress_bar:
    """A rich progress bar on stderr fed by the training loop's progress callback."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=None, info="")
        return self.update

    def update(self, step: int, total: int, info: dict[str, Any]) -> None:
        probe = info.get("probe_acc")
        text = (f"loss {info['loss']:.2e}  |grad| {info['grad_norm']:.2e}  "
                f"probe {probe:.3f}" if probe is not None else
                f"loss {info['loss']:.2e}  |grad| {info['grad_norm']:.2e}")
        self.bar.update(self.task, completed=step, total=total, info=text)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "-"
    if pct:
        return f"{100 * value:.2f}%"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_summary(summary: Any, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    s = summary.model_dump()
    table = Table(title=f"escapelab run: {s['status']}"
                  + (f" ({s['reason']})" if s.get("reason") else ""), box=None)
    table.add_column("", style="bold")
    for col in ("teacher T", "collapse C", "final S"):
        table.add_column(col, justify="right")
    table.add_row("probe accuracy", _fmt(s["teacher_probe_acc"], True),
                  _fmt(s["probe_acc_collapse"], True), _fmt(s["final_probe_acc"], True))
    table.add_row("effective rank", _fmt(s["erank_teacher"]), _fmt(s["erank_collapse"]),
                  _fmt(s["erank_final"]))
    table.add_row("dead units", _fmt(s["dead_frac_teacher"], True),
                  _fmt(s["dead_frac_collapse"], True), _fmt(s["dead_frac_final"], True))
    table.add_row("step", "-", _fmt(s["collapse_step"]), _fmt(s["steps_completed"]))
    console = Console()
    console.print(table)
    gain = s.get("gain")
    console.print(f"escape step {_fmt(s['escape_step'])}; lowest probe accuracy "
                  f"{_fmt(s['min_probe_acc'], True)} at step {_fmt(s['min_probe_acc_step'])}; "
                  f"gain over the teacher {_fmt(gain * 100 if gain is not None else None)} "
                  f"points; {s['wall_s']:.1f} s", soft_wrap=True)
    # soft_wrap: a long path must stay one line (copied, or read by scripts)
    console.print(f"run directory: {out}", soft_wrap=True)


def _warn(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    click.echo(f"escapelab: warning: {message}", err=True)


def main() -> None:
    """The console entry point: every error a user can cause is one line on stderr and
    a non-zero exit (2; 128 + the signal's number when a run was stopped by one), never a
    traceback unless --debug."""
    from escapelab.store import RunDirWarning

    warnings.showwarning = _warn
    warnings.simplefilter("always", RunDirWarning)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and EOFError) into Abort
        if isinstance(exc.__context__, EOFError):
            _fail(exc.__context__, "unexpected end of input", 2)
        click.echo("escapelab: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("escapelab: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EscapelabError as exc:
        _fail(exc, str(exc), exc.exit_code)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _fail(exc, f"{exc.strerror or exc}{where}", 2)
    except Exception as exc:  # a bug: still one line, the traceback with --debug
        _fail(exc, f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for "
              "the traceback, and please report it)", 1)


def _fail(exc: BaseException, message: str, code: int) -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc)
    first = " ".join(message.split("\n"))
    click.echo(f"escapelab: error: {first}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
