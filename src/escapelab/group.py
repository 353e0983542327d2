"""Many runs per process: sweep points that differ only in step size, seed, offset or
schedule, trained in lockstep.

K students and their K teachers are stacked parameter by parameter
(:func:`torch.func.stack_module_state`) and one step of all of them is one call of the
model under :func:`torch.func.vmap` (:func:`torch.func.functional_call`), for the
teachers as for the students: float32 kernels round differently for different batch
shapes and layouts (~1e-7 relative), which would swamp a 1e-10 offset, so a teacher's
targets come from exactly the batched kernel its student is trained through. The
gradient of the sum of the K losses is each member's own gradient (the members share
no parameter); plain SGD then applies each member's own step size, and only to members
whose loss and gradient are finite (and below ``train.max_loss``).

Everything else is the sequential run's code (:class:`escapelab.train._Run`): each
member has its own run directory, locked, resumable, with the same records, checkpoints
and summary, evaluated and measured through its own unbatched modules, so that a
member's folder cannot be told from a sequential run's except by its float rounding
(`environment.json` says ``"group": K``). A member that diverges or fails stops alone;
a signal stops all with resumable checkpoints, each resumable alone or in a group.

What may differ inside a group is :data:`FREE_KEYS`; the rest of the config (model,
data, batch size, steps, dtype, evaluation schedule...) must be equal. Momentum, weight
decay, gradient clipping, a cached teacher, channels-last memory (which vmap cannot
query), torchrun and BatchNorm models are left to sequential runs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from escapelab.config import Config, config_to_dict
from escapelab.data import Dataset, load_dataset
from escapelab.errors import RunInterrupted
from escapelab.models import EscapeNet
from escapelab.runtime import Ranks, StopSignals, denormals_flushed, resolve_device
from escapelab.store import RESUME_CHECKPOINT, RunDir, Summary
from escapelab.train import (
    Progress,
    Setup,
    Tracker,
    TrainState,
    _build_for,
    _check,
    _failures_recorded,
    _prepare,
    _recorder,
    _reopen,
    _rewound,
    _Run,
    _write_start,
)

__all__ = ["FREE_KEYS", "group_key", "start_step", "train_group", "Stack"]

# Config keys that members of one group may set differently (dotted prefixes).
FREE_KEYS: tuple[str, ...] = ("seed", "optim.lr", "init.sigma_eps", "init.teacher_seed",
                              "init.rescale", "schedule", "name", "logger")

Result = Summary | BaseException


def group_key(cfg: Config) -> str | None:
    """What members of one group share (a JSON text), or None if `cfg` must run alone."""
    if (cfg.optim.momentum or cfg.optim.weight_decay or cfg.optim.grad_clip is not None
            or cfg.train.cache_teacher or cfg.train.channels_last or cfg.model.batch_norm
            or Ranks.from_env().world > 1):
        return None
    tree = config_to_dict(cfg)
    for key in FREE_KEYS:
        section, _, leaf = key.partition(".")
        if leaf:
            tree[section] = {k: v for k, v in tree[section].items() if k != leaf}
        else:
            tree.pop(section, None)
    return json.dumps(tree, sort_keys=True)


def start_step(cfg: Config, out: Path | str) -> int | None:
    """The step a run of `cfg` in `out` would start from: 0 (new, or replacing another
    run), the step of its resumable checkpoint, or None if it is finished."""
    run = RunDir(out)
    if not run.path.is_dir() or not run.matches(cfg):
        return 0
    if run.finished:
        return None
    if run.has_checkpoint(RESUME_CHECKPOINT):
        return int(run.checkpoint_meta(RESUME_CHECKPOINT)["step"])
    return 0


class Stack:
    """K models of one architecture as stacked parameters (K, ...) run through one
    vmapped functional call."""

    def __init__(self, models: Sequence[EscapeNet]) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(list(models))
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        base = copy.deepcopy(models[0]).to("meta")
        base.train(models[0].training)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, (p, b), (x,))

        self._forward = vmap(one)

    def __call__(self, x: Tensor) -> Tensor:
        """(K, B, C, H, W) -> (K, B, d_out)."""
        return self._forward(self.params, self.buffers, x)

    def puller(self, k: int, model: EscapeNet) -> Callable[[], None]:
        """A function that copies member k's current weights into `model`."""

        def pull() -> None:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(self.params[name][k])

        return pull


