"""Run directories: the only bridge between computing results and reading them.

This module is the one place that knows file names and layouts. Layout of a run
directory::

    config.yaml              the resolved config, exactly as validated (never edited)
    derived.json             values that follow from config + data, and the config's hash
    environment.json         package versions, git SHA, device, threads
    init.json                realized teacher -> student offset
    status.json              starting / running / interrupted / failed / completed /
                             diverged / capped, last step, writer PID + host + heartbeat
    metrics/steps.jsonl      one line per SGD step
    metrics/evals.jsonl      one line per evaluation (teacher once, student on schedule)
    metrics/sharpness.jsonl  top Hessian eigenvalues: lambda_0 at the teacher once, the
                             student on the sharpness schedule (escapelab.sharpness)
    checkpoints/T|C|S|step_<k>.safetensors + .json   weights + metadata
    checkpoints/last.safetensors + .json             resumable training state
    summary.json             written last: its presence means the run finished
    analysis.csv, analysis.json   `escapelab analyze`
    finetune/curves.jsonl, finetune/finetune.json   `escapelab finetune`
    figures/, report.html         `escapelab report`
    tensorboard/             event files of logger.name=tensorboard or `escapelab export`
    wandb/                   W&B's own files of logger.name=wandb (W&B names them)
    logger.json              the live logger's identity (W&B run id): resume continues it
    .lock                    held (flock) by the one process writing the directory

Guarantees (each backed by a test; README "What survives what"):

- One writer: whoever writes a run directory holds an exclusive ``flock`` on ``.lock``
  (released by the kernel when its process dies, so a stale lock never blocks); a
  second writer gets one line naming the PID and host that hold it.
- Durable: JSON and checkpoint files are written to a temporary name, fsynced and
  renamed into place (a reader never sees half a file); JSON-lines records are
  fsynced when appended, before any checkpoint that counts them.
- Damage is reported, never silently dropped: an unreadable line in the middle of a
  JSON-lines file is skipped with a warning naming the file and line; only a torn last
  line (a kill mid-write) is ignored quietly. Resume moves damaged lines to
  ``<file>.damaged`` and keeps every valid record.
- Files are created with the user's umask (collaborators and other nodes can read
  them); non-finite floats are written as null.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from escapelab.config import Config, Derived, config_digest, dump_yaml, load_config
from escapelab.errors import ConfigError, RunDirError
from escapelab.runtime import tf32_state

# -- the layout: every file name escapelab writes ------------------------------------------

CONFIG_FILE = "config.yaml"
DERIVED_FILE = "derived.json"
ENVIRONMENT_FILE = "environment.json"
INIT_FILE = "init.json"
STATUS_FILE = "status.json"
SUMMARY_FILE = "summary.json"
STEPS_FILE = "metrics/steps.jsonl"
EVALS_FILE = "metrics/evals.jsonl"
SHARPNESS_FILE = "metrics/sharpness.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
ANALYSIS_CSV = "analysis.csv"
ANALYSIS_JSON = "analysis.json"
FINETUNE_CURVES = "finetune/curves.jsonl"  # one record per (start, seed, evaluation)
FINETUNE_JSON = "finetune/finetune.json"  # the options and the comparison of the starts
REPORT_FILE = "report.html"
FIGURES_DIR = "figures"
FIGURES_MANIFEST = "figures/manifest.json"  # the figure files the report wrote
RESUME_CHECKPOINT = "last"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # made by wandb itself inside the folder it is given (the run's)
LOGGER_FILE = "logger.json"
# A sweep folder
SWEEP_FILE = "sweep.json"
SWEEP_RUNS_DIR = "runs"
SWEEP_FAILURES_DIR = "failures"
SWEEP_RUNS_CSV = "runs.csv"
SWEEP_TABLE_CSV = "table.csv"
SLURM_DIR = "slurm"
# An LR range test folder
LR_RANGE_CSV = "lr_range.csv"
LR_RANGE_JSON = "lr_range.json"
# A study folder (escapelab.study): the plan and its parts' states, the claims' verdicts
STUDY_FILE = "study.json"
CLAIMS_FILE = "claims.json"

RunState = Literal["starting", "running", "interrupted", "failed", "completed", "diverged",
                   "capped"]
ENDED_STATES = ("completed", "diverged", "capped")


class RunDirWarning(UserWarning):
    """Something in a run directory is damaged but nothing valid was lost."""


# -- plain files ------------------------------------------------------------------------------


def clean(obj: Any) -> Any:
    """Recursively replace non-finite floats by None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0o022)  # there is no getter; set and restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn an OSError while writing `path` (full disk, read-only, no permission) into
    one RunDirError line."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        hint = " (free some space, then resume the run)" if exc.errno == errno.ENOSPC else ""
        raise RunDirError(f"cannot write {path}: {reason}{hint}") from None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through `write(tmp)` to a temporary sibling, fsync, rename into place."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 whatever the umask
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


