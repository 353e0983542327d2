"""Every GPU check of issue 12 in one call, for the short time a GPU machine is lent.

    # here, once: wheels the GPU machine lacks (it has torch, numpy, scikit-learn,
    # safetensors, matplotlib, rich, click, pyyaml; not pydantic), built for its Python
    pip download --python-version 3.12 --only-binary=:all: \\
        --platform manylinux2014_x86_64 -d bench/wheels pydantic
    # on the GPU machine (the device tool's `run`, carry=["bench/wheels"]):
    pip install -q --no-index --find-links bench/wheels pydantic && \\
        PYTHONPATH=src python bench/gpu.py --out $OUT
    # here, to test the script itself on the CPU at tiny sizes:
    .venv/bin/python bench/gpu.py --quick --out /tmp/gpu

CIFAR-10 cannot be carried to that machine: the paper preset (``cifar10-vgg11``) runs on
synthetic images of CIFAR's shape (3x32x32, 10 classes, 50,000 training images).
Parts, each recorded with the card's name as soon as it is done (``gpu.json``), so that a
time-out keeps what was measured; a part that fails records its error and the others go
on:

- **matmul**: the card's float32 matmul rate with TF32 off (8192^2 products), TFLOP/s;
- **tf32**: the paper preset's first step with ``train.tf32`` off and on: the student's
  loss at step 1 (exactly 0 means the 1e-10 offset was erased) and the TF32 settings
  environment.json recorded;
- **paper_steps**: the paper preset's first few hundred steps: steps/s and images/s (the
  difference of two runs' wall times over the difference of their steps, which cancels
  start-up and write-up), the FLOPs of one step counted by
  :class:`torch.utils.flop_counter.FlopCounterMode`, and the fraction of the matmul rate
  they reach; the same with ``train.channels_last=true``;
- **group**: six digits runs (two seeds x three step sizes) trained as one group
  (runs per process, :mod:`escapelab.group`) vs one after the other, wall seconds;
- **probe**: one evaluation of the paper preset's evaluator at 10,000 x 512 (features,
  torch linear probe, kNN, spectra), seconds, after one untimed warm-up;
- **analyze**: ``escapelab analyze`` of a VGG11 run at n = 10,000 test images over every
  tap, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from escapelab.config import load_config
from escapelab.store import RunDir, read_jsonl

PAPER = ["data.name=synthetic", "data.synthetic.channels=3", "data.synthetic.size=32",
         "data.synthetic.n_classes=10", "train.epochs=null", "sharpness.enabled=false",
         "checkpoint.every=0", "checkpoint.every_minutes=0", "probe.train_samples=null"]


def paper(quick: bool, *extra: str) -> list[str]:
    """The paper preset's overrides; --quick narrows VGG11 8x (a CPU test of the script)."""
    return [*PAPER, *(["model.width_mult=0.125"] if quick else []), *extra]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def card() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no GPU)"


