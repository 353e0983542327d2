"""The paper's study as one resumable plan, every part an ordinary escapelab folder.

A study plan (``escapelab/studies/<scale>.yaml``, or a YAML file of the same form) names
a base preset, overrides for every run, the seeds, and six parts::

    name: digits
    base: digits                     # the run preset every part starts from
    overrides: {}                    # applied to every run of every part
    seeds: [0, 1]                    # the sweeps' seed axis (a part may set its own)
    representative_lr: null          # default: the base preset's optim.lr
    parts:
      lr-range:    {overrides: {}, options: {steps: 500, seeds: [0, 1]}}   # Fig. 1a
      step-size:   {overrides: {}, grid: {optim.lr: [...]}}                # Fig. 1c
      batch-size:  {overrides: {}, grid: {data.batch_size: [..., full]}}   # Fig. 1d, 1b
      loss-warmup: {overrides: {}, grid: {loss.name: [...], schedule: [...]}, seeds: [0]}
      analyze:     {options: {}}     # Figs. 2, 3 on the representative runs
      finetune:    {options: {}}     # Sec. 4 from T, C, S of the first seed's run

Every part is composed from what exists: the LR range test (:mod:`escapelab.lr_range`)
and three sweeps (:mod:`escapelab.sweep`, grouped runs per process where ``sweep``
groups them, Slurm with ``backend="slurm"``), then ``analyze`` and ``finetune`` of the
*representative runs*: the step-size sweep's runs at ``representative_lr``, one per
seed. A scale that cannot afford a part at full size says so in its plan (e.g. a
stratified subset for full-batch gradient descent) rather than dropping it.

Layout of a study folder (:class:`escapelab.store.StudyDir`)::

    study.json              the resolved plan, each part's state and wall time
    lr-range/               an LR range test folder
    step-size/, batch-size/, loss-warmup/   sweep folders
    claims.json             every claim with its measured value, rule and verdict
    report.html, figures/   the study's report (claims first, then the figures)

``analyze`` and ``finetune`` write into the representative runs' own folders. A second
call with the same plan skips finished parts and runs, and resumes interrupted ones (the
sweeps' and runs' own guarantees); a folder holding a study of another plan is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from escapelab.config import (
    AnalysisOptions,
    Config,
    FinetuneOptions,
    RangeOptions,
    SlurmOptions,
)
from escapelab.errors import ConfigError, EscapelabError
from escapelab.store import RunDir, RunLock, StudyDir, SweepDir
from escapelab.sweep import Point, SweepSpec, expand

PARTS: tuple[str, ...] = ("lr-range", "step-size", "batch-size", "loss-warmup", "analyze",
                          "finetune")
SWEEP_PARTS: tuple[str, ...] = ("step-size", "batch-size", "loss-warmup")
# The axis each sweep part must vary (besides the seed): what its claims read.
SWEEP_AXES = {"step-size": "optim.lr", "batch-size": "data.batch_size",
              "loss-warmup": "loss.name"}


# ---------------------------------------------------------------------------------------
# Plans


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RangePart(_Part):
    overrides: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)


class SweepPart(_Part):
    overrides: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]]
    seeds: list[int] | None = None

    @field_validator("grid")
    @classmethod
    def _no_seed_axis(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if "seed" in grid:
            raise ValueError("give the seeds as `seeds:` (the plan's or the part's), "
                             "not as a grid axis")
        if any(not values for values in grid.values()):
            raise ValueError("every grid key needs a non-empty list of values")
        return grid


class OptionsPart(_Part):
    options: dict[str, Any] = Field(default_factory=dict)


class Parts(_Part):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    lr_range: RangePart = Field(alias="lr-range")
    step_size: SweepPart = Field(alias="step-size")
    batch_size: SweepPart = Field(alias="batch-size")
    loss_warmup: SweepPart = Field(alias="loss-warmup")
    analyze: OptionsPart
    finetune: OptionsPart


class StudyPlan(BaseModel):
    """One study at one scale; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(min_length=1)
    representative_lr: float | None = None
    parts: Parts

    def part(self, name: str) -> Any:
        return getattr(self.parts, name.replace("-", "_"))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def study_scale_names() -> list[str]:
    folder = resources.files("escapelab") / "studies"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_plan(source: str | Path) -> StudyPlan:
    """A study plan from a scale name (``escapelab/studies``) or a YAML file, validated
    whole: every run config of every part, every part's options, the representative
    step size (errors name the part)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"study plan {str(path)!r} not found")
        text = path.read_text()
    else:
        if str(source) not in study_scale_names():
            raise ConfigError(f"unknown study scale {str(source)!r}; allowed: "
                              f"{', '.join(study_scale_names())} (or a YAML file)")
        text = (resources.files("escapelab") / "studies" / f"{source}.yaml").read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"study plan {str(source)!r} is not valid YAML: {exc}") from None
    return validate_plan(raw, str(source))


def validate_plan(raw: Any, source: str = "study plan") -> StudyPlan:
    """`raw` (a parsed mapping) as a checked :class:`StudyPlan`."""
    try:
        plan = StudyPlan.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "plan"
        raise ConfigError(f"study plan {source!r}: {loc}: "
                          f"{err['msg'].removeprefix('Value error, ')}") from None
    try:
        for name in SWEEP_PARTS:
            axis = SWEEP_AXES[name]
            if axis not in plan.part(name).grid:
                raise ConfigError(f"the {name} part must vary {axis}")
            for point in expand(sweep_spec(plan, name)):
                _check_sizes(point)
        range_base(plan)
        for name, model in (("lr-range", RangeOptions), ("analyze", AnalysisOptions),
                            ("finetune", FinetuneOptions)):
            try:
                model.model_validate(plan.part(name).options)
            except ValidationError as exc:
                err = exc.errors()[0]
                raise ConfigError(f"{name} options: {'.'.join(map(str, err['loc']))}: "
                                  f"{err['msg'].removeprefix('Value error, ')}") from None
        if not representatives(plan):
            raise ConfigError(f"representative_lr {representative_lr(plan):g} is not a step "
                              "size of the step-size part")
    except ConfigError as exc:
        raise ConfigError(f"study plan {source!r}: {exc}") from None
    return plan


def _check_sizes(point: Point) -> None:
    """What the config alone cannot see but a plan can: probes asking for more training
    images than a subset keeps."""
    cfg = point.config
    value, subset = cfg.probe.train_samples, cfg.data.subset
    if subset is not None and value is not None and value > subset:
        raise ConfigError(f"sweep point {point.label}: probe.train_samples={value} exceeds "
                          f"data.subset={subset} (probes are fit on the training subset; "
                          "set probe.train_samples: null)")


def sweep_spec(plan: StudyPlan, name: str) -> SweepSpec:
    """The sweep of part `name`: the base preset, the plan's then the part's overrides,
    the part's grid and the seeds as the last axis."""
    part: SweepPart = plan.part(name)
    return SweepSpec(name=f"{plan.name}-{name}", base=plan.base,
                     overrides={**plan.overrides, **part.overrides},
                     grid={**part.grid, "seed": list(part.seeds or plan.seeds)})


