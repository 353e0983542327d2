"""Live loggers mirror the run directory: TensorBoard's and W&B's own files, read back
with their own readers, hold exactly the series of metrics/steps.jsonl, evals.jsonl and
summary.json; a resumed run has one value per step; a missing package is one line at
start-up. The TensorBoard and W&B tests skip where those packages are not installed
(pip install 'escapelab[test]' brings them)."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import escapelab.recorder
from conftest import interrupt_at, tiny_overrides
from escapelab.cli import cli
from escapelab.config import load_config
from escapelab.errors import EscapelabError, RunDirError, RunInterrupted
from escapelab.loggers import NullLogger, export_tensorboard
from escapelab.recorder import NullRecorder
from escapelab.store import RunDir
from escapelab.train import resume, train

Series = dict[str, list[tuple[int, float]]]


def expected_series(run: RunDir, summary: bool = True) -> Series:
    """What a mirror of `run` must hold, built from its files: train/<field> per step
    record, teacher/<field> at step 0, eval/<field> per student evaluation and
    summary/<field> at the last step; nulls (non-finite values) left out."""
    series: Series = defaultdict(list)
    for record in run.steps():
        for key, value in record.items():
            if key != "step" and value is not None:
                series[f"train/{key}"].append((record["step"], value))
    for record in run.evals():
        prefix = {"teacher": "teacher", "student": "eval"}[record["model"]]
        for key, value in record.items():
            if key not in ("step", "model") and value is not None:
                series[f"{prefix}/{key}"].append((record["step"], value))
    done = run.summary()
    if summary and done is not None:
        for key, value in done.model_dump().items():
            if isinstance(value, int | float):
                series[f"summary/{key}"].append((done.steps_completed, value))
    return dict(series)


def as_float32(series: Series) -> Series:
    return {tag: [(step, float(np.float32(v))) for step, v in values]
            for tag, values in series.items()}


# ---------------------------------------------------------------------------------------
# TensorBoard


def tensorboard_series(folder: Path) -> Series:
    """The scalars TensorBoard shows for `folder` (its own reader, purges applied)."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def raw_steps(folder: Path, tag: str) -> list[int]:
    """Every step written for `tag` in the event files, before any purge."""
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in loader.EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    out = tmp_path_factory.mktemp("tb") / "run"
    train(load_config("digits", tiny_overrides(logger="tensorboard")), out)
    return RunDir(out)


def test_tensorboard_mirrors_steps_evals_and_summary(tensorboard_run):
    run = tensorboard_run
    shown = tensorboard_series(run.tensorboard_dir)
    expected = as_float32(expected_series(run))
    assert shown == expected
    assert [step for step, _ in shown["train/loss"]] == list(range(1, 61))
    assert shown["teacher/probe_acc"] == [(0, float(np.float32(run.teacher_eval()["probe_acc"])))]


def test_export_writes_the_series_a_live_logger_writes(tensorboard_run, tmp_path):
    run = tensorboard_run
    result = CliRunner().invoke(cli, ["export", str(run.path), "--to", "tensorboard",
                                      "--out", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'tb'}" in result.output
    assert tensorboard_series(tmp_path / "tb") == tensorboard_series(run.tensorboard_dir)
    # Into the run's own folder: refused while the live files are there, then replaced.
    with pytest.raises(RunDirError, match="already holds 1 event file.*--overwrite"):
        export_tensorboard(run.path)
    export_tensorboard(run.path, overwrite=True)
    assert len(list(run.tensorboard_dir.iterdir())) == 1
    assert tensorboard_series(run.tensorboard_dir) == as_float32(expected_series(run))


def test_export_of_a_stopped_run_has_no_summary(tensorboard_run, tmp_path):
    pytest.importorskip("tensorboardX")
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tensorboard_run.path, copy, ignore=shutil.ignore_patterns("tensorboard"))
    (copy / "summary.json").unlink()
    folder = export_tensorboard(copy)
    shown = tensorboard_series(folder)
    assert not any(tag.startswith("summary/") for tag in shown)
    assert shown == as_float32(expected_series(RunDir(copy)))


def test_resumed_run_has_one_value_per_step(tiny_config, tmp_path, monkeypatch):
    """The process dies 15 steps after its last checkpoint, every step already mirrored
    (flushed each step): resume recomputes them, and TensorBoard shows each step once,
    the recomputed value."""
    pytest.importorskip("tensorboardX")
    monkeypatch.setattr(escapelab.recorder, "FLUSH_EVERY", 1)
    cfg = tiny_config(logger="tensorboard", **{"checkpoint.every": 30})

    def crash(step, total, info):
        if step == 45:
            raise RuntimeError("the node died")

    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "r", progress=crash)
    run = RunDir(tmp_path / "r")
    assert run.status().resumable and len(run.steps()) == 45
    resume(tmp_path / "r")
    assert len(list(run.tensorboard_dir.glob("events.out.tfevents.*"))) == 2
    shown = tensorboard_series(run.tensorboard_dir)
    assert shown == as_float32(expected_series(run))
    assert [step for step, _ in shown["train/loss"]] == list(range(1, 61))
    assert [step for step, _ in shown["eval/wall_s"]] == [0, 1, 2, 3, 6, 10, 20, 40, 60]
    # Steps 31..45 and the evaluation at 40 are in both files; the purge hides the first.
    assert sorted(raw_steps(run.tensorboard_dir, "train/loss")) == sorted(
        [*range(1, 61), *range(31, 46)])
    assert raw_steps(run.tensorboard_dir, "eval/wall_s").count(40) == 2