def matmul(quick: bool) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 1024 if quick else 8192
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b
    sync()
    reps = 3 if quick else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    seconds = (time.perf_counter() - t0) / reps
    return {"n": n, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def _train(overrides: list[str], out: Path, quick: bool) -> float:
    from escapelab.train import train

    cfg = load_config("cifar10-vgg11", paper(quick, *overrides))
    t0 = time.perf_counter()
    train(cfg, out)
    return time.perf_counter() - t0


def tf32(quick: bool, tmp: Path) -> dict[str, Any]:
    n = ["data.synthetic.n_train=512", "data.synthetic.n_test=256", "train.steps=1",
         "probe.enabled=false"]
    out: dict[str, Any] = {}
    for flag in (False, True):
        run = tmp / f"tf32_{flag}"
        _train([*n, f"train.tf32={str(flag).lower()}"], run, quick)
        first = read_jsonl(run / "metrics" / "steps.jsonl")[0]
        env = json.loads((run / "environment.json").read_text())
        out["on" if flag else "off"] = {"loss_step_1": first["loss"],
                                        "grad_norm_step_1": first["grad_norm"],
                                        "offset_erased": first["loss"] == 0.0,
                                        "environment": env.get("tf32")}
    return out


def paper_steps(quick: bool, tmp: Path) -> dict[str, Any]:
    size = ["data.synthetic.n_train=1024", "data.synthetic.n_test=256"] if quick else \
        ["data.synthetic.n_train=50000", "data.synthetic.n_test=1000"]
    short, long = (2, 6) if quick else (50, 350)
    out: dict[str, Any] = {"steps": long - short}
    for name, extra in (("default", []), ("channels_last", ["train.channels_last=true"])):
        base = [*size, "probe.enabled=false", *extra]
        walls = [_train([*base, f"train.steps={k}"], tmp / f"steps_{name}_{k}", quick)
                 for k in (short, long)]
        per_step = (walls[1] - walls[0]) / (long - short)
        out[name] = ({"seconds_per_step": per_step, "steps_per_s": 1 / per_step,
                      "images_per_s": 256 / per_step} if per_step > 0 else
                     {"seconds_per_step": None, "note": "the longer run was not slower: "
                      "start-up noise exceeds the extra steps' time (--quick)"})
    out["flops_per_step"] = _step_flops(quick)
    return out


def _step_flops(quick: bool) -> int:
    """FLOPs of one training step of the paper preset (teacher forward, student forward
    and backward), counted by PyTorch's FlopCounterMode on one batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from escapelab.losses import nmse
    from escapelab.models import build_model

    cfg = load_config("cifar10-vgg11", paper(quick, "train.steps=1"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, teacher = (build_model(cfg.model, (3, 32, 32), 512).to(device) for _ in range(2))
    x = torch.randn(256, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            t = teacher(x)
        nmse(model(x), t).backward()
    return int(counter.get_total_flops())


def group(quick: bool, tmp: Path) -> dict[str, Any]:
    from escapelab.group import train_group
    from escapelab.train import train

    steps = 50 if quick else 1000
    cfgs = [load_config("digits", [f"train.steps={steps}", "probe.enabled=false",
                                   "sharpness.enabled=false", "checkpoint.every=0",
                                   f"optim.lr={lr}", f"seed={seed}"])
            for seed in (0, 1) for lr in (1e3, 1e4, 3e4)]
    t0 = time.perf_counter()
    for i, cfg in enumerate(cfgs):
        train(cfg, tmp / f"alone_{i}")
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = train_group(cfgs, [tmp / f"group_{i}" for i in range(len(cfgs))])
    grouped = time.perf_counter() - t0
    escapes = [(RunDir(tmp / f"alone_{i}").summary().escape_step,
                getattr(r, "escape_step", None)) for i, r in enumerate(results)]
    return {"runs": len(cfgs), "steps": steps, "sequential_s": alone, "group_s": grouped,
            "speedup": alone / grouped, "escape_steps_alone_vs_group": escapes}


def probe(quick: bool, tmp: Path) -> dict[str, Any]:
    from escapelab.train import build

    n = 1000 if quick else 10000
    cfg = load_config("cifar10-vgg11", paper(quick, f"data.synthetic.n_train={n}",
                                             f"data.synthetic.n_test={n}", "train.steps=1",
                                             f"probe.train_samples={n}"))
    setup = build(cfg)
    setup.evaluator(setup.teacher)  # warm-up: kernels, allocator
    setup.evaluator.last_fit = None  # timed: a cold fit (a run's are warm-started)
    sync()
    t0 = time.perf_counter()
    record = setup.evaluator(setup.teacher)
    sync()
    return {"n_train": n, "n_test": n, "d": setup.student.feature_dim,
            "seconds": time.perf_counter() - t0, "probe_iter": record.get("probe_iter"),
            "probe_acc": record.get("probe_acc"), "device": str(setup.device)}


def analyze(quick: bool, tmp: Path, out: Path) -> dict[str, Any]:
    """`escapelab analyze` at n = 10,000 over every tap, with where its time goes: seconds
    per stage (features, spectra, separability, k-means, CKA, probe) and per checkpoint
    and tap, written to ``analyze_progress.json`` as it goes (a time-out keeps them)."""
    from unittest import mock

    import escapelab.analyze as module
    from escapelab.config import AnalysisOptions

    n = 500 if quick else 10000
    run = tmp / "analyze_run"
    _train([f"data.synthetic.n_train={max(n, 1024)}", f"data.synthetic.n_test={n}",
            "train.steps=20", "probe.enabled=false"], run, quick)
    stages: dict[str, float] = {}
    taps: list[list[Any]] = []
    progress_path = out / "analyze_progress.json"

    def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            t = time.perf_counter()
            value = fn(*args, **kwargs)
            sync()
            stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t
            return value
        return wrapper

    def progress(checkpoint: str, tap: str) -> None:
        taps.append([checkpoint, tap, time.perf_counter() - t0])
        progress_path.write_text(json.dumps({"n": n, "stages_s": stages, "taps": taps}))

    patches = [mock.patch.object(module, name, timed(stage, getattr(module, name)))
               for name, stage in (("_collect", "features"), ("_cka", "cka"),
                                   ("linear_probe_accuracy", "probe"),
                                   ("kmeans_labels", "kmeans"))]
    patches += [mock.patch.object(module.GramView, name,
                                  timed(name, getattr(module.GramView, name)))
                for name in ("singular_values", "fisher")]
    for patch in patches:
        patch.start()
    try:
        t0 = time.perf_counter()
        result = module.analyze(run, AnalysisOptions(samples=n, probe_samples=min(n, 5000)),
                                progress=progress)
        sync()
        seconds = time.perf_counter() - t0
    finally:
        for patch in patches:
            patch.stop()
    checkpoints = sorted({r["checkpoint"] for r in result.rows})
    taps_n = len({r["layer"] for r in result.rows})
    return {"n": n, "seconds": seconds, "stages_s": stages, "checkpoints": checkpoints,
            "taps": taps_n, "summary": f"{seconds:.1f} s for {len(checkpoints)} checkpoints "
            f"x {taps_n} taps (" + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
            + ")"}


def _rates(result: dict[str, Any]) -> None:
    """The training step's FLOP rate and its fraction of the matmul rate, once both parts
    are in (after every part, so that a time-out keeps them)."""
    steps, mm = result.get("paper_steps", {}), result.get("matmul", {})
    if "flops_per_step" in steps and "tflops" in mm:
        for name in ("default", "channels_last"):
            if steps.get(name, {}).get("seconds_per_step"):
                rate = steps["flops_per_step"] / steps[name]["seconds_per_step"] / 1e12
                steps[name]["tflops"] = rate
                steps[name]["fraction_of_matmul"] = rate / mm["tflops"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU test)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    p.add_argument("--only", default="", help="comma-separated parts")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu.json"
    result: dict[str, Any] = {"card": card(), "torch": torch.__version__,
                              "cuda": torch.version.cuda, "quick": args.quick,
                              "measured": time.strftime("%Y-%m-%d")}
    parts: dict[str, Callable[..., dict[str, Any]]] = {
        "matmul": lambda q, t: matmul(q), "tf32": tf32, "paper_steps": paper_steps,
        "group": group, "probe": probe,
        "analyze": lambda q, t: analyze(q, t, args.out)}
    only = set(filter(None, args.only.split(",")))
    with tempfile.TemporaryDirectory(prefix="escapelab_gpu_") as tmp:
        for name, part in parts.items():
            if only and name not in only:
                continue
            print(f"{name} ...", flush=True)
            t0 = time.perf_counter()
            try:
                result[name] = {"card": card(), **part(args.quick, Path(tmp))}
            except Exception:  # one part's failure must not lose the others
                result[name] = {"card": card(), "error": traceback.format_exc()}
            result[name]["part_s"] = time.perf_counter() - t0
            _rates(result)
            print(json.dumps(result[name], default=str)[:400], flush=True)
            path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