def range_base(plan: StudyPlan) -> Config:
    """The LR range test's base config (its curves change the schedule and steps)."""
    part: RangePart = plan.parts.lr_range
    spec = SweepSpec(name=f"{plan.name}-lr-range", base=plan.base,
                     overrides={**plan.overrides, **part.overrides})
    return expand(spec)[0].config


def representative_lr(plan: StudyPlan) -> float:
    if plan.representative_lr is not None:
        return plan.representative_lr
    return expand(SweepSpec(name=plan.name, base=plan.base,
                            overrides=dict(plan.overrides)))[0].config.optim.lr


def representatives(plan: StudyPlan) -> list[Point]:
    """The step-size sweep's points at the representative step size, in seed order."""
    lr = representative_lr(plan)
    points = [p for p in expand(sweep_spec(plan, "step-size")) if p.config.optim.lr == lr]
    return sorted(points, key=lambda p: p.config.seed)


# ---------------------------------------------------------------------------------------
# Running

Say = Callable[[str], None]


def run_study(plan: StudyPlan, out: Path | str, *, parts: tuple[str, ...] | None = None,
              backend: str = "local", workers: int | None = None,
              slurm: SlurmOptions | None = None, group: bool = True,
              say: Say | None = None) -> dict[str, Any]:
    """Run every part of `plan` (or the named `parts`) into `out`, skipping what is
    finished, then evaluate the claims (claims.json) and write the report. Returns the
    study's state (study.json's payload) with the claims under ``"claims"``."""
    from escapelab.claims import evaluate_study

    say = say or (lambda _: None)
    chosen = tuple(parts) if parts else PARTS
    unknown = [p for p in chosen if p not in PARTS]
    if unknown:
        raise ConfigError(f"unknown study parts {unknown}; allowed: {', '.join(PARTS)}")
    folder = StudyDir(out)
    if folder.path.exists() and not folder.path.is_dir():
        raise EscapelabError(f"{folder.path} exists and is not a directory")
    earlier = folder.state() if folder.path.is_dir() else None
    if earlier is None and folder.path.is_dir() and any(folder.path.iterdir()):
        raise EscapelabError(f"{folder.path} is not empty and holds no study; choose "
                             "another --out")
    if earlier is not None and earlier.get("plan", {}).get("name") != plan.name:
        raise EscapelabError(f"{folder.path} holds a study of another scale "
                             f"({earlier.get('plan', {}).get('name')!r}); choose another "
                             "--out")
    folder.path.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder.path).acquire()
    try:
        state = earlier or {"plan": plan.dump(), "parts": {}}
        if state["plan"] != plan.dump():
            # The same scale's plan, edited (or from a newer escapelab): runs are keyed by
            # their config's hash, so unchanged points are reused and changed ones run
            # into new folders, as a re-launched sweep does; a changed part is no longer
            # done until it runs again.
            for name in changed_parts(state["plan"], plan.dump()):
                if name in state["parts"]:  # its wall time is that of the current plan
                    state["parts"][name] = {"state": "plan changed", "wall_s": 0.0}
            state["plan"] = plan.dump()
        state["parts"] = {name: state["parts"].get(name, {"state": "not run", "wall_s": 0.0})
                          for name in PARTS}
        folder.write_state(state)
        for name in chosen:
            say(f"study {plan.name}: {name}")
            t0 = time.perf_counter()
            try:
                outcome = _run_part(plan, folder, name, backend, workers, slurm, group, say)
            except EscapelabError as exc:  # one part failing never loses the others
                outcome = {"state": "failed", "message": str(exc)}
            entry = state["parts"][name]
            entry.update(outcome)
            entry["wall_s"] = float(entry.get("wall_s", 0.0)) + time.perf_counter() - t0
            folder.write_state(state)
        claims = evaluate_study(folder.path)
        folder.write_claims(claims)
        from escapelab.report import write_report

        write_report(folder.path)
        return {**state, "claims": claims}
    finally:
        lock.release()


