"""Sweeps: a grid over config keys, one run directory per configuration.

A sweep spec (YAML, or built from the command line) names a base preset, fixed
overrides and a grid::

    name: step-size
    base: digits
    overrides: {train.steps: 3000}
    grid:
      optim.lr: [1.0e+2, 1.0e+3, 1.0e+4]
      schedule:                       # a compound axis: each value sets several keys
        - {label: constant, schedule.name: constant}
        - {label: warmup, schedule.name: linear_warmup, schedule.warmup_steps: 100}
      seed: [0, 1, 2]
    paper:                            # optional: the same sweep at another scale
      base: cifar10-vgg11
      grid: {optim.lr: [32, 3162, 1.0e+4, 1.0e+5], seed: [0]}

The top level is the ``digits`` scale; each other scale of :data:`SCALES` is an optional
section with the same keys, merged over the top level (its overrides and grid axes
replace the top level's, key by key). ``escapelab sweep --scale NAME`` picks one.

Every point runs into ``OUT/runs/<label>-<hash>``, the hash being that of the resolved
config, so that re-launching skips finished runs and resumes interrupted ones. A
failed or diverged run never stops the others. ``runs.csv`` has one row per run,
``table.csv`` the mean and std over seeds, each with a phase label
(:func:`escapelab.phases.phase`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from escapelab.cluster import SlurmOptions
from escapelab.config import (
    Config,
    build_config,
    config_to_dict,
    did_you_mean,
    merge,
    parse_overrides,
    read_preset,
)
from escapelab.errors import ConfigError, EscapelabError
from escapelab.phases import phase
from escapelab.store import SweepDir

SUMMARY_FIELDS = ("status", "teacher_probe_acc", "min_probe_acc", "final_probe_acc", "gain",
                  "collapse_depth", "escape_step", "collapse_step", "erank_teacher",
                  "erank_collapse", "erank_final", "erank_drop", "recovery_step",
                  "oscillation_onset", "lambda0", "eta_lambda0", "lambda_final",
                  "steps_completed", "wall_s")
AGGREGATED = ("teacher_probe_acc", "min_probe_acc", "final_probe_acc", "gain",
              "collapse_depth", "escape_step", "erank_collapse", "erank_final", "erank_drop",
              "recovery_step", "oscillation_onset", "lambda0", "eta_lambda0")


# ---------------------------------------------------------------------------------------
# Specs and points


class _SpecPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    base: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in grid.items() if not v]
        if empty:
            raise ValueError(f"every grid key needs a non-empty list of values: {empty}")
        return grid


# The scales a sweep spec can describe: the top level of a spec is `digits` (CPU,
# minutes); every other scale is an optional section of the same form (base, overrides,
# grid): `fashion-mnist` (real 28x28 images, CPU, minutes per run), `paper` (CIFAR-10 /
# VGG11, a GPU per run). The CLI's --scale choices spell out these names (a test keeps
# them in step) so that `escapelab --help` need not import this module and torch.
SCALES: tuple[str, ...] = ("digits", "fashion-mnist", "paper")


class SweepSpec(BaseModel):
    """One sweep, resolved for one scale."""

    model_config = ConfigDict(frozen=True)

    name: str
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    def replace(self, **changes: Any) -> SweepSpec:
        return self.model_copy(update=changes)


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep."""

    label: str
    values: dict[str, Any]  # axis -> the value's label
    config: Config

    @property
    def key(self) -> str:
        text = json.dumps(config_to_dict(self.config), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.key}"


