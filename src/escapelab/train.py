"""The escape experiment: a student trained away from its frozen random teacher.

One explicit loop (paper Sec. 2, eq. 3): theta^(k) = theta^(k-1) - eta_k * grad L on
batch k, with plain SGD. Step k's record holds the loss and the norm of the full
(accumulated) gradient at theta^(k-1) on batch k, the step size eta_k, and
||theta^(k) - theta_T|| after the update. The evaluation "at step k" measures theta^(k);
step 0 is the student's initialization. Sharpness (the top Hessian eigenvalues of the
training loss, :mod:`escapelab.sharpness`) is measured at lambda_0 = the teacher before
the first step and, if enabled, at theta^(k) on its own schedule.

A non-finite loss or gradient stops the run before the update is applied: the run
ends as ``diverged`` with every record, the last finite weights (as checkpoint S) and a
summary. SIGINT/SIGTERM stop the run after the current step with a resumable
checkpoint and no summary (``escapelab run --resume DIR`` continues it); during
start-up they stop it at once. A resumable checkpoint is also written every
``checkpoint.every`` steps and every ``checkpoint.every_minutes``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from escapelab.config import Config, Derived, config_to_dict, derive
from escapelab.data import Dataset, load_dataset
from escapelab.errors import RunDirError, RunInterrupted
from escapelab.init import distance, make_teacher_student, offset_stats
from escapelab.loggers import make_logger, require
from escapelab.losses import LossFn, make_loss
from escapelab.models import EscapeNet, build_model
from escapelab.phases import timeline
from escapelab.probe import Evaluator, extract
from escapelab.recorder import NullRecorder, Recorder
from escapelab.runtime import (
    Ranks,
    StopSignals,
    denormals_flushed,
    init_ranks,
    joined,
    setup_torch,
)
from escapelab.schedules import lr_at
from escapelab.sharpness import Sharpness
from escapelab.store import (
    CONFIG_FILE,
    RESUME_CHECKPOINT,
    RunDir,
    Summary,
    config_changes,
    environment,
)

Progress = Callable[[int, int, dict[str, Any]], None]
SINGLE = Ranks()  # one process, no torchrun

__all__ = ["train", "resume", "train_or_reuse", "finished_summary", "build", "Setup",
           "RunInterrupted", "accumulate_gradient", "BatchSampler"]


# ---------------------------------------------------------------------------------------
# Small helpers of the loop


class BatchSampler:
    """Batches without replacement, reshuffled each epoch; the full batch is fixed, and
    so is a ``fixed`` batch (drawn once from the same generator).

    The permutation is drawn on the CPU (the same order on every device) and moved to
    the device once per epoch, so a step does no host work.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device,
                 fixed: bool = False) -> None:
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)
        self.fixed = fixed or batch_size >= n
        if self.fixed:
            order = torch.randperm(n, generator=self.generator) if batch_size < n \
                else torch.arange(n)
            self.perm = order[:batch_size].sort().values.to(device)
        else:
            self.perm = torch.arange(n, device=device)
        self.pos = 0 if self.fixed else n  # a shuffle on the first call

    def next(self) -> Tensor:
        if self.fixed:
            return self.perm
        if self.pos + self.batch_size > self.n:  # drop the incomplete last batch
            self.perm = torch.randperm(self.n, generator=self.generator).to(self.device)
            self.pos = 0
        idx = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state(self) -> dict[str, Tensor]:
        return {"sampler.rng": self.generator.get_state(), "sampler.perm": self.perm.cpu(),
                "sampler.pos": torch.tensor([self.pos])}

    def load(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["sampler.rng"])
        self.perm = state["sampler.perm"].to(self.device)
        self.pos = int(state["sampler.pos"][0])


