"""Run directories: the only bridge between computing results and reading them.

Layout of a run directory::

    config.yaml              the resolved config, exactly as validated (never edited)
    derived.json             values that follow from config + data (steps per epoch ...)
    environment.json         package versions, git SHA, device, threads
    init.json                realized teacher -> student offset
    status.json              running / interrupted / completed / diverged, last step
    metrics/steps.jsonl      one line per SGD step
    metrics/evals.jsonl      one line per evaluation (teacher once, student on schedule)
    checkpoints/T|C|S|step_<k>.safetensors + .json   weights + metadata
    checkpoints/last.safetensors + .json             resumable training state
    summary.json             written last: its presence means the run finished

JSON and checkpoint files are written to a temporary name and renamed into place, so
a reader never sees a half-written file and an interrupted run never has a
summary.json. Non-finite floats are written as null.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from escapelab.errors import RunDirError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
STEPS_FILE = "metrics/steps.jsonl"
EVALS_FILE = "metrics/evals.jsonl"


def clean(obj: Any) -> Any:
    """Recursively replace non-finite floats by None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn last line (killed mid-write) is ignored."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


class RunDir:
    """A run directory on disk."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def ensure_free(cls, path: Path | str, overwrite: bool = False) -> None:
        """Raise unless `path` is absent, empty, or a run directory we may overwrite."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise RunDirError(f"{run.path} exists and is not a directory")
        if run.path.exists() and any(run.path.iterdir()):
            if not (run.path / CONFIG_FILE).is_file():
                raise RunDirError(f"{run.path} exists, is not empty and is not a run "
                                  "directory; choose another --out")
            if not overwrite:
                state = run.status().get("status", "unknown")
                raise RunDirError(f"{run.path} already holds a run (status: {state}); choose "
                                  "another --out, pass --overwrite, or --resume it")

    @classmethod
    def create(cls, path: Path | str, overwrite: bool = False) -> RunDir:
        """A new, empty run directory; refuses to mix with an existing run."""
        cls.ensure_free(path, overwrite)
        run = cls(path)
        if run.path.exists():
            shutil.rmtree(run.path)
        (run.path / "metrics").mkdir(parents=True)
        (run.path / "checkpoints").mkdir()
        return run

    @classmethod
    def open(cls, path: Path | str) -> RunDir:
        run = cls(path)
        if not (run.path / CONFIG_FILE).is_file():
            raise RunDirError(f"{run.path} is not a run directory (no {CONFIG_FILE})")
        return run

    def status(self) -> dict[str, Any]:
        path = self.path / "status.json"
        return read_json(path) if path.exists() else {}

    def set_status(self, status: str, **fields: Any) -> None:
        write_json(self.path / "status.json", {"status": status, **fields})

    @property
    def finished(self) -> bool:
        return (self.path / SUMMARY_FILE).exists()

    # -- files --------------------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def read_json(self, name: str) -> Any:
        path = self.path / name
        if not path.exists():
            raise RunDirError(f"{path} is missing")
        return read_json(path)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def append_jsonl(self, name: str, records: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(clean(r), allow_nan=False) + "\n" for r in records)
        if lines:
            with (self.path / name).open("a") as f:
                f.write(lines)

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        return read_jsonl(self.path / name)

    def truncate_jsonl(self, name: str, keep: Any) -> None:
        """Keep only the records for which ``keep(record)`` is true (used on resume)."""
        records = [r for r in self.read_jsonl(name) if keep(r)]
        atomic_write_text(self.path / name,
                          "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))

    # -- checkpoints --------------------------------------------------------------------

    def checkpoint_path(self, name: str) -> Path:
        return self.path / "checkpoints" / f"{name}.safetensors"

    def save_checkpoint(self, name: str, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any]) -> None:
        """Weights as safetensors plus a JSON sidecar, both written atomically."""
        path = self.checkpoint_path(name)
        tmp = path.with_name(f".{path.name}.tmp")
        contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(contiguous, str(tmp), metadata={"name": name, "format": "escapelab"})
        os.replace(tmp, path)
        write_json(path.with_suffix(".json"), {"name": name, **meta})

    def load_checkpoint(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        path = self.checkpoint_path(name)
        if not path.exists():
            raise RunDirError(f"checkpoint {name!r} not found in {self.path / 'checkpoints'}")
        return load_file(str(path)), read_json(path.with_suffix(".json"))

    def checkpoint_names(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "checkpoints").glob("*.safetensors")
                      if p.stem != "last")


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
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
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
