"""The escape experiment: a student trained away from its frozen random teacher.

One explicit loop (paper Sec. 2, eq. 3): theta^(k) = theta^(k-1) - eta_k * grad L on
batch k, with plain SGD. Step k's record holds the loss and the norm of the full
(accumulated) gradient at theta^(k-1) on batch k, the step size eta_k, and
||theta^(k) - theta_T|| after the update. The evaluation "at step k" measures theta^(k);
step 0 is the student's initialization.

A non-finite loss or gradient stops the run before the update is applied: the run
ends as ``diverged`` with every record, the last finite weights (as checkpoint S) and a
summary. SIGINT/SIGTERM stop the run cleanly after the current step with a resumable
checkpoint and no summary (``escapelab run --resume DIR`` continues it).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from escapelab.config import Config, Derived, derive, dump_yaml
from escapelab.data import Dataset, load_dataset
from escapelab.errors import EscapelabError, RunDirError
from escapelab.init import distance, make_teacher_student, offset_stats
from escapelab.losses import LossFn, make_loss
from escapelab.models import EscapeNet, build_model
from escapelab.probe import Evaluator, extract
from escapelab.schedules import lr_at
from escapelab.store import EVALS_FILE, STEPS_FILE, RunDir, environment

Progress = Callable[[int, int, dict[str, Any]], None]


class RunInterrupted(EscapelabError):
    """The run was stopped by a signal; it can be resumed."""


# ---------------------------------------------------------------------------------------
# Small helpers of the loop


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torch.distributed job (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """What torchrun's environment says, before joining the process group."""
        import os

        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on the CPU,
    NCCL on GPUs. Each rank computes the gradient of its shard of every batch."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


@contextmanager
def joined(ranks: Ranks) -> Iterator[None]:
    """Leave torchrun's process group cleanly at the end of a run: the ranks meet at a
    barrier (rank 0 finishes its writing first), then every rank destroys the group.
    A rank that exits while its peers still hold gloo connections can be aborted by
    gloo's background threads. On an exception the group is destroyed without waiting."""
    if ranks.world == 1:
        yield
        return
    import torch.distributed as dist

    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per torchrun rank
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EscapelabError(f"device={name} requested but no CUDA device is available "
                             "(use device=cpu or device=auto)")
    return device


def flushing_denormals() -> bool:
    """Whether the CPU currently flushes denormal floats to zero (there is no getter)."""
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    return float((tiny * 1.0)[0]) == 0.0


@contextmanager
def denormals_flushed(enabled: bool) -> Iterator[None]:
    """Flush denormals to zero inside the block only (a process-wide CPU flag)."""
    if not enabled:
        yield
        return
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def setup_torch(cfg: Config) -> torch.device:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return resolve_device(cfg.device)


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
                        ranks: Ranks = Ranks()) -> Tensor:
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
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64)
             for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


@dataclass
class Tracker:
    """Escape and collapse bookkeeping (saved with resumable checkpoints)."""

    escape_step: int | None = None
    collapse_step: int | None = None
    collapse_score: float | None = None  # lower is "more collapsed"
    wall_before: float = 0.0  # seconds spent in earlier (resumed) processes


def collapse_score(criterion: str, record: dict[str, Any]) -> float | None:
    """The quantity whose minimum defines checkpoint C, from an evaluation record."""
    key = {"min_erank": "erank", "min_probe": "probe_acc", "max_loss": "loss"}[criterion]
    value = record.get(key)
    if value is None or not math.isfinite(value):
        return None
    return -value if criterion == "max_loss" else value