def accumulate_gradient(model: EscapeNet, x: Tensor, idx: Tensor, targets: Tensor | None,
                        teacher: EscapeNet, loss_fn: LossFn, micro_batch: int,
                        ranks: Ranks = SINGLE) -> Tensor:
    """Leave in ``.grad`` the mean gradient of the loss over the batch ``x[idx]``.

    Micro-batches are weighted by their share of the batch, so the result equals the
    gradient of the whole batch at once (every loss is a mean of per-sample terms).
    Targets are labels or cached teacher outputs, or, when None, the teacher's outputs
    on the same micro-batch: identical batch shapes make the teacher's and student's
    float32 rounding identical, so that the only difference between their outputs is
    the parameter offset. Returns the batch's mean loss.

    Under torch.distributed each rank takes one contiguous shard of the batch and the
    weighted shard gradients are summed over ranks (all-reduce): exactly the batch's
    mean gradient, on every rank.
    """
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=x.dtype, device=x.device)
    mine = idx.tensor_split(ranks.world)[ranks.rank] if ranks.world > 1 else idx
    for chunk in mine.split(micro_batch):
        xb = x[chunk]
        if targets is not None:
            target = targets[chunk]
        else:
            with torch.no_grad():
                target = teacher(xb)
        loss = loss_fn(model(xb), target) * (len(chunk) / len(idx))
        loss.backward()
        total += loss.detach()
    if ranks.world > 1:
        import torch.distributed as dist

        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
        dist.all_reduce(total)
    return total


