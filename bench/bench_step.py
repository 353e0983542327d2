"""Benchmark: escapelab's training step against a plain reference loop (issue 12).

The reference loop is written here, without escapelab's loop: for each step a random
batch, the teacher's forward pass (no grad), the student's forward and backward pass
under N-MSE (written out below), torch.optim.SGD's step, and the loss and the full
gradient's norm read to the host once. escapelab's loop (``escapelab.train.train``)
does the same and also its bookkeeping: records, status heartbeats, the escape and
collapse tracker, the stop-signal check. Probes, sharpness and periodic checkpoints are
off on both sides, and both flush denormals to zero (``train.flush_denormal``, on by
default), so what differs is the bookkeeping.

escapelab's per-step time is the difference of two runs' wall times (``--steps`` and
``--warmup`` steps) divided by the difference of their steps, which cancels the fixed
costs (data, build, lambda_0 at the teacher, the final write-up). The reference loop
runs the same networks (built by escapelab from the same config) for ``--warmup``
untimed steps, then ``--steps`` timed ones. Each side is timed ``--repeats`` times,
alternating, and the medians are compared.

Cases: the digits default (convnet 16-32-64, 1x8x8, B 64) and VGG11 on CIFAR-shaped
synthetic images (3x32x32, B 256). Target: escapelab's throughput >= 0.9x the
reference's. Each case also runs with ``train.channels_last=true`` against the same
reference loop in the default layout: the ratio is the layout's gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from escapelab.config import Config, load_config
from escapelab.train import build, train

TARGET = 0.9
QUIET = ["probe.enabled=false", "sharpness.enabled=false", "checkpoint.every=0",
         "checkpoint.every_minutes=0", "train.threads=2"]
LAYOUT = "train.channels_last=true"
_VGG = ["data.name=synthetic", "data.synthetic.channels=3", "data.synthetic.size=32",
        "data.synthetic.n_train=2048", "data.synthetic.n_test=256", "model.name=vgg11",
        "model.widths=null", "data.batch_size=256"]
CASES = {
    "digits convnet, B 64": ["data.batch_size=64"],
    "VGG11, 3x32x32, B 256": _VGG,
    "digits convnet, B 64, channels-last": ["data.batch_size=64", LAYOUT],
    "VGG11, 3x32x32, B 256, channels-last": [*_VGG, LAYOUT],
}


def nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mean_i || s_i/|s_i| - t_i/|t_i| ||^2 / d, the N-MSE of the paper, written out."""
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (s - t).square().mean()


def reference_seconds_per_step(cfg: Config, warmup: int, steps: int) -> float:
    setup = build(cfg)
    teacher, student, x = setup.teacher, setup.student, setup.data.x_train
    params = list(student.parameters())
    optimizer = torch.optim.SGD(params, lr=cfg.optim.lr)
    batch = setup.derived.batch_size
    gen = torch.Generator().manual_seed(0)
    t0 = 0.0
    # the same numerics as escapelab's loop: near the teacher the gradients are ~1e-20,
    # and denormal arithmetic (which train.flush_denormal avoids) is up to 10x slower
    torch.set_flush_denormal(cfg.train.flush_denormal)
    for k in range(warmup + steps):
        if k == warmup:
            t0 = time.perf_counter()
        xb = x[torch.randint(0, len(x), (batch,), generator=gen)]
        with torch.no_grad():
            target = teacher(xb)
        optimizer.zero_grad(set_to_none=True)
        loss = nmse(student(xb), target)
        loss.backward()
        gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params
                                                      if p.grad is not None]))
        torch.stack([loss.detach().double(), gnorm.double()]).tolist()
        optimizer.step()
    seconds = (time.perf_counter() - t0) / steps
    torch.set_flush_denormal(False)
    return seconds


def escapelab_seconds_per_step(overrides: list[str], warmup: int, steps: int) -> float:
    walls = []
    for n in (warmup, warmup + steps):
        cfg = load_config("digits", [*overrides, f"train.steps={n}"])
        with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
            t0 = time.perf_counter()
            train(cfg, Path(tmp) / "run")
            walls.append(time.perf_counter() - t0)
    return (walls[1] - walls[0]) / steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(2)
    results: dict[str, Any] = {}
    for name, extra in CASES.items():
        if args.only and args.only not in name:
            continue
        overrides = [*QUIET, *extra]
        big = "VGG11" in name
        warmup, steps = (args.warmup // 4, args.steps // 8) if big else (args.warmup,
                                                                          args.steps)
        ours, ref = [], []
        for _ in range(args.repeats):
            plain = [o for o in overrides if o != LAYOUT]  # the reference: default layout
            ref.append(reference_seconds_per_step(
                load_config("digits", [*plain, "train.steps=1"]), warmup, steps))
            ours.append(escapelab_seconds_per_step(overrides, warmup, steps))
        ratio = statistics.median(ref) / statistics.median(ours)
        results[name] = {"steps": steps, "warmup": warmup, "repeats": args.repeats,
                         "reference_s_per_step": ref, "escapelab_s_per_step": ours,
                         "throughput_ratio": ratio, "target": TARGET, "met": ratio >= TARGET}
        print(f"{name}: reference {1e3 * statistics.median(ref):.2f} ms/step, escapelab "
              f"{1e3 * statistics.median(ours):.2f} ms/step: throughput ratio {ratio:.3f} "
              f"(target >= {TARGET}) {'met' if ratio >= TARGET else 'NOT met'}", flush=True)
    return {"benchmark": "training step: escapelab loop vs plain reference loop",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "torch": torch.__version__, "loadavg": os.getloadavg()},
            "cases": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="Run the cases whose name contains this.")
    parser.add_argument("--out", type=Path, default=None, help="Write the results (JSON).")
    args = parser.parse_args()
    result = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
