"""What the training loop writes, through one object.

The loop hands every step record, evaluation, sharpness measurement, checkpoint and
status change to a :class:`Recorder`, which owns the run directory's writing side: it
buffers step records (turning their device tensors into floats in one host sync per
flush), fsyncs them before any checkpoint that counts them, and keeps the writer's
heartbeat in status.json fresh. Steps, evaluations and the summary are also handed to a
live logger (:mod:`escapelab.loggers`: TensorBoard or W&B, when the config asks for
one), after the files, so the mirror never holds a record the run directory lacks
(sharpness records are not mirrored yet; the summary carries lambda0). Ranks other than 0
under torchrun get a :class:`NullRecorder`, which does nothing, so the loop has no
`if main` branches.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from escapelab.loggers import Logger, NullLogger
from escapelab.models import EscapeNet
from escapelab.probe import Evaluator
from escapelab.sharpness import Sharpness
from escapelab.store import RESUME_CHECKPOINT, RunDir, RunState, Summary

FLUSH_EVERY = 200  # step records buffered at most
HEARTBEAT_S = 30.0  # status.json's heartbeat is at most this old while the run is alive


class Recorder:
    """Writes one run directory as it trains (rank 0)."""

    def __init__(self, run: RunDir, total_steps: int, evaluator: Evaluator,
                 sharpness: Sharpness) -> None:
        self.run = run
        self.evaluator = evaluator
        self.sharpness = sharpness
        self.total_steps = total_steps
        self.pending: list[dict[str, Any]] = []
        self.beat = 0.0
        self.step = 0
        self.resumable = False
        self.logger: Logger = NullLogger()

    def mirror_to(self, logger: Logger) -> None:
        """Hand every record written from now on to `logger` too."""
        self.logger = logger

    @property
    def path(self) -> Any:
        return self.run.path

    def log_step(self, record: dict[str, Any]) -> None:
        """One SGD step's record; values may be 0-d tensors (resolved at flush)."""
        self.pending.append(record)
        self.step = record["step"]
        if len(self.pending) >= FLUSH_EVERY or time.time() - self.beat > HEARTBEAT_S:
            self.flush()
            self.status("running", step=self.step)

    def flush(self) -> None:
        if not self.pending:
            return
        tensors = [(r, k) for r in self.pending for k, v in r.items()
                   if isinstance(v, torch.Tensor)]
        if tensors:
            values = torch.stack([r[k].double().reshape(()) for r, k in tensors]).tolist()
            for (r, k), v in zip(tensors, values, strict=True):
                r[k] = v
        self.run.append_steps(self.pending)
        self.logger.log_steps(self.pending)
        self.pending = []

    def log_eval(self, record: dict[str, Any]) -> None:
        self.flush()
        self.run.append_evals([record])
        self.logger.log_eval(record)

    def evaluate(self, model: EscapeNet, step: int, wall_s: float) -> dict[str, Any] | None:
        """Probe the student at `step` and write the record (None on other ranks)."""
        record = {"model": "student", "step": step, **self.evaluator(model), "wall_s": wall_s}
        self.log_eval(record)
        return record

    def measure_sharpness(self, model: EscapeNet, step: int, wall_s: float | None,
                          teacher: bool = False) -> dict[str, Any] | None:
        """Measure the top Hessian eigenvalues of the training loss at `model` and write
        the record to metrics/sharpness.jsonl (None on other ranks). `teacher`:
        lambda_0, with Gauss-Newton products where they are exact."""
        result = self.sharpness.at_teacher(model) if teacher else self.sharpness.measure(model)
        record = {"model": "teacher" if teacher else "student", "step": step, **result,
                  "wall_s": wall_s}
        self.flush()
        self.run.append_sharpness([record])
        return record

    def checkpoint(self, name: str, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> None:
        self.flush()  # the records a checkpoint refers to are on disk first
        self.logger.flush()  # and in the mirror: resume re-logs only what follows
        self.run.save_checkpoint(name, tensors, meta)
        self.resumable = self.resumable or name == RESUME_CHECKPOINT

    def drop_checkpoint(self, name: str) -> None:
        self.run.drop_checkpoint(name)

    def records_written(self) -> dict[str, int]:
        """How many step and evaluation records are on disk (after a flush)."""
        self.flush()
        return {"steps": len(self.run.steps()), "evals": len(self.run.evals()),
                "sharpness": len(self.run.sharpness())}

    def status(self, state: RunState, **fields: Any) -> None:
        """status.json, with a fresh heartbeat; `resumable` unless said otherwise."""
        self.beat = time.time()
        fields.setdefault("resumable", self.resumable)
        self.run.set_status(state, total_steps=self.total_steps, **fields)

    def summary(self, summary: Summary) -> None:
        self.run.write_summary(summary)
        self.logger.log_summary(summary.model_dump())

    def evals(self) -> list[dict[str, Any]]:
        self.flush()
        return self.run.evals()

    def close(self, failed: bool = False) -> None:
        """Close the live logger. The run's files are complete already: a logger that
        cannot close is a warning, never the run's error."""
        logger, self.logger = self.logger, NullLogger()
        try:
            logger.close(failed)
        except Exception as exc:  # any back end's error: the run itself is on disk
            warnings.warn(f"the live logger did not close cleanly ({type(exc).__name__}: "
                          f"{exc}); the run directory is complete", stacklevel=2)


class NullRecorder(Recorder):
    """The recorder of torchrun ranks other than 0: computes nothing, writes nothing."""

    def __init__(self, total_steps: int) -> None:
        self.total_steps = total_steps
        self.pending = []
        self.step = 0
        self.resumable = False
        self.logger = NullLogger()

    @property
    def path(self) -> Any:
        return None

    def log_step(self, record: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def evaluate(self, model: EscapeNet, step: int, wall_s: float) -> dict[str, Any] | None:
        return None

    def measure_sharpness(self, model: EscapeNet, step: int, wall_s: float | None,
                          teacher: bool = False) -> dict[str, Any] | None:
        return None

    def checkpoint(self, name: str, tensors: dict[str, torch.Tensor],
                   meta: dict[str, Any]) -> None:
        pass

    def drop_checkpoint(self, name: str) -> None:
        pass

    def records_written(self) -> dict[str, int]:
        return {}

    def status(self, state: RunState, **fields: Any) -> None:
        pass

    def summary(self, summary: Summary) -> None:
        pass

    def evals(self) -> list[dict[str, Any]]:
        return []

    def mirror_to(self, logger: Logger) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass
