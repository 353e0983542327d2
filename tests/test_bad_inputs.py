"""Every bad input a user can give gets one clear line: exit code 2, exactly one error
line naming the problem, no traceback, and nothing that looks like a finished run."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import finished_and_interrupted, tiny_overrides

CLI = [sys.executable, "-m", "escapelab"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run and an interrupted (resumable) one, copied per case."""
    root = tmp_path_factory.mktemp("bad")
    finished_and_interrupted(root)
    (root / "nocheckpoints").mkdir()
    shutil.copytree(root / "finished", root / "nocheckpoints" / "run")
    for f in (root / "nocheckpoints" / "run" / "checkpoints").iterdir():
        f.unlink()
    return root


def _copy(runs, name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(runs / name, dest)
    return dest


def _truncated_cifar(tmp_path):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        data = b"x" * 200_000
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(payload.getvalue()[:3000])
    return root


def _cases(tmp, runs):
    """(name, args, text the error line must contain, folders that must not look
    finished afterwards)."""
    out = tmp / "out"
    bad_yaml = tmp / "broken.yaml"
    bad_yaml.write_text("optim: {lr: [1, 2\n")
    not_utf8 = tmp / "latin1.yaml"
    not_utf8.write_bytes("name: caf\xe9\n".encode("latin-1"))
    a_list = tmp / "list.yaml"
    a_list.write_text("- optim.lr\n")
    a_file = tmp / "a-file"
    a_file.write_text("x")
    stranger = tmp / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    spec = tmp / "spec.yaml"
    spec.write_text("name: s\nbase: digits\ngrid: {seed: [0]}\npaper:\n  grdi: {seed: [0]}\n")
    empty_ckpt = _copy(runs, "interrupted", tmp / "c1")
    (empty_ckpt / "checkpoints/last.json").write_text("")
    cut_ckpt = _copy(runs, "interrupted", tmp / "c2")
    data = (cut_ckpt / "checkpoints/last.safetensors").read_bytes()
    (cut_ckpt / "checkpoints/last.safetensors").write_bytes(data[:len(data) // 2])
    no_sidecar = _copy(runs, "interrupted", tmp / "c3")
    (no_sidecar / "checkpoints/last.json").unlink()
    edited = _copy(runs, "interrupted", tmp / "c4")
    text = (edited / "config.yaml").read_text()
    (edited / "config.yaml").write_text(text.replace("lr: 30000.0", "lr: 100.0"))
    bad_s = _copy(runs, "finished", tmp / "c5")
    data = (bad_s / "checkpoints/S.safetensors").read_bytes()
    (bad_s / "checkpoints/S.safetensors").write_bytes(data[:40])
    bad_summary = _copy(runs, "finished", tmp / "c6")
    (bad_summary / "summary.json").write_text('{"status": "compl')
    finished = _copy(runs, "finished", tmp / "c7")
    bad_sidecar = _copy(runs, "finished", tmp / "c8")
    (bad_sidecar / "checkpoints/T.json").write_text("{not json")
    nockpt = runs / "nocheckpoints" / "run"
    gz = tmp / "mnist"
    gz.mkdir()
    (gz / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03")[:10])
    cifar = _truncated_cifar(tmp)
    return [
        ("unknown key", ["run", "--out", str(out), "data.batchsize=3"],
         "did you mean 'data.batch_size'", [out]),
        ("key in the wrong section", ["run", "--out", str(out), "data.lr=3"],
         "did you mean 'optim.lr'", [out]),
        ("negative step size", ["run", "--out", str(out), "optim.lr=-5"], "optim.lr", [out]),
        ("unknown loss", ["run", "--out", str(out), "loss.name=huber"], "loss.name", [out]),
        ("seed wraps", ["run", "--out", str(out), "seed=18446744073709551616"], "seed:",
         [out]),
        ("negative seed", ["run", "--out", str(out), "seed=-1"], "seed:", [out]),
        ("negative split seed", ["run", "--out", str(out), "data.split_seed=-1"],
         "data.split_seed", [out]),
        ("float teacher seed", ["run", "--out", str(out), "init.teacher_seed=1e23"],
         "init.teacher_seed", [out]),
        ("zero steps", ["run", "--out", str(out), "train.steps=0"], "train.steps", [out]),
        ("zero batch", ["run", "--out", str(out), "data.batch_size=0"], "data.batch_size",
         [out]),
        ("nesterov without momentum", ["run", "--out", str(out), "optim.nesterov=true"],
         "nesterov", [out]),
        ("micro batch above batch", ["run", "--out", str(out), "data.batch_size=10",
                                     "data.micro_batch_size=100"], "micro_batch_size", [out]),
        ("override without =", ["run", "--out", str(out), "optim.lr"], "key=value", [out]),
        ("unknown preset", ["run", "--preset", "nope", "--out", str(out)], "unknown preset",
         [out]),
        ("non-UTF-8 preset", ["run", "--preset", str(not_utf8), "--out", str(out)],
         "not UTF-8", [out]),
        ("broken YAML preset", ["run", "--preset", str(bad_yaml), "--out", str(out)],
         "not valid YAML", [out]),
        ("preset not a mapping", ["run", "--preset", str(a_list), "--out", str(out)],
         "mapping", [out]),
        # Configs that pass validation create their folder before the data fail: each
        # its own (two cases run at once, and a folder being started is locked).
        ("missing CIFAR", ["run", "--out", str(tmp / "d1" / "out"), "data.name=cifar10",
                           f"data.root={tmp / 'nothing'}", "data.download=false"],
         "cifar-10-python.tar.gz", [tmp / "d1" / "out"]),
        ("truncated CIFAR", ["run", "--out", str(tmp / "d2" / "out"), "data.name=cifar10",
                             f"data.root={cifar}", "data.download=false",
                             "data.verify_md5=false"], "cifar-10-python.tar.gz",
         [tmp / "d2" / "out"]),
        ("truncated IDX", ["run", "--out", str(tmp / "d3" / "out"), "data.name=mnist",
                           f"data.root={gz}", "data.download=false", "data.verify_md5=false"],
         "train-images-idx3-ubyte", [tmp / "d3" / "out"]),
        ("missing npz", ["run", "--out", str(tmp / "d4" / "out"), "data.name=npz",
                         f"data.path={tmp / 'none.npz'}"], "none.npz", [tmp / "d4" / "out"]),
        ("out is a file", ["run", "--out", str(a_file), *tiny_overrides()],
         "not a directory", []),
        ("out holds other files", ["run", "--out", str(stranger), *tiny_overrides()],
         "not a run directory", [stranger]),
        ("out cannot be created", ["run", "--out", "/proc/escapelab-test/run",
                                   *tiny_overrides()], "/proc", []),
        ("out holds a run", ["run", "--out", str(finished), *tiny_overrides()],
         "already holds a run", []),
        ("resume a stranger", ["run", "--resume", str(stranger)], "not a run directory",
         [stranger]),
        ("resume a finished run", ["run", "--resume", str(finished)], "nothing to resume",
         []),
        ("resume: empty last.json", ["run", "--resume", str(empty_ckpt)], "last.json is empty",
         [empty_ckpt]),
        ("resume: truncated checkpoint", ["run", "--resume", str(cut_ckpt)],
         "damaged or truncated", [cut_ckpt]),
        ("resume: missing sidecar", ["run", "--resume", str(no_sidecar)], "last.json is missing",
         [no_sidecar]),
        ("resume: edited config", ["run", "--resume", str(edited)], "optim.lr", [edited]),
        ("resume with overrides", ["run", "--resume", str(edited), "seed=3"], "drop --out",
         [edited]),
        ("analyze: truncated checkpoint", ["analyze", str(bad_s), "--no-probe"],
         "damaged or truncated", []),
        ("analyze: damaged sidecar", ["analyze", str(bad_sidecar), "--no-probe"],
         "T.json is damaged", []),
        ("analyze: no checkpoints", ["analyze", str(nockpt)], "no checkpoints", []),
        ("analyze: unknown layer", ["analyze", str(finished), "--layers", "conv9"],
         "unknown layers", []),
        ("analyze: too few samples", ["analyze", str(finished), "--samples", "1"],
         "--samples", []),
        ("report: damaged summary", ["report", str(bad_summary)], "summary.json is damaged",
         []),
        ("report: a stranger", ["report", str(stranger)], "not a run directory", []),
        ("sweep: typo in the paper section", ["sweep", str(spec), "--out", str(out)],
         "paper.grdi", [out]),
        ("sweep: unknown grid key", ["sweep", "--grid", "optim.lrr=1,2", "--out", str(out)],
         "optim.lrr", [out]),
        ("lr-range: bad seeds", ["lr-range", "--seeds", "a,b", "--out", str(out)], "--seeds",
         [out]),
        ("lr-range: reversed range", ["lr-range", "--start", "10", "--end", "1", "--out",
                                      str(out)], "start_lr < end_lr", [out]),
        ("status of a stranger", ["status", str(stranger)], "not a run directory", []),
    ]


def test_every_bad_input_is_one_clear_line(runs, tmp_path):
    cases = _cases(tmp_path, runs)
    assert len(cases) >= 25

    def run(case):
        return subprocess.run([*CLI, *case[1]], capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, cases))
    for (name, _, needle, not_finished), result in zip(cases, results, strict=True):
        errors = [line for line in result.stderr.splitlines()
                  if line.startswith("escapelab: error:")]
        assert result.returncode == 2, (name, result.returncode, result.stderr)
        assert len(errors) == 1, (name, result.stderr)
        assert needle in errors[0], (name, needle, errors[0])
        assert "Traceback" not in result.stderr + result.stdout, name
        for folder in not_finished:
            assert not (folder / "summary.json").exists(), name
            if folder.name == "out":
                assert not folder.exists(), (name, "a bad input left a folder behind")
    # The finished run that was in the way is untouched.
    summary = json.loads((tmp_path / "c7" / "finished" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_debug_shows_the_traceback(tmp_path):
    result = subprocess.run([*CLI, "--debug", "run", "--out", str(tmp_path / "o"),
                             "optim.lr=-5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert "escapelab: error: invalid config: optim.lr" in result.stderr