@dataclass
class _Member:
    index: int
    run: _Run
    guard: _failures_recorded
    active: bool = True


def train_group(cfgs: Sequence[Config], outs: Sequence[Path | str],
                progress: Progress | None = None) -> list[Result]:
    """Train the runs `cfgs` into `outs` together (one :func:`group_key`, one
    :func:`start_step`): each new (replacing whatever is in its folder) or resumed from
    its checkpoint. Returns, per run, its summary or the exception that stopped it
    (:class:`RunInterrupted` for a signal); `progress` is called after each step of the
    first run that starts (as in :func:`escapelab.train.train`)."""
    keys = {group_key(c) for c in cfgs}
    if len(keys) != 1 or None in keys:
        raise ValueError("train_group: the runs do not form one group")
    results: dict[int, Result] = {}

    def finish(i: int, result: Result) -> None:
        results[i] = result

    starts = [start_step(c, o) for c, o in zip(cfgs, outs, strict=True)]
    if len({k for k in starts if k is not None}) > 1:
        raise ValueError(f"train_group: the runs start from different steps {starts}")
    signals = StopSignals()
    with signals.installed():
        # one copy of the data for every member, on the device (build() keeps it there)
        data = load_dataset(cfgs[0].data).to(resolve_device(cfgs[0].device),
                                              getattr(torch, cfgs[0].dtype))
        members: list[_Member] = []
        try:
            for i, (cfg, out) in enumerate(zip(cfgs, outs, strict=True)):
                if starts[i] is None:  # finished: reused, as train_or_reuse does
                    finish(i, RunDir(out).summary() or RuntimeError(f"{out}: no summary"))
                    continue
                member = _start(i, cfg, out, bool(starts[i]), len(cfgs), data, finish,
                                None if members else progress)
                if member is not None:
                    members.append(member)
            if members:
                _lockstep(members, signals, finish)
        except BaseException as exc:  # an error of the group itself, not of one member
            for m in members:
                m.guard.close(exc)
            raise
    return [results[i] for i in range(len(cfgs))]


def _start(i: int, cfg: Config, out: Path | str, resumed: bool, size: int, data: Dataset,
           finish: Callable[[int, Result], None], progress: Progress | None,
           ) -> _Member | None:
    """Open member i's run directory as :func:`escapelab.train.train_or_reuse` would
    (resumed if it has a resumable checkpoint of this config, else new); a member that
    cannot start is finished at once with its error."""
    try:
        if resumed:
            recorder, setup, state, tensors = _reopen(out, data)
        else:
            prepared = _prepare(cfg, out, overwrite=True)
            setup = _build_for(prepared, cfg, data)
            recorder, state, tensors = _recorder(prepared, setup), TrainState(0, Tracker()), None
        guard = _failures_recorded(recorder)
        try:
            if resumed:
                _rewound(recorder, setup, state, tensors)  # type: ignore[arg-type]
            else:
                _write_start(recorder, setup, {"group": size})
            run = _Run(recorder, setup, state, tensors, progress)
        except BaseException as exc:
            guard.close(exc)
            raise
    except RunInterrupted:
        raise
    except Exception as exc:
        finish(i, exc)
        return None
    return _Member(i, run, guard)