def changed_parts(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The parts whose runs or results an edit of a plan (dumped) can change: all of them
    if the base, the shared overrides, the seeds or the representative step size changed;
    else each part whose own section changed, and analyze and finetune with step-size."""
    shared = ("base", "overrides", "seeds", "representative_lr")
    if any(before.get(k) != after.get(k) for k in shared):
        return list(PARTS)
    changed = [p for p in PARTS if before["parts"].get(p) != after["parts"].get(p)]
    if "step-size" in changed:
        changed += [p for p in ("analyze", "finetune") if p not in changed]
    return changed


def _run_part(plan: StudyPlan, folder: StudyDir, name: str, backend: str,
              workers: int | None, slurm: SlurmOptions | None, group: bool, say: Say,
              ) -> dict[str, Any]:
    if name == "lr-range":
        from escapelab.lr_range import run_lr_range

        options = RangeOptions.model_validate(plan.parts.lr_range.options)
        run_lr_range(range_base(plan), folder.part_path(name), options,
                     progress=lambda curve, seed: say(f"  lr-range: {curve} curve, seed "
                                                      f"{seed}"))
        return {"state": "done", "message": ""}
    if name in SWEEP_PARTS:
        from escapelab.sweep import run_sweep

        def told(i: int, total: int, point: Point, result: dict[str, Any]) -> None:
            say(f"  {name} [{i}/{total}] {point.label}: {result.get('status')}")

        run_sweep(sweep_spec(plan, name), folder.part_path(name), backend=backend,
                  workers=workers, slurm=slurm, progress=told, group=group)
        return _sweep_state(folder.part_path(name))
    runs = [(p, SweepDir(folder.part_path("step-size")).run(p.dirname))
            for p in representatives(plan)]
    if name == "analyze":
        from escapelab.analyze import analyze

        analysis = AnalysisOptions.model_validate(plan.parts.analyze.options)
        done = 0
        for point, run in runs:
            if not run.finished:
                continue
            earlier = run.analysis()
            if earlier is None or earlier.get("options") != analysis.model_dump(mode="json"):
                say(f"  analyze: {point.label}")
                analyze(run.path, analysis)
            done += 1
        return _count_state(done, len(runs), "representative runs analysed (a run of the "
                            "step-size part must finish first)")
    from escapelab.finetune import finetune

    tuning = FinetuneOptions.model_validate(plan.parts.finetune.options)
    point, run = runs[0]
    if not run.finished:
        return {"state": "incomplete", "message": f"the representative run {point.label} "
                "has not finished (the step-size part runs it)"}
    say(f"  finetune: {point.label}")
    finetune(run.path, tuning)
    return {"state": "done", "message": ""}


def _sweep_state(path: Path) -> dict[str, Any]:
    sweep = SweepDir(path)
    names = [p["run"] for p in sweep.meta()["points"]]
    ended = sum(1 for n in names if sweep.run(n).summary() is not None)
    return _count_state(ended, len(names), "runs finished")


def _count_state(done: int, total: int, what: str) -> dict[str, Any]:
    return {"state": "done" if done == total else "incomplete",
            "message": f"{done} of {total} {what}"}


def part_runs(plan: StudyPlan, out: Path | str, name: str) -> list[tuple[Point, RunDir]]:
    """The points of a sweep part with their run directories (which may not exist)."""
    sweep = SweepDir(StudyDir(out).part_path(name))
    return [(p, sweep.run(p.dirname)) for p in expand(sweep_spec(plan, name))]


def read_plan(out: Path | str) -> tuple[StudyPlan, dict[str, Any]]:
    """The plan and state of the study in `out`."""
    state = StudyDir(out).state()
    if state is None:
        raise EscapelabError(f"{out} holds no study (no study.json)")
    return validate_plan(state["plan"], str(out)), state