MAX_JSON_BYTES = 256 * 2**20  # summary.json, analysis.json ... are kilobytes to megabytes
MAX_JSONL_BYTES = 4 * 2**30  # a 19,500-step run's steps.jsonl is ~3 MB


def read_bytes(path: Path, limit: int) -> bytes:
    """The content of a regular file (a link to one is followed), at most `limit` bytes;
    never blocks on a FIFO or device and never reads without bound: anything else is one
    RunDirError line. FileNotFoundError passes through."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RunDirError(f"{path} is not a regular file (a FIFO, device or folder); "
                              "escapelab reads only files it wrote")
        if info.st_size > limit:
            raise RunDirError(f"{path} is {info.st_size:,} bytes, more than the "
                              f"{limit:,} escapelab reads from such a file")
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grown since fstat
                raise RunDirError(f"{path} is larger than the {limit:,} bytes escapelab "
                                  "reads from such a file")
        return b"".join(chunks)
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    """A JSON file, or one RunDirError line if it is missing, empty, damaged, not a
    regular file, too large or nested too deeply."""
    try:
        text = read_bytes(path, MAX_JSON_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing") from None
    except UnicodeDecodeError as exc:
        raise RunDirError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        what = "empty" if not text.strip() else f"damaged ({exc.msg} at line {exc.lineno})"
        raise RunDirError(f"{path} is {what}") from None
    except RecursionError:
        raise RunDirError(f"{path} is damaged (nested too deeply)") from None


def append_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one JSON line each, and fsync: on disk before anything that
    refers to them (a checkpoint counting them) is written."""
    lines = "".join(json.dumps(clean(r), allow_nan=False) + "\n" for r in records)
    if not lines:
        return
    with writing(path):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        with _append(path) as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def _append(path: Path) -> Any:
    """`path` opened for appending text, never through a symbolic link (a link there is
    one RunDirError line: appending would write into whatever file it points to)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirError(f"{path} is a symbolic link; escapelab appends only to files "
                              "of its own (remove the link)") from None
        raise
    return os.fdopen(fd, "a")


def scan_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """(valid records, damaged lines as (line number, text)) of a JSON-lines file.

    A last line without its newline that does not parse is a torn write (the writer was
    killed mid-line): it is neither a record nor damage. Any other unreadable line is
    damage; the records after it are kept.
    """
    try:
        raw = read_bytes(path, MAX_JSONL_BYTES)
    except FileNotFoundError:
        return [], []
    text = raw.decode("utf-8", errors="replace")
    lines = text.split("\n")
    torn_tail = not text.endswith("\n")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
            records.append(record)
        except (ValueError, RecursionError):
            if torn_tail and number == len(lines):
                continue
            damaged.append((number, line))
    return records, damaged


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every valid record; damaged lines are skipped with a :class:`RunDirWarning`."""
    records, damaged = scan_jsonl(path)
    if damaged:
        numbers = ", ".join(str(n) for n, _ in damaged[:5])
        warnings.warn(f"{path}: {len(damaged)} damaged line(s) skipped (line {numbers}); "
                      "every other record was read", RunDirWarning, stacklevel=2)
    return records


