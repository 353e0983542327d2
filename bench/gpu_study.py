"""Every GPU check of issue 18 in one call (<= 8 minutes on an H100-class card).

    # here, once: the Fashion-MNIST files and the wheels the GPU machine lacks
    mkdir -p bench/data/fashion-mnist && \\
        cp /usr/share/datasets/fashion-mnist/*.gz bench/data/fashion-mnist/
    pip download --python-version 3.12 --only-binary=:all: \\
        --platform manylinux2014_x86_64 -d bench/wheels pydantic
    # on the GPU machine (the device tool's `run`, carry=["bench/wheels", "bench/data"]):
    pip install -q --no-index --find-links bench/wheels pydantic && \\
        PYTHONPATH=src python bench/gpu_study.py --out $OUT
    # here, to test the script itself on the CPU at tiny sizes:
    .venv/bin/python bench/gpu_study.py --quick --out /tmp/gpu_study

Parts, each written to ``gpu_study.json`` with the card's name as soon as it is done (a
time-out keeps what was measured; a failing part records its error, the others go on):

- **flagship**: the paper's network on real images, end to end on the card: the
  ``fashion-mnist-vgg11`` preset (VGG11, Fashion-MNIST zero-padded to 32x32, B 256,
  N-MSE, eta 1e4, TF32 off) for 19,500 steps or as many as ``--train-budget-s`` allows at
  the step rate measured first (the number run is recorded), with its evaluations and a
  sparse sharpness schedule; then ``analyze`` at n = 10,000 test images over every tap
  (timed: the measurement issue 12 left open, k-means now in torch on the card), the
  report, and the claims a single run can answer (:func:`escapelab.claims.run_evidence`);
- **group_vgg**: three step sizes of that preset trained as one group (runs per process,
  :mod:`escapelab.group`, vmap turns convolutions into grouped ones) against one after the
  other, steps/s per run from the difference of two lengths (start-up cancels); records
  whether grouping is faster on this card (``sweep`` groups by default; if it is slower
  on GPUs, that is the measurement to decide by).

The data: ``data.root=bench/data`` (the four official IDX files under
``bench/data/fashion-mnist/``, ~30 MB), else Debian's ``/usr/share/datasets``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from escapelab.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import card, sync  # noqa: E402  (bench/gpu.py: the same card name and sync)

ROOT = Path(__file__).resolve().parent / "data"


def preset(quick: bool, *extra: str) -> list[str]:
    """The flagship preset's overrides; --quick narrows VGG11 8x on a 2,048-image subset
    with B 64 (a CPU test of the script)."""
    base = [f"data.root={ROOT}", "data.download=false"]
    if quick:
        base += ["model.width_mult=0.125", "data.subset=2048", "data.batch_size=64",
                 "probe.train_samples=500", "probe.test_samples=500",
                 "probe.eval_batch_size=500"]
    return [*base, *extra]


def _train(extra: list[str], out: Path, quick: bool) -> float:
    from escapelab.train import train

    cfg = load_config("fashion-mnist-vgg11", preset(quick, *extra))
    sync()
    t0 = time.perf_counter()
    train(cfg, out)
    sync()
    return time.perf_counter() - t0


def _rate(tmp: Path, quick: bool, short: int, long: int, tag: str) -> float | None:
    """Steps per second of the preset without evaluations, from two run lengths."""
    base = ["probe.enabled=false", "checkpoint.every=0"]
    walls = [_train([*base, f"train.steps={k}"], tmp / f"{tag}_{k}", quick)
             for k in (short, long)]
    extra = walls[1] - walls[0]
    return (long - short) / extra if extra > 0 else None


def flagship(quick: bool, tmp: Path, out: Path, budget_s: float, n: int) -> dict[str, Any]:
    from escapelab.analyze import analyze
    from escapelab.claims import evaluate, run_evidence
    from escapelab.config import AnalysisOptions
    from escapelab.report import write_report
    from escapelab.store import RunDir

    rate = _rate(tmp, quick, *((5, 25) if quick else (40, 240)), tag="rate")
    steps = 19500 if rate is None else max(200, min(19500, int(rate * budget_s)))
    if quick:
        steps = 120
    run = out / "flagship_run"
    extra = [f"train.steps={steps}", "sharpness.enabled=true", "sharpness.log_until=200",
             "sharpness.log_points=10", "sharpness.every=2000"]
    if quick:
        extra += ["probe.log_until=20", "probe.log_points=5", "probe.every=60",
                  "sharpness.every=60", "sharpness.log_until=20", "sharpness.log_points=4",
                  "checkpoint.every=0"]
    result: dict[str, Any] = {"steps_per_s_measured": rate, "steps": steps,
                              "paper_steps": 19500}
    train_s = _train(extra, run, quick)
    summary = RunDir(run).summary()
    result.update(train_s=train_s, summary={k: getattr(summary, k) for k in (
        "status", "teacher_probe_acc", "min_probe_acc", "final_probe_acc", "gain",
        "escape_step", "collapse_step", "erank_teacher", "erank_collapse", "erank_final",
        "recovery_step", "lambda0", "eta_lambda0", "lambda_final")} if summary else None)
    _save_partial(out, "flagship", result)
    sync()
    t0 = time.perf_counter()
    analysis = analyze(run, AnalysisOptions(samples=n, probe_samples=min(n, 10000)))
    sync()
    result["analyze_s"] = time.perf_counter() - t0
    result["analyze_n"] = n
    result["analyze_taps"] = len(analysis.layers)
    _save_partial(out, "flagship", result)
    t0 = time.perf_counter()
    write_report(run)
    result["report_s"] = time.perf_counter() - t0
    result["claims"] = [{"id": c.id, "figure": c.figure, "verdict": c.verdict,
                         "value": c.value} for c in evaluate(run_evidence(run))
                        if c.verdict != "not measured"]
    return result


def group_vgg(quick: bool, tmp: Path) -> dict[str, Any]:
    from escapelab.group import train_group

    short, long = (3, 13) if quick else (20, 120)
    lrs = (1e3, 1e4, 3e4)
    base = ["probe.enabled=false", "checkpoint.every=0"]
    sequential = 0.0
    for lr in lrs:
        walls = [_train([*base, f"optim.lr={lr}", f"train.steps={k}"], tmp / f"seq_{lr}_{k}",
                        quick) for k in (short, long)]
        sequential += walls[1] - walls[0]
    grouped = []
    for k in (short, long):
        cfgs = [load_config("fashion-mnist-vgg11", preset(quick, *base, f"optim.lr={lr}",
                                                           f"train.steps={k}")) for lr in lrs]
        sync()
        t0 = time.perf_counter()
        train_group(cfgs, [tmp / f"group_{lr}_{k}" for lr in lrs])
        sync()
        grouped.append(time.perf_counter() - t0)
    together = grouped[1] - grouped[0]
    steps = long - short
    out: dict[str, Any] = {"runs": len(lrs), "steps": steps, "sequential_s": sequential,
                           "group_s": together}
    if sequential > 0 and together > 0:
        out.update(sequential_steps_per_s=len(lrs) * steps / sequential,
                   group_steps_per_s=len(lrs) * steps / together,
                   speedup=sequential / together, group_is_faster=together < sequential)
    else:
        out["note"] = "a longer run was not slower: start-up noise exceeds the steps' time"
    return out


def _save_partial(out: Path, name: str, value: dict[str, Any]) -> None:
    path = out / "gpu_study.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    result[name] = {"card": card(), **value, "partial": True}
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU test)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    p.add_argument("--only", default="", help="comma-separated parts: flagship, group_vgg")
    p.add_argument("--train-budget-s", type=float, default=240.0,
                   help="seconds of training the flagship run may take (its steps follow "
                   "from the measured step rate, at most the paper's 19,500)")
    p.add_argument("--samples", type=int, default=None,
                   help="analyze's test images (default 10,000; --quick 500)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # escape runs keep TF32 off
    path = args.out / "gpu_study.json"
    result: dict[str, Any] = {"card": card(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "quick": args.quick,
                              "measured": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(result, indent=1) + "\n")
    n = args.samples or (500 if args.quick else 10000)
    parts: dict[str, Callable[[bool, Path], dict[str, Any]]] = {
        "flagship": lambda q, t: flagship(q, t, args.out, args.train_budget_s, n),
        "group_vgg": group_vgg}
    only = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory(prefix="escapelab_gpu_study_") as tmp:
        for name, part in parts.items():
            if only and name not in only:
                continue
            print(f"{name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                value = {"card": card(), **part(args.quick, Path(tmp))}
            except Exception:  # one part's failure must not lose the others
                value = {"card": card(), "error": traceback.format_exc()}
            value["part_s"] = time.perf_counter() - t0
            result = {**json.loads(path.read_text()), name: value}
            print(json.dumps(value, default=str)[:600], flush=True)
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