def _lockstep(members: list[_Member], signals: StopSignals,
              finish: Callable[[int, Result], None]) -> None:
    """The group's training loop: one batched step of every member, then each active
    member's own bookkeeping."""
    first = members[0].run.s
    students = Stack([m.run.s.student for m in members])
    teachers = Stack([m.run.s.teacher for m in members])
    for k, m in enumerate(members):
        m.run.pull = students.puller(k, m.run.s.student)
    start = members[0].run.done
    steps = first.derived.total_steps
    with signals.deferring(), denormals_flushed(first.cfg.train.flush_denormal):
        for step in range(start + 1, steps + 1):
            live = [m for m in members if m.active]
            if signals.received is not None or not live:
                break
            lrs = [m.run.lr(step) for m in members]
            idx = torch.stack([m.run.sampler.next() for m in members])
            losses, gnorms, dists = _batched_step(first, students, teachers, idx, lrs,
                                                  [m.active for m in members],
                                                  [m.run.s.cfg.train.max_loss
                                                   for m in members])
            for k, m in enumerate(members):
                if not m.active:
                    continue
                try:
                    if not m.run.stepped(step, lrs[k], losses[k], gnorms[k], dists[k]):
                        m.active = False
                        _end(m, None, finish)
                except Exception as exc:
                    m.active = False
                    m.guard.close(exc)
                    finish(m.index, exc)
    for m in members:
        if m.active:
            m.active = False
            _end(m, signals.received, finish)


def _end(m: _Member, signal: int | None, finish: Callable[[int, Result], None]) -> None:
    try:
        result: Result = m.run.end(signal)
        m.guard.close(None)
    except Exception as exc:
        m.guard.close(exc)
        result = exc
    finish(m.index, result)


def _batched_step(s: Setup, students: Stack, teachers: Stack, idx: Tensor,
                  lrs: list[float], active: list[bool], caps: list[float | None],
                  ) -> tuple[list[float], list[float], list[Tensor]]:
    """One plain SGD step of every member on its own batch ``idx[k]`` (K, B): returns
    each member's loss and full-gradient norm before the update (applied only where
    finite, below its cap and active) and its distance to its teacher after it."""
    from torch.func import vmap

    params = list(students.params.values())
    loss_fn = vmap(s.loss_fn)
    x, micro = s.data.x_train, s.derived.micro_batch_size
    total = torch.zeros(idx.shape[0], dtype=x.dtype, device=x.device)
    grads: list[Tensor] | None = None
    for chunk in idx.split(micro, dim=1):  # micro-batches weighted by their share
        xb = x[chunk]
        if s.targets is not None:
            target = s.targets[chunk]
        else:
            with torch.no_grad():
                target = teachers(xb)
        loss = loss_fn(students(xb), target) * (chunk.shape[1] / idx.shape[1])
        part = torch.autograd.grad(loss.sum(), params)
        grads = list(part) if grads is None else [g + q for g, q in zip(grads, part,
                                                                         strict=True)]
        total += loss.detach()
    assert grads is not None
    # Float64 norms: gradients near the teacher are ~1e-20 and their squares underflow
    # float32 (as in escapelab.train.grad_norm).
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=torch.float64)
                         for g in grads])
    gnorm = torch.linalg.vector_norm(norms, dim=0)
    losses, gnorms = torch.stack([total.double(), gnorm]).tolist()
    ok = [a and _check(loss_k, g_k, 0, cap)[0] == "completed"
          for a, loss_k, g_k, cap in zip(active, losses, gnorms, caps, strict=True)]
    with torch.no_grad():
        keep = torch.tensor(ok, device=x.device)
        rate = torch.tensor(lrs, dtype=x.dtype, device=x.device)
        for p, g in zip(params, grads, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            p.sub_(torch.where(keep.view(shape), g, 0) * rate.view(shape))
        squares = [(p.double() - t.double()).pow(2).flatten(1).sum(1)
                   for p, t in zip(params, teachers.params.values(), strict=True)]
        dists = list(torch.stack(squares).sum(0).sqrt().unbind())
    return losses, gnorms, dists