def config_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "",
                   ) -> list[str]:
    """Dotted keys whose value differs between two config dicts, as 'key: a -> b'."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# -- typed records ------------------------------------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Status(_Record):
    """status.json: what a run is doing or how it ended, and who writes it."""

    status: RunState
    step: int = 0
    total_steps: int | None = None
    reason: str | None = None
    resumable: bool = False
    pid: int | None = None
    host: str | None = None
    started: float | None = None  # Unix time the writer started
    heartbeat: float | None = None  # Unix time of the writer's last sign of life


class SharpnessRecord(_Record):
    """One line of metrics/sharpness.jsonl: a measurement of the top-k eigenvalues of
    the training loss's Hessian on the fixed sharpness subset (escapelab.sharpness)."""

    model: Literal["teacher", "student"]
    step: int
    method: Literal["hessian", "gauss_newton"]  # Gauss-Newton: lambda_0 of squared losses
    eigenvalues: list[float | None]  # descending; null if not finite
    residuals: list[float | None]  # ||H v - lambda v|| per eigenvector (unit v)
    hvp: int  # Hessian (or Gauss-Newton) vector products spent
    converged: bool  # every residual <= tol * |lambda_1| within max_hvp products
    loss: float | None = None  # the subset's training loss at this point
    samples: int  # images in the subset
    seconds: float  # wall time of the measurement
    wall_s: float | None = None  # the run's elapsed time (student records)

    @property
    def top(self) -> float | None:
        return self.eigenvalues[0] if self.eigenvalues else None


class Summary(_Record):
    """summary.json: the run's headline numbers (accuracies are fractions in [0, 1]).

    Written last: its presence means the run finished. ``summary["gain"]`` works like
    ``summary.gain`` for notebook convenience."""

    status: Literal["completed", "diverged", "capped"]
    reason: str | None = None
    steps_completed: int
    total_steps: int
    teacher_probe_acc: float | None = None
    final_probe_acc: float | None = None
    gain: float | None = None
    min_probe_acc: float | None = None
    min_probe_acc_step: int | None = None
    teacher_knn_acc: float | None = None
    final_knn_acc: float | None = None
    escape_step: int | None = None
    collapse_step: int | None = None
    collapse_criterion: str | None = None
    probe_acc_collapse: float | None = None
    erank_teacher: float | None = None
    erank_collapse: float | None = None
    erank_final: float | None = None
    dead_frac_teacher: float | None = None
    dead_frac_collapse: float | None = None
    dead_frac_final: float | None = None
    loss_init: float | None = None
    loss_final: float | None = None
    lambda0: float | None = None  # top Hessian eigenvalue at the teacher (sharpness.jsonl)
    eta_lambda0: float | None = None  # optim.lr * lambda0: GD leaves the teacher if > 2
    lambda_max: float | None = None  # largest top eigenvalue measured during the run
    lambda_final: float | None = None  # top eigenvalue at the last measurement
    offset_realized: float | None = None
    offset_ratio: float | None = None
    changed_frac: float | None = None
    # escape timing (escapelab.phases: the rules)
    erank_drop: float | None = None  # erank_teacher / erank_collapse
    probe_drop: float | None = None  # teacher_probe_acc - probe_acc_collapse
    recovery_step: int | None = None  # first evaluation after C back at the teacher's probe
    oscillation_onset: int | None = None  # first step of the oscillating gradient norm
    catapult_steps: list[int] = Field(default_factory=list)  # loss spike, then flatter
    phase: str = "missing"  # stays, escapes, collapses or diverges
    wall_s: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


# -- the lock ---------------------------------------------------------------------------------


def _holder_text(info: dict[str, Any]) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"PID {info.get('pid', '?')} on {info.get('host', '?')}{when}"