@contextmanager
def stop_requests() -> Iterator[dict[str, bool]]:
    """Turn the first SIGINT/SIGTERM into a flag the loop checks between steps."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:  # second signal: stop hard
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------
# The run


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
    device: torch.device
    ranks: Ranks


def build(cfg: Config) -> Setup:
    """Data, teacher, student, loss and evaluator for `cfg` (no training)."""
    device = setup_torch(cfg)
    ranks = init_ranks(device)
    dtype = getattr(torch, cfg.dtype)
    data_cpu = load_dataset(cfg.data)
    derived = derive(cfg, n_train=len(data_cpu.y_train), n_test=len(data_cpu.y_test),
                     num_classes=data_cpu.num_classes, input_shape=data_cpu.input_shape,
                     device=str(device))
    data = data_cpu.to(device, dtype)
    template = build_model(cfg.model, data.input_shape, derived.head_dim)
    teacher, student = make_teacher_student(template, cfg.init, derived.teacher_seed,
                                            derived.student_seed, dtype, device)
    loss_fn = make_loss(cfg.loss)
    evaluator = Evaluator.build(data, cfg.probe, loss_fn, derived.probe_seed)
    targets: Tensor | None = None  # None: the teacher sees each micro-batch (see below)
    if cfg.loss.supervised:
        targets = data.y_train
    elif cfg.train.cache_teacher and not cfg.model.batch_norm:
        targets = extract(teacher, data.x_train, cfg.probe.eval_batch_size)[1]
    # The probe's loss is computed with the same extraction chunks for teacher and
    # student, so both see identically shaped batches.
    x_probe = data.x_train[evaluator.train_idx]
    evaluator.set_targets(data.y_train[evaluator.train_idx] if cfg.loss.supervised
                          else extract(teacher, x_probe, cfg.probe.eval_batch_size)[1])
    return Setup(cfg, derived, data, teacher, student, template, loss_fn, targets, evaluator,
                 device, ranks)


def train(cfg: Config, out: Path | str, *, overwrite: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:
    """Run the escape experiment described by `cfg` into the run directory `out`.

    Returns the summary (also written to ``out/summary.json``). Raises
    :class:`RunInterrupted` if stopped by a signal (the run can be resumed).
    """
    if Ranks.from_env().main:
        RunDir.ensure_free(out, overwrite)
    setup = build(cfg)  # before anything is written: a bad set-up leaves no run behind
    with joined(setup.ranks):
        return _start(cfg, out, setup, overwrite, progress)


def _start(cfg: Config, out: Path | str, setup: Setup, overwrite: bool,
           progress: Progress | None) -> dict[str, Any]:
    if not setup.ranks.main:  # under torch.distributed only rank 0 writes
        return _loop(RunDir(out), setup, start=0, tracker=Tracker(), progress=None)
    run = RunDir.create(out, overwrite=overwrite)
    run.write_text("config.yaml", dump_yaml(cfg))
    run.write_json("derived.json", setup.derived.model_dump(mode="json"))
    run.write_json("environment.json", environment(setup.device))
    run.write_json("init.json", offset_stats(setup.teacher, setup.student, setup.template,
                                             cfg.init, setup.derived.student_seed))
    teacher_record = {"model": "teacher", "step": 0, **setup.evaluator(setup.teacher)}
    run.append_jsonl(EVALS_FILE, [teacher_record])
    run.save_checkpoint("T", setup.teacher.state_dict(),
                        {"step": None, "kind": "teacher", "arch": cfg.model.name,
                         "metrics": teacher_record})
    return _loop(run, setup, start=0, tracker=Tracker(), progress=progress)


def finished_summary(cfg: Config, out: Path | str) -> dict[str, Any] | None:
    """The summary of a finished run of exactly `cfg` in `out`, or None (absent,
    unfinished, or another config): lets sweeps skip work already done."""
    run = RunDir(out)
    if not run.finished or not (run.path / "config.yaml").is_file():
        return None
    if (run.path / "config.yaml").read_text() != dump_yaml(cfg):
        return None
    summary: dict[str, Any] = run.read_json("summary.json")
    return summary


def train_or_reuse(cfg: Config, out: Path | str, progress: Progress | None = None,
                   ) -> dict[str, Any]:
    """The summary of a run of exactly `cfg` in `out`: reused if finished, resumed if
    interrupted, otherwise trained anew (replacing whatever run is there)."""
    summary = finished_summary(cfg, out)
    if summary is not None:
        return summary
    run = RunDir(out)
    same = ((run.path / "config.yaml").is_file()
            and (run.path / "config.yaml").read_text() == dump_yaml(cfg))
    if same and run.checkpoint_path("last").exists():
        return resume(out, progress)
    return train(cfg, out, overwrite=True, progress=progress)


def resume(out: Path | str, progress: Progress | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its last resumable checkpoint."""
    from escapelab.config import load_config

    run = RunDir.open(out)
    if run.finished:
        raise RunDirError(f"{run.path} already finished ({run.status().get('status')}); "
                          "nothing to resume")
    if not run.checkpoint_path("last").exists():
        raise RunDirError(f"{run.path} has no resumable checkpoint (it stopped before the "
                          "first one); start it again with --overwrite")
    cfg = load_config(run.path / "config.yaml")
    setup = build(cfg)
    saved = run.read_json("derived.json")
    if saved != setup.derived.model_dump(mode="json"):
        raise RunDirError(f"{run.path}: the data or config no longer give the same derived "
                          "values as when the run started; cannot resume")
    tensors, meta = run.load_checkpoint("last")
    step = int(meta["step"])
    setup.student.load_state_dict({k[len("student."):]: v for k, v in tensors.items()
                                   if k.startswith("student.")})
    if setup.ranks.main:  # records after the checkpoint are recomputed
        run.truncate_jsonl(STEPS_FILE, lambda r: r["step"] <= step)
        run.truncate_jsonl(EVALS_FILE, lambda r: r["model"] == "teacher" or r["step"] <= step)
    tracker = Tracker(**meta["tracker"])
    with joined(setup.ranks):
        return _loop(run, setup, start=step, tracker=tracker, progress=progress,
                     state=tensors)