def grad_norm(model: torch.nn.Module) -> Tensor:
    """L2 norm of the full gradient, accumulated in float64 (gradients near the teacher
    are ~1e-20 and their squares underflow float32)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2,
                                                                    dtype=torch.float64)))


@dataclass
class Tracker:
    """Escape and collapse bookkeeping (saved with resumable checkpoints)."""

    escape_step: int | None = None
    collapse_step: int | None = None
    collapse_score: float | None = None  # lower is "more collapsed"
    wall_before: float = 0.0  # seconds spent in earlier (resumed) processes
    started: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def elapsed(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def saw_loss(self, step: int, loss: float, threshold: float) -> None:
        if self.escape_step is None and loss > threshold:
            self.escape_step = step

    def is_new_collapse(self, step: int, record: dict[str, Any] | None, criterion: str) -> bool:
        """Whether the evaluation at `step` is the most collapsed one after the escape."""
        score = collapse_score(criterion, record) if record is not None else None
        if (self.escape_step is None or step < self.escape_step or score is None
                or (self.collapse_score is not None and score >= self.collapse_score)):
            return False
        self.collapse_step, self.collapse_score = step, score
        return True

    def saved(self) -> dict[str, Any]:
        return {"escape_step": self.escape_step, "collapse_step": self.collapse_step,
                "collapse_score": self.collapse_score, "wall_before": self.elapsed()}


def collapse_score(criterion: str, record: dict[str, Any]) -> float | None:
    """The quantity whose minimum defines checkpoint C, from an evaluation record."""
    key = {"min_erank": "erank", "min_probe": "probe_acc", "max_loss": "loss"}[criterion]
    value = record.get(key)
    if value is None or not math.isfinite(value):
        return None
    return -value if criterion == "max_loss" else value


@dataclass
class TrainState:
    """What a resumed run needs besides the config: the student, the optimizer's
    momentum, the batch order, the tracker and the linear probe's warm start. Packed
    into the resumable checkpoint (tensors + JSON metadata) and unpacked from it, here
    and nowhere else."""

    step: int
    tracker: Tracker

    def pack(self, student: EscapeNet, sampler: BatchSampler,
             optimizer: torch.optim.Optimizer, cfg: Config, records: dict[str, int],
             evaluator: Evaluator) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
        tensors.update(sampler.state())
        tensors.update(evaluator.state())
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf
        meta = {"step": self.step, "kind": "resume", "tracker": self.tracker.saved(),
                "config": config_to_dict(cfg), "records": records}
        return tensors, meta

    @classmethod
    def unpack(cls, tensors: dict[str, Tensor], meta: dict[str, Any]) -> TrainState:
        known = {"escape_step", "collapse_step", "collapse_score", "wall_before"}
        tracker = Tracker(**{k: v for k, v in meta["tracker"].items() if k in known})
        return cls(step=int(meta["step"]), tracker=tracker)

    @staticmethod
    def restore(tensors: dict[str, Tensor], student: EscapeNet, sampler: BatchSampler,
                optimizer: torch.optim.Optimizer, evaluator: Evaluator,
                sharpness: Sharpness) -> None:
        student.load_state_dict({k[len("student."):]: v for k, v in tensors.items()
                                 if k.startswith("student.")})
        sampler.load(tensors)
        evaluator.load_state(tensors)  # the probe's warm start
        sharpness.load(tensors)  # the warm start of the next measurement
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            if f"momentum.{i}" in tensors:
                optimizer.state[p]["momentum_buffer"] = tensors[f"momentum.{i}"].to(p)


# ---------------------------------------------------------------------------------------
# Building a run


@dataclass
class Setup:
    """Everything built from the config before the first step."""

    cfg: Config
    derived: Derived
    data: Dataset
    teacher: EscapeNet
    student: EscapeNet
    template: EscapeNet
    loss_fn: LossFn
    targets: Tensor | None
    evaluator: Evaluator
    sharpness: Sharpness
    device: torch.device
    ranks: Ranks


def build(cfg: Config, data: Dataset | None = None) -> Setup:
    """Data, teacher, student, loss and evaluator for `cfg` (no training). `data`, if
    given, is ``cfg.data`` already loaded, shared by runs of one process (moved to the
    run's device and dtype if it is not there: then it is not copied)."""
    device = setup_torch(cfg.train.threads, cfg.train.deterministic, cfg.device,
                         cfg.train.tf32)
    ranks = init_ranks(device)
    dtype = getattr(torch, cfg.dtype)
    data_cpu = data if data is not None else load_dataset(cfg.data)
    derived = derive(cfg, n_train=len(data_cpu.y_train), n_test=len(data_cpu.y_test),
                     num_classes=data_cpu.num_classes, input_shape=data_cpu.input_shape,
                     device=str(device))
    data = data_cpu.to(device, dtype)
    template = build_model(cfg.model, data.input_shape, derived.head_dim)
    teacher, student = make_teacher_student(template, cfg.init, derived.teacher_seed,
                                            derived.student_seed, dtype, device)
    if cfg.train.channels_last:  # after the draw: the same numbers, another layout
        data = data.channels_last()
        for model in (teacher, student):
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_fn = make_loss(cfg.loss)
    evaluator = Evaluator.build(data, cfg.probe, loss_fn, derived.probe_seed)
    targets: Tensor | None = None  # None: the teacher sees each micro-batch (see below)
    if cfg.loss.supervised:
        targets = data.y_train
    elif cfg.train.cache_teacher and not cfg.model.batch_norm:
        targets = extract(teacher, data.x_train, cfg.probe.eval_batch_size)[1]
    # The probe's loss is computed with the same extraction chunks for teacher and
    # student, so both see identically shaped batches.
    teacher_features, teacher_out = extract(teacher, data.x_train[evaluator.train_idx],
                                            cfg.probe.eval_batch_size)
    evaluator.set_targets(data.y_train[evaluator.train_idx] if cfg.loss.supervised
                          else teacher_out)
    evaluator.set_teacher_features(teacher_features)
    # Batch statistics make the loss depend on the micro-batch: measure it as trained.
    chunk = derived.micro_batch_size if cfg.model.batch_norm else cfg.data.micro_batch_size
    sharpness = Sharpness.build(cfg.sharpness, loss_fn, cfg.loss.name, data.x_train,
                                data.y_train, targets, teacher, chunk, derived.sharpness_seed)
    return Setup(cfg, derived, data, teacher, student, template, loss_fn, targets, evaluator,
                 sharpness, device, ranks)


# ---------------------------------------------------------------------------------------
# Starting, resuming, reusing


def train(cfg: Config, out: Path | str, *, overwrite: bool = False,
          progress: Progress | None = None) -> Summary:
    """Run the escape experiment described by `cfg` into the run directory `out`.

    Returns the summary (also written to ``out/summary.json``). Raises
    :class:`RunInterrupted` if stopped by a signal (its folder says whether it can be
    resumed), :class:`RunDirError` if `out` is in the way, locked or unwritable.
    """
    main = Ranks.from_env().main
    signals = StopSignals()
    with signals.installed():
        run = _prepare(cfg, out, overwrite) if main else None
        setup = _build_for(run, cfg)
        with joined(setup.ranks):
            if run is None:
                return _loop(NullRecorder(setup.derived.total_steps), setup,
                             TrainState(0, Tracker()), signals, None)
            recorder = _recorder(run, setup)
            with _failures_recorded(recorder):
                _write_start(recorder, setup)
                return _loop(recorder, setup, TrainState(0, Tracker()), signals, progress)


def _build_for(run: _Prepared | None, cfg: Config, data: Dataset | None = None) -> Setup:
    """:func:`build`, leaving the locked folder as it was (or saying that a signal
    stopped the start-up) if the build fails."""
    try:
        return build(cfg, data)
    except RunInterrupted as exc:
        if run is not None:
            run.stopped(exc)
        raise
    except BaseException:
        if run is not None:
            run.undo()
        raise


def _recorder(run: _Prepared, setup: Setup) -> Recorder:
    """The recorder of a run starting anew (--overwrite: the old run goes only now)."""
    if not run.created:
        run.fresh.reset()
    return Recorder(run.fresh, setup.derived.total_steps, setup.evaluator, setup.sharpness)


@dataclass
class _Prepared:
    """A locked run directory before the build: `created` if it was made just now."""

    fresh: RunDir
    created: bool

    def undo(self) -> None:
        """A failed build leaves nothing behind in a folder made for it (and an old run
        that --overwrite would have replaced untouched)."""
        if self.created:
            self.fresh.remove()
        else:
            self.fresh.release()

    def stopped(self, exc: RunInterrupted) -> None:
        """A signal during start-up: say so in a folder made for this run."""
        if self.created:
            self.fresh.set_status("interrupted", reason=f"{exc} during start-up; nothing "
                                  "was computed: start it again with --overwrite")
        self.fresh.release()


def _prepare(cfg: Config, out: Path | str, overwrite: bool) -> _Prepared:
    """Lock the run directory and, if new, mark it `starting`, before the (possibly
    long) build: a second writer is refused and a signal leaves an honest status. A
    live logger whose package is missing is refused first, with the pip line."""
    require(cfg.logger.name)
    RunDir.check_free(out, overwrite)  # also: writable, before data and model are built
    created = RunDir(out).is_empty()
    run = RunDir.create(out) if created else RunDir.open(out).acquire()
    if created:
        run.write_config(cfg)
        run.set_status("starting")
    return _Prepared(run, created)


def _write_start(recorder: Recorder, s: Setup, note: dict[str, Any] | None = None) -> None:
    """The live logger, then config, derived values, environment (with `note`), offset,
    the teacher's evaluation, lambda_0 and T."""
    run, cfg = recorder.run, s.cfg
    recorder.mirror_to(make_logger(cfg, run))
    run.write_start(cfg, s.derived, {**environment(s.device), **(note or {})},
                    offset_stats(s.teacher, s.student, s.template, cfg.init,
                                 s.derived.student_seed))
    teacher_record = {"model": "teacher", "step": 0, **s.evaluator(s.teacher)}
    recorder.log_eval(teacher_record)
    recorder.measure_sharpness(s.teacher, 0, None, teacher=True)
    recorder.checkpoint("T", s.teacher.state_dict(),
                        {"step": None, "kind": "teacher", "arch": cfg.model.name,
                         "metrics": teacher_record})


class _failures_recorded:
    """On any error but a signal (handled in the loop), mark the run `failed` in
    status.json where the disk still allows, saying whether it can be resumed; in every
    case close the live logger and release the lock (once: :meth:`close` may come
    first, for one run of a group that fails while the others go on)."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.closed = False

    def __enter__(self) -> _failures_recorded:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        self.close(exc)

    def close(self, exc: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        run = self.recorder.run
        try:
            if exc is None or run.finished:
                return
            resumable = run.has_checkpoint(RESUME_CHECKPOINT)
            step = run.checkpoint_meta(RESUME_CHECKPOINT)["step"] if resumable else 0
            if isinstance(exc, RunInterrupted | KeyboardInterrupt):
                current = run.status()
                if current is None or current.status != "interrupted":
                    run.set_status("interrupted", step=step, resumable=resumable,
                                   total_steps=self.recorder.total_steps,
                                   reason=str(exc) or "interrupted")
            else:
                run.set_status("failed", step=step, resumable=resumable,
                               total_steps=self.recorder.total_steps,
                               reason=f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: S110 - the disk may be full: the first error is the one
            pass
        finally:
            self.recorder.close(failed=exc is not None)
            run.release()


def finished_summary(cfg: Config, out: Path | str) -> Summary | None:
    """The summary of a finished run of exactly `cfg` in `out`, or None (absent,
    unfinished, or another config): lets sweeps skip work already done."""
    run = RunDir(out)
    if not run.finished or not run.matches(cfg):
        return None
    return run.summary()


def train_or_reuse(cfg: Config, out: Path | str, progress: Progress | None = None,
                   ) -> Summary:
    """The summary of a run of exactly `cfg` in `out`: reused if finished, resumed if
    interrupted, otherwise trained anew (replacing whatever run is there)."""
    summary = finished_summary(cfg, out)
    if summary is not None:
        return summary
    run = RunDir(out)
    if run.matches(cfg) and run.has_checkpoint(RESUME_CHECKPOINT):
        return resume(out, progress)
    return train(cfg, out, overwrite=True, progress=progress)


def resume(out: Path | str, progress: Progress | None = None) -> Summary:
    """Continue an interrupted run from its last resumable checkpoint, after proving
    that its config is the one the run started with."""
    main = Ranks.from_env().main
    signals = StopSignals()
    with signals.installed():
        if not main:
            cfg, tensors, state = _resumable(RunDir.open(out))
            setup = build(cfg)
            with joined(setup.ranks):
                return _loop(NullRecorder(setup.derived.total_steps), setup, state, signals,
                             None, tensors)
        recorder, setup, state, tensors = _reopen(out)
        with joined(setup.ranks), _failures_recorded(recorder):
            _rewound(recorder, setup, state, tensors)
            return _loop(recorder, setup, state, signals, progress, tensors)


def _reopen(out: Path | str, data: Dataset | None = None,
            ) -> tuple[Recorder, Setup, TrainState, dict[str, Tensor]]:
    """Lock an interrupted run, prove its config unchanged and build it again."""
    run = RunDir.open(out)
    run.acquire()  # refuses a run another process is writing
    try:
        cfg, tensors, state = _resumable(run)
        require(cfg.logger.name)  # before data and model are built
        setup = build(cfg, data)
    except BaseException:
        run.release()
        raise
    return Recorder(run, setup.derived.total_steps, setup.evaluator,
                    setup.sharpness), setup, state, tensors


def _rewound(recorder: Recorder, setup: Setup, state: TrainState,
             tensors: dict[str, Tensor]) -> None:
    """Drop the records after the checkpoint and reopen the live logger there."""
    run = recorder.run
    # config_sha256 differs for a run started before a config key was added (see
    # _resumable); every value that follows from config and data must not
    if run.derived().model_copy(update={"config_sha256": setup.derived.config_sha256}) \
            != setup.derived:
        raise RunDirError(f"{run.path}: the data no longer give the same derived "
                          "values as when the run started; cannot resume")
    _rewind(run, state.step, tensors)
    recorder.mirror_to(make_logger(setup.cfg, run, resume_step=state.step))


def _resumable(run: RunDir) -> tuple[Config, dict[str, Tensor], TrainState]:
    if run.finished:
        raise RunDirError(f"{run.path} already finished ({run.state_text()}); nothing to "
                          "resume")
    if not run.has_checkpoint(RESUME_CHECKPOINT):
        raise RunDirError(f"{run.path} has no resumable checkpoint (it stopped before the "
                          "first one); start it again with --overwrite")
    cfg = run.config()
    tensors, meta = run.load_checkpoint(RESUME_CHECKPOINT)
    from escapelab.config import config_digest

    # The digest is that of config.yaml's text as written at the start: a file whose
    # text still has it is unedited, even if this version of escapelab re-dumps it with
    # keys added since (at their defaults, which keep the behaviour it started with).
    digest = run.derived().config_sha256
    unedited = hashlib.sha256(run.config_text().encode()).hexdigest() == digest
    if config_digest(cfg) != digest and not unedited:
        started = meta.get("config")
        changes = config_changes(started, config_to_dict(cfg)) if started else []
        raise RunDirError(f"{run.path / CONFIG_FILE} was edited since the run started"
                          + (f" ({'; '.join(changes)})" if changes else "")
                          + "; resume continues the same run only: restore it, or start a "
                          "new run with the new values")
    return cfg, tensors, TrainState.unpack(tensors, meta)


def _rewind(run: RunDir, step: int, tensors: dict[str, Tensor]) -> None:
    """Records after the checkpoint are recomputed; those before it must all be there."""
    meta = run.checkpoint_meta(RESUME_CHECKPOINT)
    kept = run.rewind(step)
    expected = meta.get("records") or {}
    for name, count in zip(("steps", "evals", "sharpness"), kept.values(), strict=True):
        if name in expected and count < expected[name]:
            import warnings

            from escapelab.store import RunDirWarning

            warnings.warn(f"{run.path}: {expected[name] - count} {name} record(s) up to step "
                          f"{step} were lost to damage (see the .damaged file)",
                          RunDirWarning, stacklevel=2)


# ---------------------------------------------------------------------------------------
# The loop


def _loop(rec: Recorder, s: Setup, state: TrainState, signals: StopSignals,
          progress: Progress | None, saved: dict[str, Tensor] | None = None) -> Summary:
    run = _Run(rec, s, state, saved, progress)
    with signals.deferring(), denormals_flushed(s.cfg.train.flush_denormal):
        for step in range(state.step + 1, s.derived.total_steps + 1):
            if s.ranks.any(signals.received is not None, s.device):
                break
            lr = run.lr(step)
            loss, gnorm = _sgd_step(s, run.optimizer, run.sampler.next(), lr)
            if not run.stepped(step, lr, loss, gnorm, distance(s.student, s.teacher)):
                break
    return run.end(signals.received)


class _Run:
    """One run's side of the training loop: its optimizer and batch order, and what
    follows each step (the step record, evaluations, sharpness, checkpoints). The
    sequential loop above and a group of runs trained together (:mod:`escapelab.group`)
    differ only in how the step itself is computed; `pull` brings the student's current
    weights into ``s.student`` before they are read (a group keeps them stacked)."""

    def __init__(self, rec: Recorder, s: Setup, state: TrainState,
                 saved: dict[str, Tensor] | None, progress: Progress | None = None,
                 pull: Callable[[], None] = lambda: None) -> None:
        cfg, plan = s.cfg, s.derived
        self.rec, self.s, self.tracker, self.progress, self.pull = (
            rec, s, state.tracker, progress, pull)
        s.student.train()
        self.optimizer = torch.optim.SGD(s.student.parameters(), lr=cfg.optim.lr,
                                         momentum=cfg.optim.momentum,
                                         nesterov=cfg.optim.nesterov,
                                         weight_decay=cfg.optim.weight_decay)
        self.sampler = BatchSampler(plan.n_train, plan.batch_size, plan.data_seed, s.device,
                                    fixed=cfg.data.sampling == "fixed")
        if saved is not None:
            TrainState.restore(saved, s.student, self.sampler, self.optimizer, s.evaluator,
                               s.sharpness)
        self.evals, self.saves = set(plan.eval_steps), set(cfg.checkpoint.steps)
        self.sharp = set(plan.sharpness_steps)
        self.status, self.done = "completed", state.step
        self.reason: str | None = None
        self.last_save, self.probe = time.monotonic(), None
        rec.status("running", step=state.step)
        if state.step == 0:
            _evaluate(rec, s, self.tracker, 0) if 0 in self.evals else None
            rec.measure_sharpness(s.student, 0, self.tracker.elapsed()) \
                if 0 in self.sharp else None
            _save_student(rec, s, "step_0", 0, "step", None) if 0 in self.saves else None

    def lr(self, step: int) -> float:
        cfg = self.s.cfg
        return lr_at(step, self.s.derived.total_steps, cfg.optim.lr, cfg.schedule)

    def stepped(self, step: int, lr: float, loss: float, gnorm: float, dist: Tensor,
                ) -> bool:
        """Record step `step` and what is due after it; False once the run stops."""
        rec, s, cfg, tracker = self.rec, self.s, self.s.cfg, self.tracker
        self.status, self.reason = _check(loss, gnorm, step, cfg.train.max_loss)
        if self.status == "completed":
            self.done = step
        rec.log_step({"step": step, "lr": lr, "loss": loss, "grad_norm": gnorm,
                      "dist_teacher": dist})
        if self.status != "completed":
            return False
        tracker.saw_loss(step, loss, math.inf if cfg.loss.supervised
                         else cfg.train.escape_threshold)
        if step in self.evals or step in self.sharp or step in self.saves:
            self.pull()
        if step in self.evals:
            record = _evaluate(rec, s, tracker, step)
            self.probe = record.get("probe_acc") if record else self.probe
        if step in self.sharp:
            rec.measure_sharpness(s.student, step, tracker.elapsed())
        if step in self.saves:
            _save_student(rec, s, f"step_{step}", step, "step", None)
        due = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or (
            cfg.checkpoint.every_minutes
            and time.monotonic() - self.last_save > 60 * cfg.checkpoint.every_minutes)
        if s.ranks.any(bool(due), s.device) and step < s.derived.total_steps:
            self.save_resumable(step)
            self.last_save = time.monotonic()
        if self.progress is not None:
            self.progress(step, s.derived.total_steps, {"loss": loss, "grad_norm": gnorm,
                                                        "lr": lr, "probe_acc": self.probe})
        return True

    def save_resumable(self, step: int) -> None:
        self.pull()
        _save_resumable(self.rec, self.s, TrainState(step, self.tracker), self.sampler,
                        self.optimizer)

    def end(self, signal: int | None) -> Summary:
        """The summary; or, stopped by `signal`, a resumable checkpoint and
        :class:`RunInterrupted`."""
        rec, plan = self.rec, self.s.derived
        rec.flush()
        if signal is not None:  # stopped between steps, or during the last one
            self.save_resumable(self.done)
            rec.status("interrupted", step=self.done, resumable=True,
                       reason=f"stopped by signal {signal}")
            raise RunInterrupted(f"interrupted after step {self.done} of "
                                 f"{plan.total_steps}; resume with: escapelab run --resume "
                                 f"{rec.path}", signal)
        self.pull()
        return _finish(rec, self.s, self.tracker, self.status, self.reason, self.done)


def _sgd_step(s: Setup, optimizer: torch.optim.Optimizer, idx: Tensor, lr: float,
              ) -> tuple[float, float]:
    """One plain SGD step on batch `idx` at step size `lr`; returns the loss and the
    full gradient's norm at the weights before the update (applied only if finite)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_t = accumulate_gradient(s.student, s.data.x_train, idx, s.targets, s.teacher,
                                 s.loss_fn, s.derived.micro_batch_size, s.ranks)
    loss, gnorm = torch.stack([loss_t.double(), grad_norm(s.student)]).tolist()
    if math.isfinite(loss) and math.isfinite(gnorm) and (
            s.cfg.train.max_loss is None or loss <= s.cfg.train.max_loss):
        if s.cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(s.student.parameters(), s.cfg.optim.grad_clip)
        optimizer.step()
    return loss, gnorm


def _check(loss: float, gnorm: float, step: int, cap: float | None) -> tuple[str, str | None]:
    """The run's status after a step: completed (so far), diverged or capped."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        what = "loss" if not math.isfinite(loss) else "gradient norm"
        return "diverged", f"non-finite {what} at step {step}"
    if cap is not None and loss > cap:
        return "capped", f"loss {loss:.3g} > train.max_loss at step {step}"
    return "completed", None


def _evaluate(rec: Recorder, s: Setup, tracker: Tracker, step: int) -> dict[str, Any] | None:
    """Probe the student; keep it as checkpoint C if it is the most collapsed so far."""
    record = rec.evaluate(s.student, step, tracker.elapsed())
    if tracker.is_new_collapse(step, record, s.cfg.checkpoint.collapse):
        _save_student(rec, s, "C", step, "collapse", record)
    return record


def _save_student(rec: Recorder, s: Setup, name: str, step: int, kind: str,
                  record: dict[str, Any] | None) -> None:
    rec.checkpoint(name, s.student.state_dict(), {"step": step, "kind": kind,
                                                  "arch": s.cfg.model.name, "metrics": record})


def _save_resumable(rec: Recorder, s: Setup, state: TrainState, sampler: BatchSampler,
                    optimizer: torch.optim.Optimizer) -> None:
    tensors, meta = state.pack(s.student, sampler, optimizer, s.cfg, rec.records_written(),
                               s.evaluator)
    tensors.update(s.sharpness.state())
    rec.checkpoint(RESUME_CHECKPOINT, tensors, meta)
    rec.status("running", step=state.step, resumable=True)


def _finish(rec: Recorder, s: Setup, tracker: Tracker, status: str, reason: str | None,
            done: int) -> Summary:
    """The final state S (theta^(T), or the last finite weights), the summary, and the
    status; summary.json goes last: its presence marks a finished run."""
    evals = [r for r in rec.evals() if r["model"] == "student"]
    final = next((r for r in evals if r["step"] == done), None)
    if final is None:
        final = rec.evaluate(s.student, done, tracker.elapsed())
        evals += [final] if final else []
    kind = {"completed": "final", "capped": "last_below_cap"}.get(status, "last_finite")
    _save_student(rec, s, "S", done, kind, final)
    if isinstance(rec, NullRecorder):
        return Summary(status=status, reason=reason, steps_completed=done,  # type: ignore[arg-type]
                       total_steps=s.derived.total_steps)
    summary = summarize(rec.run, s, evals, tracker, status, reason, done)
    rec.summary(summary)
    rec.drop_checkpoint(RESUME_CHECKPOINT)
    rec.status(status, step=done, reason=reason)  # type: ignore[arg-type]
    return summary


def summarize(run: RunDir, s: Setup, evals: list[dict[str, Any]], tracker: Tracker,
              status: str, reason: str | None, final_step: int) -> Summary:
    """The run's headline numbers (accuracies are fractions in [0, 1])."""
    teacher = run.teacher_eval() or {}
    final = next(r for r in evals if r["step"] == final_step)
    probed = [r for r in evals if r.get("probe_acc") is not None]
    lowest = min(probed, key=lambda r: (r["probe_acc"], r["step"])) if probed else {}
    collapse = next((r for r in evals if r["step"] == tracker.collapse_step), {})
    init = run.init()
    lambda0, top = _sharpness_numbers(run)
    gain = (final["probe_acc"] - teacher["probe_acc"]
            if final.get("probe_acc") is not None and teacher.get("probe_acc") is not None
            else None)
    summary = Summary(
        status=status,  # type: ignore[arg-type]
        reason=reason,
        steps_completed=final_step,
        total_steps=s.derived.total_steps,
        teacher_probe_acc=teacher.get("probe_acc"),
        final_probe_acc=final.get("probe_acc"),
        gain=gain,
        min_probe_acc=lowest.get("probe_acc"),
        min_probe_acc_step=lowest.get("step"),
        teacher_knn_acc=teacher.get("knn_acc"),
        final_knn_acc=final.get("knn_acc"),
        escape_step=tracker.escape_step,
        collapse_step=tracker.collapse_step,
        collapse_criterion=s.cfg.checkpoint.collapse,
        probe_acc_collapse=collapse.get("probe_acc"),
        erank_teacher=teacher.get("erank"),
        erank_collapse=collapse.get("erank"),
        erank_final=final.get("erank"),
        dead_frac_teacher=teacher.get("dead_frac"),
        dead_frac_collapse=collapse.get("dead_frac"),
        dead_frac_final=final.get("dead_frac"),
        loss_init=next((r for r in evals if r["step"] == 0), {}).get("loss"),
        loss_final=final.get("loss"),
        lambda0=lambda0,
        eta_lambda0=s.cfg.optim.lr * lambda0 if lambda0 is not None else None,
        lambda_max=max(top) if top else None,
        lambda_final=top[-1] if top else None,
        offset_realized=init.get("offset_realized"),
        offset_ratio=init.get("offset_ratio"),
        changed_frac=init.get("changed_frac"),
        wall_s=tracker.elapsed(),
    )
    timing = timeline(summary.model_dump(), run.steps(), evals,
                      [r.model_dump() for r in run.sharpness()])
    return summary.model_copy(update=timing.as_dict())


def _sharpness_numbers(run: RunDir) -> tuple[float | None, list[float]]:
    """(lambda_0 at the teacher, the student's finite top eigenvalues in step order)."""
    records = run.sharpness()
    teacher = next((r for r in records if r.model == "teacher"), None)
    top = [r.top for r in records if r.model == "student"]
    return (teacher.top if teacher is not None else None,
            [v for v in top if v is not None and math.isfinite(v)])