class RunLock:
    """An exclusive ``flock`` on ``<dir>/.lock``, holding the writer's PID and host.

    The kernel drops the lock when the holding process dies (kill -9 included), so a
    dead writer's lock is taken over by the next one without any clean-up. (The
    `filelock` package truncates the lock file on every attempt, which would erase the
    holder's name, hence fcntl directly.)
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if self.path.is_symlink():
            raise RunDirError(f"{self.path} is a symbolic link; escapelab locks only a file "
                              "of its own there (remove the link)")
        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK,
                         0o666)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunDirError(f"{self.path} is not a regular file (a FIFO or device); "
                              "remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is being written by {_holder_text(holder)}; "
                              "wait for it to finish or stop it first") from None
        with writing(self.path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    @classmethod
    def holder(cls, folder: Path) -> dict[str, Any] | None:
        """Who holds the lock of `folder` now (pid, host, since), or None if nobody."""
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None  # not a lock escapelab made: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return cls._read(fd)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


# -- a run directory --------------------------------------------------------------------------


class RunDir:
    """A run directory on disk: typed reads for everyone, writes for its lock holder."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.lock: RunLock | None = None
        self.started = time.time()

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def check_free(cls, path: Path | str, overwrite: bool = False) -> None:
        """Raise unless `path` is absent, empty, or a run directory we may overwrite;
        and check that it can be written (before any data or model is built)."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"{run.path} exists and is not a directory")
        if run.path.exists() and any(p.name != LOCK_FILE for p in run.path.iterdir()):
            if not (run.path / CONFIG_FILE).is_file():
                raise RunDirError(f"{run.path} exists, is not empty and is not a run "
                                  "directory; choose another --out")
            holder = RunLock.holder(run.path)
            if holder is not None:
                raise RunDirError(f"{run.path} is being written by {_holder_text(holder)}; "
                                  "wait for it to finish or stop it first")
            if not overwrite:
                raise RunDirError(f"{run.path} already holds a run ({run.state_text()}); "
                                  "choose another --out, pass --overwrite, or --resume it")
        folder = run.path if run.path.exists() else _first_existing(run.path)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RunDirError(f"cannot write {folder}: permission denied (or read-only); "
                              "choose another --out")

    @classmethod
    def create(cls, path: Path | str, overwrite: bool = False) -> RunDir:
        """A new, empty, locked run directory; refuses to mix with an existing run.
        With `overwrite`, the old run's files are removed only once the lock is held."""
        cls.check_free(path, overwrite)
        run = cls(path)
        with writing(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
        return run.acquire().reset()

    def reset(self) -> RunDir:
        """Remove everything but the lock (held) and lay out the empty folders."""
        assert self.lock is not None, "reset needs the lock"
        for child in self.path.iterdir():
            if child.name == LOCK_FILE:
                continue
            with writing(child):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        with writing(self.path):
            (self.path / "metrics").mkdir()
            (self.path / CHECKPOINT_DIR).mkdir()
        return self

    def is_empty(self) -> bool:
        """Absent, or holding nothing but a lock file."""
        return not self.path.exists() or not any(p.name != LOCK_FILE
                                                 for p in self.path.iterdir())

    @classmethod
    def open(cls, path: Path | str) -> RunDir:
        """An existing run directory (for reading; :meth:`acquire` before writing)."""
        run = cls(path)
        if not (run.path / CONFIG_FILE).is_file():
            raise RunDirError(f"{run.path} is not a run directory (no {CONFIG_FILE})")
        return run

    def acquire(self) -> RunDir:
        """Take the writer's lock (one clear line if another process holds it)."""
        if self.lock is None:
            self.lock = RunLock(self.path).acquire()
        return self

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def remove(self) -> None:
        """Delete this (just created, still empty of results) directory."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)

    # -- status -------------------------------------------------------------------------

    def status(self) -> Status | None:
        path = self.path / STATUS_FILE
        if not path.exists():
            return None
        try:
            return Status.model_validate(read_json(path))
        except ValidationError as exc:
            raise RunDirError(f"{path} is damaged: {exc.errors()[0]['msg']}") from None

    def set_status(self, status: RunState, **fields: Any) -> None:
        now = time.time()
        record = Status(status=status, pid=os.getpid(), host=socket.gethostname(),
                        started=self.started, heartbeat=now, **fields)
        write_json(self.path / STATUS_FILE, record.model_dump())

    def state_text(self) -> str:
        """What the run is doing, judged by its status and its lock: 'running (...)',
        'dead (...)', 'interrupted at step k of n (resumable)', 'completed', ..."""
        status = self.status()
        if status is None:
            return "unknown (no status.json)"
        where = f"step {status.step}" + (f" of {status.total_steps}"
                                         if status.total_steps else "")
        if status.status in ("starting", "running"):
            holder = RunLock.holder(self.path)
            beat = (f"last heartbeat {time.time() - status.heartbeat:.0f} s ago"
                    if status.heartbeat else "no heartbeat")
            if holder is not None:
                return f"running, {where}, {_holder_text(holder)}, {beat}"
            resumable = self.has_checkpoint(RESUME_CHECKPOINT)
            return (f"dead ({status.status} at {where}, {beat}; the writer PID "
                    f"{status.pid} on {status.host} is gone; "
                    + ("resumable)" if resumable else "nothing to resume: start it again)"))
        text = f"{status.status} at {where}"
        if status.reason:
            text += f" ({status.reason})"
        if status.status in ("interrupted", "failed"):
            text += "; resumable" if self.has_checkpoint(RESUME_CHECKPOINT) else \
                "; not resumable (no checkpoint yet): start it again with --overwrite"
        return text

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY_FILE).exists()

    # -- typed reads --------------------------------------------------------------------

    def config(self) -> Config:
        try:
            return load_config(self.path / CONFIG_FILE)
        except ConfigError as exc:
            raise RunDirError(f"{self.path / CONFIG_FILE}: {exc}") from None

    def config_text(self) -> str:
        path = self.path / CONFIG_FILE
        try:
            return read_bytes(path, MAX_JSON_BYTES).decode("utf-8")
        except FileNotFoundError:
            raise RunDirError(f"{path} is missing") from None
        except UnicodeDecodeError as exc:
            raise RunDirError(f"cannot read {path}: not UTF-8 text ({exc.reason} at byte "
                              f"{exc.start})") from None

    def derived(self) -> Derived:
        payload = read_json(self.path / DERIVED_FILE)
        try:
            return Derived.model_validate(payload)
        except ValidationError as exc:
            raise RunDirError(f"{self.path / DERIVED_FILE} is damaged: "
                              f"{exc.errors()[0]['msg']}") from None

    def summary(self) -> Summary | None:
        """The summary of a finished run, else None."""
        if not self.finished:
            return None
        try:
            return Summary.model_validate(read_json(self.path / SUMMARY_FILE))
        except ValidationError as exc:
            raise RunDirError(f"{self.path / SUMMARY_FILE} is damaged: "
                              f"{exc.errors()[0]['msg']}") from None

    def init(self) -> dict[str, Any]:
        return dict(read_json(self.path / INIT_FILE))

    def steps(self) -> list[dict[str, Any]]:
        """metrics/steps.jsonl: step, lr, loss, grad_norm, dist_teacher per SGD step."""
        return read_jsonl(self.path / STEPS_FILE)

    def evals(self) -> list[dict[str, Any]]:
        """metrics/evals.jsonl: the teacher's evaluation, then the student's."""
        return read_jsonl(self.path / EVALS_FILE)

    def sharpness(self) -> list[SharpnessRecord]:
        """metrics/sharpness.jsonl: lambda_0 at the teacher, then the student's
        measurements (empty if absent). A line that is valid JSON but not a
        measurement is skipped with a :class:`RunDirWarning`."""
        path = self.path / SHARPNESS_FILE
        out = []
        for number, record in enumerate(read_jsonl(path), 1):
            try:
                out.append(SharpnessRecord.model_validate(record))
            except ValidationError as exc:
                warnings.warn(f"{path}: record {number} is not a sharpness measurement "
                              f"({exc.errors()[0]['msg']}); skipped", RunDirWarning,
                              stacklevel=2)
        return out

    def teacher_sharpness(self) -> SharpnessRecord | None:
        return next((r for r in self.sharpness() if r.model == "teacher"), None)

    def teacher_eval(self) -> dict[str, Any] | None:
        return next((r for r in self.evals() if r.get("model") == "teacher"), None)

    def student_evals(self) -> list[dict[str, Any]]:
        return [r for r in self.evals() if r.get("model") == "student"]

    def matches(self, cfg: Config) -> bool:
        """Whether this directory holds a run of exactly `cfg` (config.yaml unedited)."""
        path = self.path / CONFIG_FILE
        if not path.is_file() or path.read_text() != dump_yaml(cfg):
            return False
        try:
            return read_json(self.path / DERIVED_FILE).get("config_sha256") == \
                config_digest(cfg)
        except RunDirError:
            return False

    # -- writes (the lock holder) -------------------------------------------------------

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.path / CONFIG_FILE, dump_yaml(cfg))

    def write_start(self, cfg: Config, derived: Derived, environment: dict[str, Any],
                    init: dict[str, Any]) -> None:
        """The files that describe the run, before its first step."""
        self.write_config(cfg)
        write_json(self.path / DERIVED_FILE, derived.model_dump(mode="json"))
        write_json(self.path / ENVIRONMENT_FILE, environment)
        write_json(self.path / INIT_FILE, init)

    def write_summary(self, summary: Summary) -> None:
        write_json(self.path / SUMMARY_FILE, summary.model_dump())

    def append_steps(self, records: Iterable[dict[str, Any]]) -> None:
        append_jsonl(self.path / STEPS_FILE, records)

    def append_evals(self, records: Iterable[dict[str, Any]]) -> None:
        append_jsonl(self.path / EVALS_FILE, records)

    def append_sharpness(self, records: Iterable[dict[str, Any]]) -> None:
        append_jsonl(self.path / SHARPNESS_FILE, records)

    def rewind(self, step: int) -> dict[str, int]:
        """Keep the records up to `step` (resume recomputes the rest). Damaged lines are
        moved to ``<file>.damaged`` with a warning, never dropped. Returns the number of
        records kept per file."""
        kept = {}
        def teacher_or_early(r: dict[str, Any]) -> bool:
            return r.get("model") == "teacher" or r.get("step", math.inf) <= step

        for name, keep in ((STEPS_FILE, lambda r: r.get("step", math.inf) <= step),
                           (EVALS_FILE, teacher_or_early),
                           (SHARPNESS_FILE, teacher_or_early)):
            path = self.path / name
            records, damaged = scan_jsonl(path)
            if damaged:
                aside = path.with_name(path.name + ".damaged")
                with writing(aside), _append(aside) as f:
                    f.writelines(f"{n}\t{line}\n" for n, line in damaged)
                warnings.warn(f"{path}: {len(damaged)} damaged line(s) (line "
                              f"{', '.join(str(n) for n, _ in damaged[:5])}) moved to "
                              f"{aside.name}; every valid record was kept", RunDirWarning,
                              stacklevel=2)
            records = [r for r in records if keep(r)]
            kept[name] = len(records)
            atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n"
                                            for r in records))
        return kept

    def write_analysis(self, csv_text: str, payload: dict[str, Any]) -> None:
        atomic_write_text(self.path / ANALYSIS_CSV, csv_text)
        write_json(self.path / ANALYSIS_JSON, payload)

    def analysis(self) -> dict[str, Any] | None:
        path = self.path / ANALYSIS_JSON
        return dict(read_json(path)) if path.exists() else None

    def finetune_curves(self) -> list[dict[str, Any]]:
        """finetune/curves.jsonl (empty if absent)."""
        path = self.path / FINETUNE_CURVES
        return read_jsonl(path) if path.exists() else []

    def append_finetune_curve(self, records: Iterable[dict[str, Any]]) -> None:
        """One (start, seed) curve, all its records in one fsynced append."""
        append_jsonl(self.path / FINETUNE_CURVES, records)

    def write_finetune(self, payload: dict[str, Any]) -> None:
        write_json(self.path / FINETUNE_JSON, payload)

    def finetune(self) -> dict[str, Any] | None:
        path = self.path / FINETUNE_JSON
        return dict(read_json(path)) if path.exists() else None

    def clear_finetune(self) -> None:
        """Remove earlier finetuning results (``finetune --overwrite``)."""
        for name in (FINETUNE_CURVES, FINETUNE_JSON):
            with writing(self.path / name):
                (self.path / name).unlink(missing_ok=True)

    # -- checkpoints --------------------------------------------------------------------

    def checkpoint_path(self, name: str) -> Path:
        return self.path / CHECKPOINT_DIR / f"{name}.safetensors"

    def has_checkpoint(self, name: str) -> bool:
        return self.checkpoint_path(name).exists()

    def save_checkpoint(self, name: str, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
        """Weights as safetensors plus a JSON sidecar, both written atomically."""
        from safetensors.torch import save

        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        # Serialized in memory, written by Python: a full disk is an OSError (one line),
        # not safetensors' own error type.
        blob = save(contiguous, metadata={"name": name, "format": "escapelab"})
        _atomic_write(self.checkpoint_path(name), lambda tmp: tmp.write_bytes(blob))
        write_json(self.checkpoint_path(name).with_suffix(".json"), {"name": name, **meta})

    def checkpoint_meta(self, name: str) -> dict[str, Any]:
        """The metadata of one checkpoint (its JSON sidecar), without reading its
        tensors; one line if missing or damaged."""
        path = self.checkpoint_path(name)
        if not path.exists():
            raise RunDirError(f"checkpoint {name!r} not found in {path.parent}")
        return read_json(path.with_suffix(".json"))

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, metadata) of one checkpoint; one line if missing or damaged."""
        from safetensors.torch import load_file

        path = self.checkpoint_path(name)
        meta = self.checkpoint_meta(name)
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise RunDirError(f"{path} is damaged or truncated ({exc}); "
                              "it cannot be read") from None
        return tensors, meta

    def drop_checkpoint(self, name: str) -> None:
        with writing(self.checkpoint_path(name)):
            self.checkpoint_path(name).unlink(missing_ok=True)
            self.checkpoint_path(name).with_suffix(".json").unlink(missing_ok=True)

    def checkpoint_names(self) -> list[str]:
        folder = self.path / CHECKPOINT_DIR
        return sorted(p.stem for p in folder.glob("*.safetensors")
                      if p.stem != RESUME_CHECKPOINT) if folder.is_dir() else []

    # -- figures and live loggers ---------------------------------------------------------

    @property
    def figures_dir(self) -> Path:
        return self.path / FIGURES_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def wandb_dir(self) -> Path:
        """The folder wandb writes its files into (it is handed the run directory and
        names this sub-folder itself)."""
        return self.path / WANDB_DIR

    def logger_state(self) -> dict[str, Any]:
        """What a live logger saved to continue after a resume (the W&B run id), or {}."""
        path = self.path / LOGGER_FILE
        return dict(read_json(path)) if path.exists() else {}

    def write_logger_state(self, state: dict[str, Any]) -> None:
        write_json(self.path / LOGGER_FILE, state)

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE


def write_figures(folder: Path, files: dict[str, bytes]) -> None:
    """Write a report's figure files into ``folder/figures/`` and remove the ones an
    earlier report wrote that are not among them. Never through a link: a ``figures``
    that is a symbolic link (or not a folder) is refused, each file is written to a
    temporary name and renamed over whatever is at its path (a link there is replaced,
    its target untouched), and only the files listed in the manifest the report itself
    wrote are ever deleted (a user's own files in ``figures/`` stay)."""
    target = folder / FIGURES_DIR
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        what = "a symbolic link" if target.is_symlink() else "not a folder"
        raise RunDirError(f"{target} is {what}; escapelab writes figures only into a "
                          "folder of its own there (move it away and run the report again)")
    with writing(target):
        target.mkdir(exist_ok=True)
    manifest = folder / FIGURES_MANIFEST
    earlier: list[str] = []
    if manifest.is_file() and not manifest.is_symlink():
        with contextlib.suppress(OSError, ValueError, RunDirError):
            names = json.loads(manifest.read_text()[:1_000_000])
            earlier = [n for n in names if isinstance(n, str) and _plain_name(n)] \
                if isinstance(names, list) else []
    for name, data in files.items():
        if not _plain_name(name):
            raise RunDirError(f"refusing to write figure {name!r}: not a plain file name")
        _atomic_write(target / name, _bytes_writer(data))
    for name in earlier:
        if name not in files:  # a figure the data no longer supports is not kept
            with writing(target / name):
                (target / name).unlink(missing_ok=True)
    write_json(manifest, sorted(files))


def _bytes_writer(data: bytes) -> Callable[[Path], Any]:
    return lambda tmp: tmp.write_bytes(data)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _first_existing(path: Path) -> Path:
    for parent in [path, *path.absolute().parents]:
        if parent.exists():
            return parent
    return Path("/")


def kind_of(path: Path) -> Literal["run", "sweep", "lr-range", "study"] | None:
    """What escapelab folder `path` is, by the files it holds."""
    if (path / STUDY_FILE).exists():
        return "study"
    if (path / SWEEP_FILE).exists():
        return "sweep"
    if (path / LR_RANGE_JSON).exists():
        return "lr-range"
    if (path / CONFIG_FILE).exists() and (path / "metrics").is_dir():
        return "run"
    return None


# -- sweep and LR range folders -------------------------------------------------------------


class SweepDir:
    """A sweep folder: sweep.json, runs/<point>/, failures/<point>.json, runs.csv,
    table.csv, slurm/."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def run(self, name: str) -> RunDir:
        return RunDir(self.path / SWEEP_RUNS_DIR / name)

    def run_path(self, name: str) -> Path:
        return self.path / SWEEP_RUNS_DIR / name

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.path / SWEEP_FILE, meta)

    def meta(self) -> dict[str, Any]:
        return dict(read_json(self.path / SWEEP_FILE))

    def failure_path(self, name: str) -> Path:
        return self.path / SWEEP_FAILURES_DIR / f"{name}.json"

    def write_failure(self, name: str, error: str) -> None:
        write_json(self.failure_path(name), {"status": "failed", "error": error})

    def clear_failure(self, name: str) -> None:
        self.failure_path(name).unlink(missing_ok=True)

    def failure(self, name: str) -> dict[str, Any] | None:
        path = self.failure_path(name)
        return dict(read_json(path)) if path.exists() else None

    def write_tables(self, runs_csv: str, table_csv: str) -> None:
        atomic_write_text(self.path / SWEEP_RUNS_CSV, runs_csv)
        atomic_write_text(self.path / SWEEP_TABLE_CSV, table_csv)

    def tables(self) -> dict[str, Path]:
        return {name: self.path / name for name in (SWEEP_TABLE_CSV, SWEEP_RUNS_CSV)}

    @property
    def slurm_dir(self) -> Path:
        return self.path / SLURM_DIR


class RangeDir:
    """An LR range test folder: lr_range.csv, lr_range.json and runs/<curve>-s<seed>/."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def run(self, curve: str, seed: int) -> RunDir:
        return RunDir(self.path / SWEEP_RUNS_DIR / f"{curve}-s{seed}")

    def write(self, csv_text: str, payload: dict[str, Any]) -> None:
        atomic_write_text(self.path / LR_RANGE_CSV, csv_text)
        write_json(self.path / LR_RANGE_JSON, payload)

    def payload(self) -> dict[str, Any]:
        return dict(read_json(self.path / LR_RANGE_JSON))

    @property
    def csv_path(self) -> Path:
        return self.path / LR_RANGE_CSV

    @property
    def json_path(self) -> Path:
        return self.path / LR_RANGE_JSON


class StudyDir:
    """A study folder (escapelab.study): study.json (the plan, each part's state and
    wall time), one folder per part (an LR range test folder, three sweep folders),
    claims.json, report.html and figures/. Written by one process at a time (.lock)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def part_path(self, part: str) -> Path:
        return self.path / part

    def state(self) -> dict[str, Any] | None:
        path = self.path / STUDY_FILE
        return dict(read_json(path)) if path.exists() else None

    def write_state(self, state: dict[str, Any]) -> None:
        write_json(self.path / STUDY_FILE, state)

    def claims(self) -> dict[str, Any] | None:
        path = self.path / CLAIMS_FILE
        return dict(read_json(path)) if path.exists() else None

    def write_claims(self, payload: dict[str, Any]) -> None:
        write_json(self.path / CLAIMS_FILE, payload)

    @property
    def claims_path(self) -> Path:
        return self.path / CLAIMS_FILE


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a run: versions, git SHA of escapelab's source, device, threads."""
    import numpy
    import sklearn

    import escapelab

    env: dict[str, Any] = {
        "escapelab": escapelab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "tf32": tf32_state(),
        "git_sha": None,
        "git_dirty": None,
    }
    if device.type == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode == 0:
            env["git_sha"] = sha.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source,
                                   capture_output=True, text=True, timeout=5)
            env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return env


__all__ = ["RunDir", "SweepDir", "RangeDir", "StudyDir", "Status", "Summary", "SharpnessRecord",
           "RunLock", "config_digest", "config_changes"]
