"""The ``escapelab`` command: thin wrappers that parse, call the library, and print.

Every command is a plain library call underneath (see each command's module); errors a
user can cause are printed as one line naming the problem, with a non-zero exit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

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
def cli() -> None:
    pass


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
    main_rank = training.Ranks.from_env().main  # under torchrun only rank 0 reports
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
  escapelab sweep --preset step-size --scale paper --out DIR   (CIFAR-10, needs GPUs)
  escapelab sweep --grid optim.lr=1e3,1e4 --grid seed=0,1 --out DIR train.steps=500
{OVERRIDES_HELP}""")
@click.argument("spec", required=False)
@click.option("--preset", default=None, help="A sweep preset: " + "step-size, batch-size, "
              "loss-warmup.")
@click.option("--scale", type=click.Choice(["digits", "paper"]), default="digits",
              show_default=True, help="digits (CPU, minutes) or the paper's CIFAR-10 scale.")
@click.option("--base", default=None, help="Base config preset (default: the spec's).")
@click.option("--grid", "grid_items", multiple=True, help="key=v1,v2,... (repeatable).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Sweep folder (default: runs/sweep-<name>).")
@click.option("--backend", type=click.Choice(["local", "slurm"]), default="local",
              show_default=True, help="Local worker processes, or a Slurm job array "
              "(submitit).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes (default: one per core; cores are split).")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time-min", type=click.IntRange(min=1), default=60, show_default=True,
              help="Slurm time limit per run, minutes.")
@click.option("--cpus", type=click.IntRange(min=1), default=1, show_default=True,
              help="Slurm CPUs per run.")
@click.option("--wait-s", type=float, default=None, help="Stop waiting for Slurm after "
              "this many seconds (unfinished runs are recorded as failed; relaunch later).")
@click.argument("overrides", nargs=-1)
def sweep(spec: str | None, preset: str | None, scale: str, base: str | None,
          grid_items: tuple[str, ...], out: Path | None, backend: str,
          workers: int | None, partition: str | None, time_min: int, cpus: int,
          wait_s: float | None, overrides: tuple[str, ...]) -> None:
    import dataclasses

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
    loaded = dataclasses.replace(
        loaded, base=base or loaded.base, overrides={**loaded.overrides, **extra},
        grid={**loaded.grid, **sweeps.parse_grid(grid_items)})
    out = out or Path("runs") / f"sweep-{loaded.name}"

    def report(i: int, total: int, point: Any, result: dict[str, Any]) -> None:
        acc = result.get("final_probe_acc")
        click.echo(f"[{i}/{total}] {point.label}: {result.get('status')}"
                   + (f", final probe {100 * acc:.2f}%" if acc is not None else "")
                   + (f" ({result['error'].strip().splitlines()[-1]})"
                      if result.get("error") else ""), err=True)

    result = sweeps.run_sweep(loaded, out, backend=backend, workers=workers,
                              slurm={"partition": partition, "time_min": time_min,
                                     "cpus": cpus, "wait_s": wait_s}, progress=report)
    click.echo(f"{result['points']} points: {result['ran']} run, {result['skipped']} "
               "already finished")
    _print_sweep_table(result["table"], list(loaded.grid))
    click.echo(f"wrote {out / 'runs.csv'} and {out / 'table.csv'}")


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
@click.option("--start", "start_lr", type=float, default=1e-6, show_default=True)
@click.option("--end", "end_lr", type=float, default=1e6, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=None,
              help="Steps per curve (default 500 unless --epochs is given).")
@click.option("--epochs", type=float, default=None, help="Epochs per curve (paper: 5).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; "
              "several give a band.")
@click.option("--mode", type=click.Choice(["minibatch", "fixed", "full"]),
              default="minibatch", show_default=True,
              help="Fresh batches, one fixed batch, or full-batch gradient descent.")
@click.option("--supervised", type=click.Choice(["ce", "onehot_mse", "none"]), default="ce",
              show_default=True, help="The side-by-side supervised curve.")
@click.option("--cap", type=float, default=None, help="Stop a curve once its loss exceeds "
              "this (default: only non-finite values stop it).")
