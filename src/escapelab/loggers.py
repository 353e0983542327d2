"""Live mirrors of a run: TensorBoard event files or a W&B run, fed by the Recorder.

The run directory stays the record; a logger only mirrors what the Recorder has just
written there, so a live mirror and one made afterwards by :func:`export_tensorboard`
hold the same series. What goes where (one scalar per numeric field):

- a step record (metrics/steps.jsonl) -> ``train/<field>`` at step = its step
  (lr, loss, grad_norm, dist_teacher);
- the teacher's evaluation -> ``teacher/<field>`` at step 0, the student's ->
  ``eval/<field>`` at its step (probe_acc, knn_acc, erank, dead_frac, loss, wall_s);
- the summary -> ``summary/<field>`` at step = steps_completed for TensorBoard, the run's
  summary for W&B (which also gets the status, reason and collapse criterion).

Values that are null in the files (non-finite: a diverged step) are left out, as the
files leave them out. TensorBoard keeps float32 (``simple_value``); W&B keeps the float64
value.

Each back end is an optional extra, imported only when chosen: :func:`require` fails at
start-up, before any data or model is built, with the pip line to run. Like torchtune's
metric loggers (a small protocol, interchangeable back ends), and like timm, escapelab
always writes its own files and mirrors only when asked.

Resume. Records after the resumable checkpoint are recomputed, and the mirror may
already hold some of them (a process killed after a flush). TensorBoard: the resumed
writer opens a new event file in the same folder with ``purge_step = checkpoint step +
1``, which tells TensorBoard's reader to drop every earlier event from that step on, so
each series has one value per step. W&B: the run id is kept in the run directory and
the resumed process continues that W&B run (``resume="allow"``); steps W&B already holds
are skipped, because W&B accepts only increasing steps.
"""

from __future__ import annotations

import importlib
import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from escapelab.config import Config, config_to_dict
from escapelab.errors import EscapelabError, RunDirError
from escapelab.store import RunDir, RunLock, kind_of

__all__ = ["Logger", "NullLogger", "TensorBoardLogger", "WandbLogger", "make_logger",
           "require", "export_tensorboard", "scalars"]

