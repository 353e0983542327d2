"""Where and how a run executes: device, torchrun ranks, CPU flags and stop signals.

These are process concerns, kept out of the training loop: the loop asks `Ranks`
whether it writes, runs inside `denormals_flushed` and checks `StopSignals` between
steps.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch

from escapelab.errors import EscapelabError, RunInterrupted


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torch.distributed job (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0 evaluates and writes the run directory; the others only compute."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Ranks:
        """What torchrun's environment says, before joining the process group."""
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is true on any (all ranks stop at the same step)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        agreed = torch.tensor([float(flag)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return bool(agreed.item())


def init_ranks(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on the CPU,
    NCCL on GPUs. Each rank computes the gradient of its shard of every batch."""
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
    """`auto` -> cuda if available else cpu; under torchrun `cuda` is this rank's GPU."""
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


def setup_torch(threads: int | None, deterministic: bool, device: str,
                tf32: bool = False) -> torch.device:
    """Apply the run's thread count, determinism request and TF32 choice (off unless
    asked: :func:`set_tf32`); return its device."""
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_tf32(tf32)
    return resolve_device(device)


def set_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, set explicitly both ways. PyTorch
    enables it for cuDNN convolutions by default, which rounds a float32 student's
    weights to 10 mantissa bits and erases a 1e-10 offset from the teacher."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def tf32_state() -> dict[str, Any]:
    """The TF32 settings in effect, for environment.json."""
    return {"matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


class StopSignals:
    """SIGINT and SIGTERM during a run (Ctrl-C, `kill`, Slurm pre-emption).

    While ``deferred`` is false (start-up, final write-up) a signal raises
    :class:`RunInterrupted` at once. While it is true (the training loop) the first
    signal only records itself in ``received``; the loop checks it between steps and
    stops with a resumable checkpoint. A second signal always raises at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferred = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        repeated = self.received is not None
        self.received = signum
        if repeated or not self.deferred:
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name}", signum)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle both signals inside the block (only the main thread can)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """Inside the block a first signal is only recorded (see the class docstring)."""
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