@click.argument("overrides", nargs=-1)
def lr_range(preset: str, out: Path | None, start_lr: float, end_lr: float,
             steps: int | None, epochs: float | None, seeds: str, mode: str,
             supervised: str, cap: float | None, overrides: tuple[str, ...]) -> None:
    from escapelab import lr_range as range_test
    from escapelab.config import load_config

    base = load_config(preset, overrides)
    options = range_test.RangeOptions(
        start_lr=start_lr, end_lr=end_lr, steps=steps if steps or epochs else 500,
        epochs=epochs, seeds=_int_list(seeds, "--seeds"), mode=mode,  # type: ignore[arg-type]
        supervised=None if supervised == "none" else supervised,  # type: ignore[arg-type]
        cap=cap)
    if out is None:
        out = Path("runs") / f"lr-range-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    payload = range_test.run_lr_range(base, out, options, progress=lambda c, s: click.echo(
        f"lr-range: {c} curve, seed {s}", err=True))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LR range test {start_lr:g} -> {end_lr:g} ({mode})", box=None)
    for col in ("curve", "departs at eta", "diverges at eta", "per seed (depart / diverge)"):
        table.add_column(col, justify="right" if col != "curve" else "left")
    for curve, info in payload["curves"].items():
        per_seed = "  ".join(f"s{k}: {_eta(v['depart_lr'])} / {_eta(v['diverge_lr'])}"
                             for k, v in info["seeds"].items())
        table.add_row(curve, _eta(info["depart_lr"]), _eta(info["diverge_lr"]), per_seed)
    Console(width=140).print(table)
    click.echo(f"wrote {out / range_test.CSV_FILE} and {out / range_test.JSON_FILE}")


def _eta(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise EscapelabError(f"{option} must be comma-separated integers, got {text!r}") \
            from None


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
@click.option("--split", type=click.Choice(["test", "train"]), default="test",
              show_default=True, help="Images the metrics are computed on.")
@click.option("--samples", type=click.IntRange(min=2), default=None,
              help="Stratified sample of the split (default: all of it; the paper: 10k).")
@click.option("--layers", default=None, help="Comma-separated tap names (default: all).")
@click.option("--checkpoints", default=None, help="Comma-separated, e.g. T,C,S "
              "(default: every saved checkpoint).")
@click.option("--center", is_flag=True, help="Centre features before spectra (the paper "
              "does not).")
@click.option("--dead", type=click.Choice(["position", "channel"]), default="position",
              show_default=True, help="A conv unit is a channel-and-position (the paper) "
              "or a whole channel.")
@click.option("--probe-samples", type=click.IntRange(min=2), default=5000,
              show_default=True, help="Training images the layerwise probes are fit on.")
@click.option("--no-probe", is_flag=True, help="Skip the layerwise probes.")
@click.option("--no-label-free", is_flag=True, help="Skip the k-means variant.")
@click.option("--device", default="auto", show_default=True)
@click.option("--memory-gb", type=float, default=2.0, show_default=True,
              help="Budget for the stored features of one group of taps.")
def analyze(run_dir: Path, split: str, samples: int | None, layers: str | None,
            checkpoints: str | None, center: bool, dead: str, probe_samples: int,
            no_probe: bool, no_label_free: bool, device: str, memory_gb: float) -> None:
    from escapelab import analyze as analysis

    options = analysis.AnalysisOptions(
        split=split,  # type: ignore[arg-type]
        samples=samples, center=center, dead=dead,  # type: ignore[arg-type]
        layers=tuple(layers.split(",")) if layers else None,
        checkpoints=tuple(checkpoints.split(",")) if checkpoints else None,
        probe=not no_probe, probe_samples=probe_samples, label_free=not no_label_free,
        device=device, memory_gb=memory_gb)
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("analyzing", total=None)
        result = analysis.analyze(run_dir, options, progress=lambda ckpt, tap: bar.update(
            task, description=f"checkpoint {ckpt}, layer {tap}"))
    _print_analysis(result)
    click.echo(f"wrote {run_dir / analysis.CSV_FILE} and {run_dir / analysis.JSON_FILE}")
    from escapelab.report import REPORT_FILE, write_report

    if (run_dir / REPORT_FILE).exists():  # keep the run's report in step with its data
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

    page = write_report(path)
    figures = sorted(p.stem for p in (path / "figures").glob("*.png"))
    click.echo(f"figures: {', '.join(figures) or 'none'}")
    click.echo(f"report: {page}")


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


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    s = summary
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
                  f"points; {s['wall_s']:.1f} s")
    console.print(f"run directory: {out}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("escapelab: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except EscapelabError as exc:
        click.echo(f"escapelab: error: {exc}", err=True)
        sys.exit(130 if type(exc).__name__ == "RunInterrupted" else 2)


if __name__ == "__main__":
    main()
