"""The GPU cost of a study at the paper's scale, estimated part by part from measured rates.

    .venv/bin/python bench/study_cost.py [--scale cifar10-vgg11] [--gpu bench/results/gpu.json]

Reads the study plan (every run's config, as ``escapelab study`` would run it) and the
rates measured on a card by ``bench/gpu.py`` (``gpu.json``): images per second of a
VGG11 training step at B 256 with TF32 off (``paper_steps``) and the seconds of one
evaluation at 10,000 x 512 (``probe``). A step of batch B is costed as B images at that
rate (a step is compute-bound at B >= 256, so its time grows with B; micro-batching
changes memory, not the work), an evaluation at the measured time, runs one after the
other on one card (the sum; Slurm divides it by the cards available). Not included,
because not measured on a GPU yet: the sharpness measurements (~20 Lanczos runs per
representative run), ``analyze`` (k-means in torch on the card), finetuning, start-up.
Prints a Markdown table; bench/run.py renders it into docs/benchmarks.md, next to the
measured wall times of the CPU studies that ``--record`` saves in
``bench/results/study.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from escapelab.config import RangeOptions, derive
from escapelab.study import load_plan, range_base, sweep_spec
from escapelab.sweep import expand

RESULTS = Path(__file__).parent / "results"
# The training split sizes of the data sets a paper-scale study reads (the schedule of a
# run follows from them; reading 50,000 CIFAR images is not needed to cost it).
N_TRAIN = {"cifar10": 50_000, "fashion-mnist": 60_000, "mnist": 60_000}


def run_cost(cfg, images_per_s: float, eval_s: float) -> tuple[int, int, float]:
    """(steps, evaluations, seconds) of one run."""
    n = cfg.data.subset or N_TRAIN[cfg.data.name]
    d = derive(cfg, n_train=n, n_test=10_000, num_classes=10, input_shape=(3, 32, 32),
               device="cuda")
    evals = len(d.eval_steps) if cfg.probe.enabled else 0  # the teacher's included
    seconds = d.total_steps * d.batch_size / images_per_s + evals * eval_s
    return d.total_steps, evals, seconds


def estimate(scale: str, gpu: dict) -> list[dict]:
    plan = load_plan(scale)
    rate = gpu["paper_steps"]["default"]["images_per_s"]
    eval_s = gpu["probe"]["seconds"]
    rows = []
    base = range_base(plan)
    options = RangeOptions.model_validate(plan.parts.lr_range.options)
    n = base.data.subset or N_TRAIN[base.data.name]
    per_curve = options.steps or math.ceil(options.epochs * n / base.data.batch_size)
    curves = 2 * len(options.seeds)
    rows.append({"part": "lr-range", "runs": curves, "steps": curves * per_curve,
                 "seconds": curves * per_curve * base.data.batch_size / rate})
    for name in ("step-size", "batch-size", "loss-warmup"):
        costs = [run_cost(p.config, rate, eval_s) for p in expand(sweep_spec(plan, name))]
        rows.append({"part": name, "runs": len(costs), "steps": sum(c[0] for c in costs),
                     "seconds": sum(c[2] for c in costs)})
    return rows


def markdown(scale: str, gpu: dict) -> list[str]:
    rows = estimate(scale, gpu)
    rate = gpu["paper_steps"]["default"]["images_per_s"]
    lines = [f"Study `{scale}` on one {gpu['card']} ({rate:,.0f} images/s of VGG11 at B 256, "
             f"{gpu['probe']['seconds']:.2f} s per evaluation, both measured by "
             "bench/gpu.py), runs one after the other:", "",
             "| part | runs | SGD steps | estimated GPU time |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['runs']} | {r['steps']:,} | "
                     f"{r['seconds'] / 3600:.2f} h |")
    total = sum(r["seconds"] for r in rows)
    lines.append(f"| **total** | {sum(r['runs'] for r in rows)} | "
                 f"{sum(r['steps'] for r in rows):,} | **{total / 3600:.1f} h** |")
    return lines


def record(folders: list[Path], out: Path) -> dict:
    """The measured wall time of finished studies (their study.json) and their verdict
    counts (claims.json), for docs/benchmarks.md (bench/run.py renders them)."""
    import platform

    import escapelab

    studies = []
    for folder in folders:
        state = json.loads((folder / "study.json").read_text())
        claims = json.loads((folder / "claims.json").read_text())
        studies.append({"scale": state["plan"]["name"],
                        "parts_s": {k: v["wall_s"] for k, v in state["parts"].items()},
                        "total_s": sum(v["wall_s"] for v in state["parts"].values()),
                        "counts": claims["counts"]})
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "escapelab": escapelab.__version__},
               "measured": time.strftime("%Y-%m-%d"), "studies": studies}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return payload


def claims_table(folders: list[Path]) -> list[str]:
    """The claims of finished studies side by side, as Markdown (the README's table)."""
    payloads = [json.loads((f / "claims.json").read_text()) for f in folders]
    scales = [json.loads((f / "study.json").read_text())["plan"]["name"] for f in folders]
    lines = ["| figure | claim | " + " | ".join(scales) + " |",
             "|---|---|" + "---|" * len(scales)]
    for i, claim in enumerate(payloads[0]["claims"]):
        cells = []
        for payload in payloads:
            c = payload["claims"][i]
            shown = c["value"] if c["verdict"] != "not measured" else c["detail"]
            cells.append(f"**{c['verdict']}**: {shown}".replace("|", "/"))
        lines.append(f"| {claim['figure']} | {claim['statement']} | " + " | ".join(cells)
                     + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cifar10-vgg11")
    p.add_argument("--gpu", type=Path, default=RESULTS / "gpu.json")
    p.add_argument("--record", type=Path, nargs="*", default=None,
                   help="finished study folders whose wall times go to "
                   "bench/results/study.json")
    p.add_argument("--table", type=Path, nargs="*", default=None,
                   help="finished study folders: print their claims side by side")
    args = p.parse_args()
    if args.table:
        print("\n".join(claims_table(args.table)))
        return
    if args.record:
        record(args.record, RESULTS / "study.json")
        print(f"wrote {RESULTS / 'study.json'}")
        return
    print("\n".join(markdown(args.scale, json.loads(args.gpu.read_text()))))


if __name__ == "__main__":
    main()