# ---------------------------------------------------------------------------------------
# Weights & Biases, offline


def wandb_records(path: Path):
    """The records of an offline W&B run file (run-<id>.wandb), parsed with wandb's own
    protobuf classes (wandb itself no longer reads it back in Python). The file is a
    LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of chunks, each
    with a 7-byte header (CRC32, length uint16 LE, type 1 full / 2 first / 3 middle /
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled rest of a block
            pos += block - pos % block
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def wandb_history(run: RunDir) -> tuple[Series, dict[str, object]]:
    """Every offline W&B run of `run` in start order, merged as W&B merges a resumed run:
    the first value of a step counts (W&B accepts increasing steps only). Returns the
    series and the run's summary."""
    seen: dict[str, dict[int, float]] = defaultdict(dict)
    summary: dict[str, object] = {}
    for path in sorted(run.wandb_dir.glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                step = record.history.step.num
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        seen[key].setdefault(step, json.loads(item.value_json))
            elif kind == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(
                        item.value_json)
    return {k: sorted(v.items()) for k, v in seen.items()}, summary


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                        "WANDB_DIR": str(tmp_path / "wandb-dir"),
                        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
                        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
                        "WANDB_ERROR_REPORTING": "false"}.items():
        monkeypatch.setenv(name, value)


def test_offline_wandb_run_holds_the_same_series_across_a_resume(tiny_config, tmp_path,
                                                                  wandb_offline):
    cfg = tiny_config(logger="wandb", **{"checkpoint.every": 30})

    interrupt = interrupt_at(45)

    with pytest.raises(RunInterrupted):
        train(cfg, tmp_path / "r", progress=interrupt)
    summary = resume(tmp_path / "r")
    run = RunDir(tmp_path / "r")
    folders = sorted(run.wandb_dir.glob("offline-run-*"))
    run_id = run.logger_state()["wandb_id"]
    # W&B adds "-1" to the second folder when both processes start within one second
    assert len(folders) == 2 and all(re.search(f"-{run_id}(-[0-9]+)?$", f.name)
                                     for f in folders)
    history, wandb_summary = wandb_history(run)
    assert history == expected_series(run, summary=False)  # float64, exactly
    for key, value in summary.model_dump().items():
        if value is not None:
            assert wandb_summary[key] == value, key
    # the resumed process logged from the step after its checkpoint on
    resumed = [r.history.step.num for r in wandb_records(next(folders[1].glob("*.wandb")))
               if r.WhichOneof("record_type") == "history"]
    assert resumed == list(range(46, 61))


# ---------------------------------------------------------------------------------------
# Without the packages, and ranks that do not write


@pytest.mark.parametrize("name,module", [("tensorboard", "tensorboardX"),
                                         ("wandb", "wandb")])
def test_missing_package_is_one_line_before_anything_is_built(tiny_config, tmp_path,
                                                              monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails

    def no_build(cfg):
        raise AssertionError("data and model were built")

    monkeypatch.setattr("escapelab.train.build", no_build)
    with pytest.raises(EscapelabError) as caught:
        train(tiny_config(logger=name), tmp_path / "r")
    message = str(caught.value)
    assert message == f"logger.name={name} needs the {module} package: pip install " \
        f"'escapelab[{name}]'"
    assert not (tmp_path / "r").exists()


def test_export_refuses_a_folder_that_is_not_a_run_and_a_missing_package(
        tiny_config, tmp_path, monkeypatch):
    result = subprocess.run([sys.executable, "-m", "escapelab", "export", str(tmp_path),
                             "--to", "tensorboard"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr == f"escapelab: error: {tmp_path} is not a run directory " \
        "(escapelab run writes one)\n"
    run = RunDir(tmp_path / "r")  # the files a run directory is known by, no training
    run.path.mkdir()
    run.write_config(tiny_config())
    (run.path / "metrics").mkdir()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(EscapelabError, match=r"^escapelab export --to tensorboard needs the "
                       r"tensorboardX package: pip install 'escapelab\[tensorboard\]'$"):
        export_tensorboard(run.path)
    assert not run.tensorboard_dir.exists()


def test_ranks_that_do_not_write_mirror_nothing():
    class Spy(NullLogger):
        calls: list[str] = []

        def log_steps(self, records):
            self.calls.append("steps")

        def log_eval(self, record):
            self.calls.append("eval")

    recorder = NullRecorder(10)
    recorder.mirror_to(Spy())
    recorder.log_step({"step": 1, "loss": 0.5})
    recorder.flush()
    recorder.log_eval({"model": "student", "step": 1})
    recorder.close()
    assert Spy.calls == []