EXTRAS = {  # logger name -> (module imported, pip extra)
    "tensorboard": ("tensorboardX", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


class Logger(Protocol):
    """A live mirror of a run's records (rank 0 only)."""

    def log_steps(self, records: Iterable[dict[str, Any]]) -> None:
        """Step records, values already floats (the Recorder's flush)."""

    def log_eval(self, record: dict[str, Any]) -> None:
        """One evaluation record (model 'teacher' or 'student')."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The finished run's summary (Summary.model_dump())."""

    def flush(self) -> None:
        """Put what was logged on disk (the Recorder calls it at each checkpoint: a
        resume re-logs only the steps after it)."""

    def close(self, failed: bool = False) -> None:
        """Write out what is buffered; `failed`: the run stopped on an error or signal."""


class NullLogger:
    """logger.name=none: mirrors nothing."""

    def log_steps(self, records: Iterable[dict[str, Any]]) -> None:
        pass

    def log_eval(self, record: dict[str, Any]) -> None:
        pass

    def log_summary(self, summary: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what the files hold as a number, not null."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def scalars(record: dict[str, Any], prefix: str, skip: tuple[str, ...] = ("step",),
            ) -> dict[str, float]:
    """``{prefix/field: value}`` for the record's finite numbers (fields in `skip` left
    out).

    >>> scalars({"step": 3, "loss": 0.5, "model": "student", "x": None}, "eval")
    {'eval/loss': 0.5}
    """
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if key not in skip and _is_number(value)}


def _eval_prefix(record: dict[str, Any]) -> str:
    return "teacher" if record.get("model") == "teacher" else "eval"


def require(name: str, user: str | None = None) -> Any:
    """Import the package behind logger `name` (None for 'none'), or raise one line
    saying what to pip install. `user` names who needs it (default: the config key)."""
    if name not in EXTRAS:
        return None
    module, extra = EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # a broken install (a dependency missing) says which one; a plain absence does not
        detail = "" if exc.name == module else f" ({exc})"
        raise EscapelabError(f"{user or f'logger.name={name}'} needs the {module} package"
                             f"{detail}: pip install 'escapelab[{extra}]'") from None


def _run_dir(run: RunDir | Path | str) -> RunDir:
    return run if isinstance(run, RunDir) else RunDir(run)


# ---------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger:
    """Event files in `folder` through tensorboardX's SummaryWriter (no TensorFlow, no
    torch.utils.tensorboard: tensorboardX is an 87 KB wheel).

    `purge_step`: on resume, the first recomputed step; TensorBoard's reader drops the
    events of earlier files at and after it. Each writer's file name ends in a sequence
    number: event files are read in name order, and two writers in the same second on
    the same host would otherwise share a name (tensorboardX names files by the second).
    """

    def __init__(self, folder: Path | str, purge_step: int | None = None) -> None:
        tensorboardx = require("tensorboard")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        earlier = len(list(self.folder.glob("events.out.tfevents.*")))
        self.writer = tensorboardx.SummaryWriter(
            logdir=str(self.folder), purge_step=purge_step, flush_secs=30,
            filename_suffix=f".escapelab.{earlier:04d}")

    def _write(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def log_steps(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self._write(scalars(record, "train"), int(record["step"]))

    def log_eval(self, record: dict[str, Any]) -> None:
        self._write(scalars(record, _eval_prefix(record), skip=("step", "model")),
                    int(record["step"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._write(scalars(summary, "summary", skip=()), int(summary["steps_completed"]))

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------
# Weights & Biases


class WandbLogger:
    """A W&B run whose files go to ``<run>/wandb/``; online, or offline with
    WANDB_MODE=offline (then ``wandb sync <run>/wandb/offline-run-*`` uploads it).

    Its id is saved in the run directory (logger.json), so a resumed run continues the
    same W&B run. Steps at or below the last one W&B holds are skipped (W&B drops them
    with a warning: it accepts only increasing steps); on a deterministic device they
    are the same values anyway.
    """

    def __init__(self, cfg: Config, run: RunDir, resume_step: int | None = None) -> None:
        wandb = require("wandb")
        run_id = run.logger_state().get("wandb_id") if resume_step is not None else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]  # W&B ids: letters and digits, unique per project
            run.write_logger_state({"wandb_id": run_id})
        try:
            self.run = wandb.init(project=cfg.logger.wandb_project,
                                  entity=cfg.logger.wandb_entity, id=run_id,
                                  resume="allow", dir=str(run.path), name=run.path.name,
                                  config=config_to_dict(cfg))
        except Exception as exc:  # wandb raises its own types (auth, network, usage)
            raise EscapelabError(f"W&B could not start ({type(exc).__name__}: {exc}); run "
                                 "`wandb login`, or set WANDB_MODE=offline") from None
        # A resumed W&B run (online) starts after the last step the server holds.
        self.first_step = int(getattr(self.run, "starting_step", 0) or 0)

    def _log(self, values: dict[str, float], step: int) -> None:
        if values and step >= self.first_step:
            self.run.log(values, step=step)

    def log_steps(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            self._log(scalars(record, "train"), int(record["step"]))

    def log_eval(self, record: dict[str, Any]) -> None:
        self._log(scalars(record, _eval_prefix(record), skip=("step", "model")),
                  int(record["step"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in summary.items()
                                 if _is_number(v) or isinstance(v, str)
                                 or (isinstance(v, list) and all(map(_is_number, v)))})

    def flush(self) -> None:
        pass  # wandb's own process (wandb-core) writes and uploads as it goes

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------------------------------
# Building one, and exporting a finished (or stopped) run afterwards


def make_logger(cfg: Config, run_path: RunDir | Path | str, resume_step: int | None = None,
                ) -> Logger:
    """The logger `cfg.logger` asks for, mirroring into the run directory `run_path`
    (a path or RunDir). `resume_step`: the checkpoint's step when resuming."""
    name = cfg.logger.name
    run = _run_dir(run_path)
    if name == "tensorboard":
        return TensorBoardLogger(run.tensorboard_dir, purge_step=None if resume_step is None
                                 else resume_step + 1)
    if name == "wandb":
        return WandbLogger(cfg, run, resume_step)
    return NullLogger()


def export_tensorboard(run_path: Path | str, out: Path | str | None = None,
                       overwrite: bool = False) -> Path:
    """Write the event files of an existing run directory (its steps, evaluations and,
    if finished, summary) into `out` (default ``<run>/tensorboard``); the same series a
    live ``logger.name=tensorboard`` writes. Refuses a folder that is not a run
    directory, one that is being written, and an `out` that already holds event files
    (unless `overwrite`, which replaces them). Returns the folder written."""
    run = RunDir(run_path)
    if kind_of(run.path) != "run":
        raise RunDirError(f"{run.path} is not a run directory (escapelab run writes "
                          "one)")
    holder = RunLock.holder(run.path)
    if holder is not None:
        raise RunDirError(f"{run.path} is being written (PID {holder.get('pid', '?')} on "
                          f"{holder.get('host', '?')}); export it when it has stopped")
    require("tensorboard", "escapelab export --to tensorboard")
    folder = Path(out) if out is not None else run.tensorboard_dir
    old = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    if old and not overwrite:
        raise RunDirError(f"{folder} already holds {len(old)} event file(s); pass "
                          "--overwrite to replace them, or --out another folder")
    for path in old:
        path.unlink()
    logger = TensorBoardLogger(folder)
    try:
        logger.log_steps(run.steps())
        for record in run.evals():
            logger.log_eval(record)
        summary = run.summary()
        if summary is not None:
            logger.log_summary(summary.model_dump())
    finally:
        logger.close()
    return folder