def _loop(run: RunDir, s: Setup, *, start: int, tracker: Tracker, progress: Progress | None,
          state: dict[str, Tensor] | None = None) -> dict[str, Any]:
    cfg, d = s.cfg, s.derived
    student, teacher = s.student, s.teacher
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                                weight_decay=cfg.optim.weight_decay)
    sampler = BatchSampler(d.n_train, d.batch_size, d.data_seed, s.device,
                           fixed=cfg.data.sampling == "fixed")
    if state is not None:
        sampler.load(state)
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if f"momentum.{i}" in state:
                    optimizer.state[p]["momentum_buffer"] = state[f"momentum.{i}"].to(p)
    eval_steps = set(d.eval_steps)
    extra_saves = set(cfg.checkpoint.steps)
    main = s.ranks.main  # under torch.distributed, rank 0 evaluates and writes
    pending: list[dict[str, Any]] = []  # step records not yet on disk
    t0 = time.perf_counter()
    last_probe: float | None = None

    def elapsed() -> float:
        return tracker.wall_before + time.perf_counter() - t0

    def flush() -> None:
        if not main:
            pending.clear()
        if pending:
            dists = torch.stack([r["dist_teacher"] for r in pending]).tolist()
            for r, dist in zip(pending, dists, strict=True):
                r["dist_teacher"] = dist
            run.append_jsonl(STEPS_FILE, pending)
            pending.clear()

    def evaluate(step: int) -> dict[str, Any]:
        nonlocal last_probe
        if not main:
            return {}
        record = {"model": "student", "step": step, **s.evaluator(student),
                  "wall_s": elapsed()}
        run.append_jsonl(EVALS_FILE, [record])
        last_probe = record["probe_acc"]
        score = collapse_score(cfg.checkpoint.collapse, record)
        if (tracker.escape_step is not None and step >= tracker.escape_step
                and score is not None
                and (tracker.collapse_score is None or score < tracker.collapse_score)):
            tracker.collapse_step, tracker.collapse_score = step, score
            save_student("C", step, "collapse", record)
        return record

    def save_student(name: str, step: int, kind: str, record: dict[str, Any] | None) -> None:
        if main:
            run.save_checkpoint(name, student.state_dict(),
                                {"step": step, "kind": kind, "arch": cfg.model.name,
                                 "metrics": record})

    def set_status(status: str, **fields: Any) -> None:
        if main:
            run.set_status(status, total_steps=d.total_steps, **fields)

    def save_resumable(step: int) -> None:
        flush()
        if not main:
            return
        tensors = {f"student.{k}": v for k, v in student.state_dict().items()}
        tensors.update(sampler.state())
        for i, p in enumerate(optimizer.param_groups[0]["params"]):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"momentum.{i}"] = buf
        snapshot = Tracker(**{**asdict(tracker), "wall_before": elapsed()})
        run.save_checkpoint("last", tensors, {"step": step, "kind": "resume",
                                              "tracker": asdict(snapshot)})
        set_status("running", step=step)

    def stop_now(flag: bool) -> bool:
        if s.ranks.world == 1:
            return flag
        import torch.distributed as dist

        agreed = torch.tensor([float(flag)], device=s.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(agreed.item())

    set_status("running", step=start)
    if start == 0:
        if 0 in eval_steps:
            evaluate(0)
        if 0 in extra_saves:
            save_student("step_0", 0, "step", None)

    status, reason, step_done = "completed", None, start
    params = list(student.parameters())
    with stop_requests() as stop, denormals_flushed(cfg.train.flush_denormal):
        for step in range(start + 1, d.total_steps + 1):
            if stop_now(stop["stop"]):
                save_resumable(step_done)
                set_status("interrupted", step=step_done)
                raise RunInterrupted(f"interrupted after step {step_done} of "
                                     f"{d.total_steps}; resume with: escapelab run "
                                     f"--resume {run.path}")
            lr = lr_at(step, d.total_steps, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = sampler.next()
            loss_t = accumulate_gradient(student, s.data.x_train, idx, s.targets, teacher,
                                         s.loss_fn, d.micro_batch_size, s.ranks)
            gnorm_t = grad_norm(student)
            loss, gnorm = torch.stack([loss_t.double(), gnorm_t]).tolist()
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                status, reason = "diverged", f"non-finite {what} at step {step}"
            elif cfg.train.max_loss is not None and loss > cfg.train.max_loss:
                status, reason = "capped", f"loss {loss:.3g} > train.max_loss at step {step}"
            else:  # the update is applied only to finite, uncapped steps
                if cfg.optim.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                optimizer.step()
                step_done = step
            pending.append({"step": step, "lr": lr, "loss": loss, "grad_norm": gnorm,
                            "dist_teacher": distance(student, teacher)})
            if status != "completed":
                break
            if (tracker.escape_step is None and not cfg.loss.supervised
                    and loss > cfg.train.escape_threshold):
                tracker.escape_step = step
            if len(pending) >= 200:
                flush()
            if step in eval_steps:
                flush()
                evaluate(step)
            if step in extra_saves:
                save_student(f"step_{step}", step, "step", None)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 \
                    and step < d.total_steps:
                save_resumable(step)
            if progress is not None:
                progress(step, d.total_steps, {"loss": loss, "grad_norm": gnorm, "lr": lr,
                                               "probe_acc": last_probe})
    flush()
    if not main:
        return {"status": status, "reason": reason, "rank": s.ranks.rank}

    # The final state S: theta^(T), or the last finite weights of a diverged run.
    evals = [r for r in run.read_jsonl(EVALS_FILE) if r["model"] == "student"]
    final = next((r for r in evals if r["step"] == step_done), None)
    if final is None:
        final = evaluate(step_done)
        evals.append(final)
    save_student("S", step_done, {"completed": "final", "capped": "last_below_cap"}.get(
        status, "last_finite"), final)
    summary = summarize(run, s, evals, tracker, status, reason, step_done, elapsed())
    run.checkpoint_path("last").unlink(missing_ok=True)
    run.checkpoint_path("last").with_suffix(".json").unlink(missing_ok=True)
    set_status(status, step=step_done, reason=reason)
    run.write_json("summary.json", summary)  # last: its presence marks a finished run
    return summary


def summarize(run: RunDir, s: Setup, evals: list[dict[str, Any]], tracker: Tracker,
              status: str, reason: str | None, final_step: int, wall_s: float,
              ) -> dict[str, Any]:
    """The run's headline numbers (accuracies are fractions in [0, 1])."""
    teacher = next(r for r in run.read_jsonl(EVALS_FILE) if r["model"] == "teacher")
    final = next(r for r in evals if r["step"] == final_step)
    probed = [r for r in evals if r.get("probe_acc") is not None]
    lowest = min(probed, key=lambda r: (r["probe_acc"], r["step"])) if probed else None
    collapse = next((r for r in evals if r["step"] == tracker.collapse_step), None)

    def get(record: dict[str, Any] | None, key: str) -> Any:
        return None if record is None else record.get(key)

    gain = (final["probe_acc"] - teacher["probe_acc"]
            if final.get("probe_acc") is not None and teacher.get("probe_acc") is not None
            else None)
    init = run.read_json("init.json")
    return {
        "status": status,
        "reason": reason,
        "steps_completed": final_step,
        "total_steps": s.derived.total_steps,
        "teacher_probe_acc": teacher["probe_acc"],
        "final_probe_acc": final["probe_acc"],
        "gain": gain,
        "min_probe_acc": get(lowest, "probe_acc"),
        "min_probe_acc_step": get(lowest, "step"),
        "teacher_knn_acc": teacher["knn_acc"],
        "final_knn_acc": final["knn_acc"],
        "escape_step": tracker.escape_step,
        "collapse_step": tracker.collapse_step,
        "collapse_criterion": s.cfg.checkpoint.collapse,
        "probe_acc_collapse": get(collapse, "probe_acc"),
        "erank_teacher": teacher["erank"],
        "erank_collapse": get(collapse, "erank"),
        "erank_final": final["erank"],
        "dead_frac_teacher": teacher["dead_frac"],
        "dead_frac_collapse": get(collapse, "dead_frac"),
        "dead_frac_final": final["dead_frac"],
        "loss_init": get(next((r for r in evals if r["step"] == 0), None), "loss"),
        "loss_final": get(final, "loss"),
        "offset_realized": init["offset_realized"],
        "offset_ratio": init["offset_ratio"],
        "changed_frac": init["changed_frac"],
        "wall_s": wall_s,
    }