def sweep_preset_names() -> list[str]:
    folder = resources.files("escapelab") / "sweeps"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_spec(source: str | Path, scale: str = "digits") -> SweepSpec:
    """A sweep spec from a preset name (``escapelab/sweeps``) or a YAML file, resolved for
    `scale` (one of :data:`SCALES`): the top level for ``digits``, else that scale's
    section merged over the top level. Every scale the spec has is validated, config keys
    included, whichever is asked for."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; allowed: {', '.join(SCALES)}")
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"sweep spec {str(path)!r} not found")
        text, default_name = path.read_text(), path.stem
    else:
        if str(source) not in sweep_preset_names():
            raise ConfigError(f"unknown sweep preset {str(source)!r}; allowed: "
                              f"{', '.join(sweep_preset_names())} (or a YAML file)")
        text = (resources.files("escapelab") / "sweeps" / f"{source}.yaml").read_text()
        default_name = str(source)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep spec {str(source)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("a sweep spec is a mapping with base, overrides and grid")
    sections = {name: raw.pop(name) for name in SCALES if name != "digits" and name in raw}
    top = _spec_part(raw, source, (), [*_SpecPart.model_fields,
                                       *(name for name in SCALES if name != "digits")])
    digits = SweepSpec(name=top.name or default_name, base=top.base or "digits",
                       overrides=top.overrides, grid=top.grid)
    variants = {"digits": digits}
    for name, section in sections.items():
        if section is None:  # `paper:` with nothing under it: no such section
            continue
        part = _spec_part(section, source, (name,), list(_SpecPart.model_fields))
        variants[name] = SweepSpec(
            name=part.name or digits.name, base=part.base or digits.base,
            overrides={**top.overrides, **part.overrides}, grid={**top.grid, **part.grid})
    for name, variant in variants.items():  # every config key of every scale, now
        try:
            expand(variant)
        except ConfigError as exc:
            raise ConfigError(f"sweep spec {str(source)!r} ({name} scale): {exc}") from None
    if scale not in variants:
        raise ConfigError(f"sweep {default_name!r} has no {scale} section; it has: "
                          f"{', '.join(variants)}")
    return variants[scale]


def _spec_part(raw: Any, source: str | Path, where: tuple[str, ...],
               allowed: list[str]) -> _SpecPart:
    """Validate one level of a spec (the top level or a scale's section); errors name
    the dotted place and suggest the closest allowed key."""
    try:
        return _SpecPart.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = (*where, *(str(p) for p in err["loc"]))
        hint = ""
        if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            hint = did_you_mean(str(err["loc"][-1]), allowed)
        raise ConfigError(f"sweep spec {str(source)!r}: {'.'.join(loc) or 'spec'}: "
                          f"{err['msg'].removeprefix('Value error, ')}{hint}") from None


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["optim.lr=1e2,1e4", "seed=0,1"]`` -> {"optim.lr": [100.0, 10000.0], ...}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2,...")
        grid[key.strip()] = [parse_overrides([f"x={v}"])["x"] for v in values.split(",")]
    return grid


def _short(key: str) -> str:
    return {"optim.lr": "lr", "data.batch_size": "bs", "loss.name": "loss"}.get(
        key, key.rsplit(".", 1)[-1])


def _label_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def expand(spec: SweepSpec) -> list[Point]:
    """Every point of the grid, with its validated config (errors name the point)."""
    base = read_preset(spec.base)
    fixed = parse_overrides([f"{k}={_as_text(v)}" for k, v in spec.overrides.items()])
    axes = list(spec.grid.items())
    points = []
    for combo in itertools.product(*[values for _, values in axes]):
        tree = merge(base, fixed)
        values: dict[str, Any] = {}
        for (axis, _), value in zip(axes, combo, strict=True):
            if isinstance(value, dict):
                sets = {k: v for k, v in value.items() if k != "label"}
                values[axis] = value.get("label", ",".join(f"{_short(k)}={_label_value(v)}"
                                                           for k, v in sets.items()))
                tree = merge(tree, parse_overrides([f"{k}={_as_text(v)}"
                                                    for k, v in sets.items()]))
            else:
                values[axis] = _label_value(value)
                tree = merge(tree, parse_overrides([f"{axis}={_as_text(value)}"]))
        label = "_".join(f"{_short(a)}={v}" for a, v in values.items()) or "run"
        try:
            cfg = build_config(tree)
        except ConfigError as exc:
            raise ConfigError(f"sweep point {label}: {exc}") from None
        points.append(Point(label=label.replace("/", "-"), values=values, config=cfg))
    return points


def _as_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


# ---------------------------------------------------------------------------------------
# Running


def run_point(config: dict[str, Any], run_dir: str, threads: int | None = None,
              ) -> dict[str, Any]:
    """Run (or resume) one point; never raises: a failure is returned and recorded.

    Module-level so that worker processes and cluster jobs can import it.
    """
    return run_points([config], [run_dir], threads)[0]


def run_points(configs: list[dict[str, Any]], run_dirs: list[str],
               threads: int | None = None) -> list[dict[str, Any]]:
    """Run (or resume) points in one process: one point alone, several as one group
    trained together (:mod:`escapelab.group`; they must share a group key and a start
    step). Never raises: each point's failure is returned and recorded in its sweep."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    cfgs = [build_config(c) for c in configs]
    paths = [Path(d) for d in run_dirs]
    outcomes: list[Any]
    try:
        if len(cfgs) == 1:
            from escapelab.train import train_or_reuse

            outcomes = [train_or_reuse(cfgs[0], paths[0])]
        else:
            from escapelab.group import train_group

            outcomes = list(train_group(cfgs, paths))
    except Exception as exc:  # a signal, or a failure of the whole group
        outcomes = [exc] * len(cfgs)
    return [_outcome(path, outcome) for path, outcome in zip(paths, outcomes, strict=True)]


def _outcome(path: Path, outcome: Any) -> dict[str, Any]:
    from escapelab.errors import RunInterrupted

    sweep = SweepDir(path.parent.parent)
    if isinstance(outcome, RunInterrupted):
        return {"status": "interrupted", "error": str(outcome)}
    if isinstance(outcome, Exception):  # a failed run must not stop the sweep
        message = str(outcome) if isinstance(outcome, EscapelabError) else "".join(
            traceback.format_exception(outcome))
        with contextlib.suppress(EscapelabError):  # e.g. the disk is full
            sweep.write_failure(path.name, message)
        return {"status": "failed", "error": message}
    sweep.clear_failure(path.name)
    return dict(outcome.model_dump())


Progress = Callable[[int, int, Point, dict[str, Any]], None]
Task = list[tuple[Point, Path]]  # points run in one process (several: one group)


def plan_tasks(todo: list[tuple[Point, Path]], workers: int, group: bool) -> list[Task]:
    """Points into tasks: with `group`, points of one group key and start step form one
    task (:mod:`escapelab.group`), halved while there are fewer tasks than workers so
    that no core idles; every other point is a task of its own."""
    if not group:
        return [[item] for item in todo]
    from escapelab.group import group_key, start_step

    groups: dict[tuple[str, int], Task] = {}
    tasks: list[Task] = []
    for point, path in todo:
        key, start = group_key(point.config), start_step(point.config, path)
        if key is None or start is None:
            tasks.append([(point, path)])
        else:
            groups.setdefault((key, start), []).append((point, path))
    tasks += list(groups.values())
    while len(tasks) < workers and max(len(t) for t in tasks) > 1:
        largest = max(tasks, key=len)
        tasks.remove(largest)
        tasks += [largest[0::2], largest[1::2]]
    return tasks


def run_local(tasks: list[Task], workers: int | None, progress: Progress | None) -> None:
    """Worker processes (spawned) with the CPU cores split between them."""
    import concurrent.futures as futures
    import multiprocessing

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(tasks)))
    threads = max(1, cores // workers)
    total, finished = sum(len(t) for t in tasks), 0

    def told(task: Task, results: list[dict[str, Any]]) -> None:
        nonlocal finished
        for (point, _), result in zip(task, results, strict=True):
            finished += 1
            if progress is not None:
                progress(finished, total, point, result)

    def args(task: Task) -> tuple[list[dict[str, Any]], list[str], int]:
        return [config_to_dict(p.config) for p, _ in task], [str(d) for _, d in task], threads

    if workers == 1:
        for task in tasks:
            told(task, run_points(*args(task)))
        return
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        jobs = {pool.submit(run_points, *args(t)): t for t in tasks}
        for job in futures.as_completed(jobs):
            try:
                results = job.result()
            except Exception as exc:  # a worker that died (e.g. out of memory)
                results = [{"status": "failed", "error": f"worker died: {exc}"}] * len(jobs[job])
            told(jobs[job], results)


def run_sweep(spec: SweepSpec, out: Path | str, *, backend: str = "local",
              workers: int | None = None, slurm: SlurmOptions | None = None,
              progress: Progress | None = None, group: bool = True) -> dict[str, Any]:
    """Run every point not yet finished, then aggregate into runs.csv and table.csv.
    With `group` (local backend), points that can be trained together are
    (:func:`plan_tasks`)."""
    sweep = SweepDir(out)
    points = expand(spec)
    labels = [p.dirname for p in points]
    if len(set(labels)) != len(labels):
        raise ConfigError("two sweep points resolve to the same config")
    sweep.write_meta({
        "name": spec.name, "base": spec.base, "overrides": spec.overrides,
        "grid": spec.grid, "axes": list(spec.grid),
        "points": [{"run": p.dirname, "values": p.values} for p in points]})
    tasks = []
    from escapelab.train import finished_summary

    for p in points:
        if finished_summary(p.config, sweep.run_path(p.dirname)) is None:
            tasks.append((p, sweep.run_path(p.dirname)))
    skipped = len(points) - len(tasks)
    if tasks:
        if backend == "local":
            run_local(plan_tasks(tasks, workers or os.cpu_count() or 1, group), workers,
                      progress)
        elif backend == "slurm":
            from escapelab.cluster import run_slurm

            run_slurm(tasks, sweep, slurm or SlurmOptions(), progress)
        else:
            raise ConfigError(f"unknown backend {backend!r}; allowed: local, slurm")
    table = aggregate(out)
    return {"points": len(points), "skipped": skipped, "ran": len(tasks), "table": table}


# ---------------------------------------------------------------------------------------
# Phases and aggregation


def aggregate(out: Path | str) -> list[dict[str, Any]]:
    """Write ``runs.csv`` (one row per run) and ``table.csv`` (mean/std over seeds)."""
    sweep = SweepDir(out)
    meta = sweep.meta()
    axes: list[str] = meta["axes"]
    rows = []
    for point in meta["points"]:
        run = sweep.run(point["run"])
        finished = run.summary()
        failure = sweep.failure(point["run"])
        if finished is not None:
            summary = finished.model_dump()
        elif failure is not None:
            summary = failure
        elif run.path.is_dir():  # unfinished: running, dead, interrupted, failed
            state = run.status()
            text = run.state_text()
            summary = {"status": "dead" if text.startswith("dead") else
                       state.status if state else "missing", "error": text}
        else:
            summary = {"status": "missing"}
        if summary.get("teacher_probe_acc") is not None and summary.get("min_probe_acc") \
                is not None:
            summary["collapse_depth"] = summary["teacher_probe_acc"] - summary["min_probe_acc"]
        row = {"run": point["run"], **{a: point["values"][a] for a in axes}}
        row.update({k: summary.get(k) for k in SUMMARY_FIELDS})
        row["phase"] = phase(summary)
        row["error"] = (summary.get("error") or "").strip().splitlines()[-1:] or [""]
        row["error"] = row["error"][0]
        rows.append(row)
    group_axes = [a for a in axes if a != "seed"]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[a] for a in group_axes), []).append(row)
    table = []
    for values, members in groups.items():
        entry: dict[str, Any] = dict(zip(group_axes, values, strict=True))
        entry["runs"] = len(members)
        phases = [m["phase"] for m in members]
        entry["phase"] = max(set(phases), key=lambda p: (phases.count(p), p))
        entry["phases"] = " ".join(f"{p}:{phases.count(p)}" for p in sorted(set(phases)))
        for key in AGGREGATED:
            nums = [m[key] for m in members if isinstance(m[key], int | float)
                    and math.isfinite(m[key])]
            entry[f"{key}_mean"] = float(np.mean(nums)) if nums else None
            entry[f"{key}_std"] = float(np.std(nums)) if len(nums) > 1 else (0.0 if nums
                                                                               else None)
        table.append(entry)
    sweep.write_tables(_csv_text(rows), _csv_text(table))
    return table


def _csv_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buffer.getvalue()
