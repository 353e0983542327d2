"""All of escapelab's CPU benchmarks in one command (issue 12): a table of ratios with
their targets, ``bench/results/*.json`` and ``docs/benchmarks.md``.

    python bench/run.py            # everything (about 35 min on 2 cores)
    python bench/run.py --quick    # tiny sizes, every part (a minute; nothing written)

Parts, each measuring its baseline in the same run:

- **probe** (``bench_probe.py``): the torch probe vs scikit-learn's lbfgs, cold fits and
  a real run's sequence of fits, on digits and Fashion-MNIST features;
- **vgg11 probe**: one evaluation's linear probe at the ``cifar10-vgg11`` preset's sizes
  (10,000 training x 512 encoder features of a random VGG11, 10,000 test, on
  Fashion-MNIST images padded to CIFAR's 3x32x32: real images, which CIFAR-10 cannot be
  here): the probe before this work (scikit-learn, tol 1e-4, its default
  thread pools, as the Evaluator ran it) vs the torch probe (the preset's settings);
- **step** (``bench_step.py``): escapelab's training loop vs a plain reference loop;
- **sweep** (``bench_sweep.py``): the step-size preset (18 runs) with runs per process
  vs one process per run, on the same cores;
- **kmeans**: analyze's k-means (label-free separability) in torch vs scikit-learn's
  KMeans, on a wide conv tap of a random VGG11 on real images;
- **main job**: ``make run``'s parts in seconds: training alone (probes and sharpness
  off), the probes and sharpness measurements (the difference to the full run, the
  sharpness part from its records), ``analyze`` and ``report``.

The GPU checks are ``bench/gpu.py`` (one call on a lent GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_probe  # noqa: E402
import bench_step  # noqa: E402
import bench_sweep  # noqa: E402

from escapelab.config import load_config  # noqa: E402
from escapelab.data import Dataset, load_dataset, stratified_subset  # noqa: E402
from escapelab.init import make_teacher_student  # noqa: E402
from escapelab.models import build_model  # noqa: E402
from escapelab.probe import extract, linear_probe  # noqa: E402
from escapelab.reference import logistic_objective  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
VGG_TARGET = 10.0  # the preset's probing cost per evaluation: at most a tenth


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "loadavg": os.getloadavg()}


# ---------------------------------------------------------------------------------------
# vgg11 probe per evaluation


def vgg11_probe(quick: bool) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)  # a run's default (bench_probe sets 1)
    n, n_test = (600, 300) if quick else (10000, 10000)
    cfg = load_config("cifar10-vgg11")
    data = _cifar_shaped_fashion_mnist(n, n_test)
    template = build_model(cfg.model, data.input_shape, cfg.model.d_out)
    teacher, _ = make_teacher_student(template, cfg.init, 0, 1, torch.float32, "cpu")
    t0 = time.perf_counter()
    f_tr, _ = extract(teacher, data.x_train, 500)
    f_te, _ = extract(teacher, data.x_test, 500)
    features_s = time.perf_counter() - t0
    y_tr, y_te = data.y_train, data.y_test
    out: dict[str, Any] = {"n_train": n, "n_test": n_test, "d": int(f_tr.shape[1]),
                           "images": "Fashion-MNIST, zero-padded to 32x32, 3 channels",
                           "features_s": features_s, "probe": cfg.probe.model_dump()}

    def sklearn_before() -> tuple[float, Any]:
        # the Evaluator's probe before the torch solver: scikit-learn, tol 1e-4, its own
        # default thread pools
        acc, _ = linear_probe(f_tr, y_tr, f_te, y_te, cfg.probe.C, cfg.probe.max_iter,
                              solver="sklearn", tol=1e-4)
        return acc, None

    def torch_probe(dtype: str) -> Any:
        return lambda: linear_probe(f_tr, y_tr, f_te, y_te, cfg.probe.C, cfg.probe.max_iter,
                                    solver="torch", dtype=dtype, tol=cfg.probe.tol)

    x_std = bench_probe._standardized(f_tr.double().numpy())
    for name, fn in (("sklearn_before", sklearn_before), ("torch_float64",
                                                          torch_probe("float64")),
                     ("torch_float32", torch_probe("float32"))):
        t0 = time.perf_counter()
        acc, fit = fn()
        wall = time.perf_counter() - t0
        entry = {"wall_s": wall, "accuracy": acc}
        if fit is not None:
            entry.update(iterations=fit.n_iter, objective=logistic_objective(
                fit.weight.double().numpy(), fit.bias.double().numpy(), x_std,
                y_tr.numpy(), cfg.probe.C))
        out[name] = entry
        print(f"  vgg11 probe {name}: {wall:.1f} s, accuracy {100 * acc:.2f}%", flush=True)
    base = out["sklearn_before"]["wall_s"]
    for name in ("torch_float64", "torch_float32"):
        out[name]["speedup"] = base / out[name]["wall_s"]
        out[name]["accuracy_points"] = 100 * (out[name]["accuracy"]
                                              - out["sklearn_before"]["accuracy"])
    return out


def _cifar_shaped_fashion_mnist(n: int, n_test: int) -> Dataset:
    """Real images in CIFAR's shape (CIFAR-10 itself cannot be downloaded here): a
    stratified subset of Fashion-MNIST, zero-padded to 32x32 and repeated to 3 channels,
    so that a random VGG11's features are as hard to probe as real images' are."""
    data = load_dataset(load_config("fashion-mnist").data)
    tr = torch.from_numpy(stratified_subset(data.y_train.numpy(), n, 0))
    te = torch.from_numpy(stratified_subset(data.y_test.numpy(), n_test, 0))

    def shape(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)

    return Dataset("fashion-mnist-32x32x3", shape(data.x_train[tr]), data.y_train[tr],
                   shape(data.x_test[te]), data.y_test[te], data.num_classes,
                   data.mean * 3, data.std * 3)


# ---------------------------------------------------------------------------------------
# k-means of analyze's label-free separability


def kmeans(quick: bool) -> dict[str, Any]:
    """torch k-means (escapelab.metrics.kmeans_labels) vs scikit-learn's KMeans (what
    analyze ran before) on a wide conv tap of a random VGG11 on real images, the same
    settings (k 10, k-means++, 4 seedings): seconds and inertia (a float64 NumPy sum over
    the clusters, the same for both)."""
    from sklearn.cluster import KMeans

    from escapelab.metrics import kmeans_labels

    torch.set_num_threads(os.cpu_count() or 1)
    n, tap = 300 if quick else 2000, "relu2"
    cfg = load_config("cifar10-vgg11")
    data = _cifar_shaped_fashion_mnist(n, 10)
    template = build_model(cfg.model, data.input_shape, cfg.model.d_out)
    teacher, _ = make_teacher_student(template, cfg.init, 0, 1, torch.float32, "cpu")
    with torch.no_grad():
        x = torch.cat([teacher.forward_taps(chunk, [tap])[tap].flatten(1)
                       for chunk in data.x_train.split(250)])
    x64 = x.double().numpy()

    def inertia(labels: np.ndarray) -> float:
        return sum(float(((x64[labels == j] - x64[labels == j].mean(0)) ** 2).sum())
                   for j in np.unique(labels))

    out: dict[str, Any] = {"n": n, "tap": tap, "d": int(x.shape[1]), "k": 10}
    t0 = time.perf_counter()
    labels = KMeans(10, n_init=4, random_state=0).fit_predict(x64)
    out["sklearn"] = {"wall_s": time.perf_counter() - t0, "inertia": inertia(labels)}
    t0 = time.perf_counter()
    labels = kmeans_labels(x, 10, seed=0)
    out["torch_float32"] = {"wall_s": time.perf_counter() - t0, "inertia": inertia(labels)}
    out["speedup"] = out["sklearn"]["wall_s"] / out["torch_float32"]["wall_s"]
    out["inertia_ratio"] = out["torch_float32"]["inertia"] / out["sklearn"]["inertia"]
    print(f"  k-means {n} x {out['d']}: sklearn {out['sklearn']['wall_s']:.1f} s, torch "
          f"{out['torch_float32']['wall_s']:.1f} s, inertia ratio {out['inertia_ratio']:.4f}",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------
# main job


def main_job(quick: bool) -> dict[str, Any]:
    extra = ["train.steps=100"] if quick else []
    cli = [sys.executable, "-m", "escapelab"]
    with tempfile.TemporaryDirectory(prefix="bench_main_") as tmp:
        def timed(args: list[str]) -> float:
            t0 = time.perf_counter()
            subprocess.run([*cli, *args], check=True, capture_output=True, text=True)
            return time.perf_counter() - t0

        bare = timed(["run", "--quiet", "--out", f"{tmp}/bare", "probe.enabled=false",
                      "sharpness.enabled=false", *extra])
        full = timed(["run", "--quiet", "--out", f"{tmp}/full", *extra])
        sharp = [json.loads(line) for line in
                 Path(f"{tmp}/full/metrics/sharpness.jsonl").read_text().splitlines()]
        sharp_s = sum(r["seconds"] for r in sharp)
        analyze = timed(["analyze", f"{tmp}/full"])
        report = timed(["report", f"{tmp}/full"])
    return {"run_without_probes_or_sharpness_s": bare, "run_s": full,
            "probes_and_sharpness_s": full - bare, "sharpness_s": sharp_s,
            "probes_s": full - bare - sharp_s, "analyze_s": analyze, "report_s": report,
            "main_job_s": full + analyze}


# ---------------------------------------------------------------------------------------
# table and document


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, ratio, target, met) for the table."""
    out = []
    probe = results.get("probe")
    if probe:
        for key, v in probe["verdict"].items():
            target = ">= 10x" if "sequence" in key else ">= 3x"
            misses = [name for name in ("speedup", "accuracy", "objective")
                      if not v[f"{name}_ok"]]
            out.append((f"probe {key}", f"{v['speedup_wall']:.2f}x",
                        target + ", +-0.5 pt, objective <= +1e-4",
                        "yes" if not misses else "no (" + ", ".join(misses) + ")"))
    vgg = results.get("vgg11_probe")
    if vgg:
        for name in ("torch_float64", "torch_float32"):
            v = vgg[name]
            out.append((f"vgg11 preset probe per evaluation, {name} vs before",
                        f"{v['speedup']:.2f}x ({v['accuracy_points']:+.2f} pt)",
                        f">= {VGG_TARGET:g}x", "yes" if v["speedup"] >= VGG_TARGET else "no"))
    step = results.get("step")
    if step:
        for name, v in step["cases"].items():
            out.append((f"training step, {name}", f"{v['throughput_ratio']:.3f}x",
                        ">= 0.9x", "yes" if v["met"] else "no"))
    km = results.get("kmeans")
    if km:
        out.append((f"analyze k-means, VGG11 {km['tap']} ({km['n']} x {km['d']}), torch vs "
                    "scikit-learn", f"{km['speedup']:.2f}x (inertia x"
                    f"{km['inertia_ratio']:.4f})", "inertia <= 1.01x",
                    "yes" if km["inertia_ratio"] <= 1.01 else "no"))
    sweep = results.get("sweep")
    if sweep:
        misses = [what for what, ok in (("speedup", sweep["speedup"] >= bench_sweep.TARGET),
                                        ("phases", sweep["same_phase"]),
                                        ("gains", sweep["gains_ok"])) if not ok]
        out.append((f"step-size sweep ({sweep['points']} runs), runs per process vs one "
                    "process per run", f"{sweep['speedup']:.2f}x",
                    f">= {bench_sweep.TARGET:g}x, same phases, gains within spread",
                    "yes" if not misses else "no (" + ", ".join(misses) + ")"))
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = ["# Benchmarks", "",
             f"Measured by `python bench/run.py` on {time.strftime('%Y-%m-%d')}: "
             f"{m['cpu'] or 'CPU'}, {m['cpus']} cores, {m['platform']}, Python {m['python']}, "
             f"torch {m['torch']}. Each ratio is measured side by side in the same run "
             "(escapelab's time divided into the baseline's: above 1 means faster); "
             "absolute seconds on this shared machine are noisy.", "",
             "| what | ratio | target | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
    job = results.get("main_job")
    if job:
        lines += ["", "## The main job (`make run`: run + analyze), seconds", "",
                  "| part | seconds |", "|---|---|"]
        lines += [f"| {k.removesuffix('_s').replace('_', ' ')} | {v:.1f} |"
                  for k, v in job.items()]
    vgg = results.get("vgg11_probe")
    if vgg:
        lines += ["", f"VGG11 probe: {vgg['n_train']} x {vgg['d']} features, {vgg['n_test']} "
                  f"test images; before: {vgg['sklearn_before']['wall_s']:.1f} s, torch "
                  f"float64 {vgg['torch_float64']['wall_s']:.1f} s "
                  f"({vgg['torch_float64'].get('iterations')} iterations), float32 "
                  f"{vgg['torch_float32']['wall_s']:.1f} s."]
    sweep = results.get("sweep")
    if sweep:
        lines += ["", f"Step-size sweep: one process per run {sweep['sequential_s']:.0f} s, "
                  f"runs per process {sweep['grouped_s']:.0f} s (groups of "
                  f"{', '.join(map(str, sweep['group_sizes']))})."]
    lines += ["", *gpu_markdown(), "", *study_markdown(), ""]
    return "\n".join(lines)


def study_markdown() -> list[str]:
    """The studies' measured wall times (bench/results/study.json, from `bench/study_cost.py
    --record`) and the paper-scale study's GPU cost estimated from gpu.json."""
    import study_cost

    lines = ["## The study (`escapelab study`)", ""]
    path = RESULTS / "study.json"
    if path.exists():
        s = json.loads(path.read_text())
        parts = list(s["studies"][0]["parts_s"]) if s["studies"] else []
        lines += [f"Measured whole on this project's {s['machine']['cpus']}-core CPU machine "
                  f"({s['measured']}), one call each, minutes per part:", "",
                  "| scale | " + " | ".join(parts) + " | total | verdicts |",
                  "|---" * (len(parts) + 3) + "|"]
        for st in s["studies"]:
            c = st["counts"]
            lines.append(f"| {st['scale']} | " + " | ".join(
                f"{st['parts_s'][p] / 60:.1f}" for p in parts)
                + f" | **{st['total_s'] / 60:.1f}** | {c['holds']} hold, {c['partly']} partly, "
                f"{c['does not hold']} do not, {c['not measured']} not measured |")
        lines.append("")
    gpu = RESULTS / "gpu.json"
    if gpu.exists():
        lines += [*study_cost.markdown("cifar10-vgg11", json.loads(gpu.read_text())), "",
                  "Not included (not measured on a GPU yet): the sharpness measurements, "
                  "`analyze`, finetuning and start-up. The batch-size part's cost is "
                  "dominated by its full-batch runs (6,000 steps of 49,152 images: 4.8 h per "
                  "seed). Slurm (`--slurm`) spreads the runs over the cards there are. "
                  "`fashion-mnist-vgg11` costs the same to within 2% (1x32x32 inputs, "
                  "19,500-step runs).", ""]
    return lines


def gpu_markdown() -> list[str]:
    """The latest `bench/gpu.py` results (bench/results/gpu.json), if a GPU was lent."""
    path = RESULTS / "gpu.json"
    if not path.exists():
        return ["The GPU checks (`bench/gpu.py`) run only on a lent GPU machine; none has "
                "been yet."]
    g = json.loads(path.read_text())
    lines = ["## GPU (`bench/gpu.py`)", "",
             f"{g['card']}, torch {g['torch']}, CUDA {g['cuda']}, measured "
             f"{g.get('measured', '')}. Every part records the card's name "
             "(bench/results/gpu.json).", "", "| what | value |", "|---|---|"]
    mm, tf, st = g.get("matmul", {}), g.get("tf32", {}), g.get("paper_steps", {})
    if "tflops" in mm:
        lines.append(f"| float32 matmul rate, TF32 off ({mm['n']}^2) | "
                     f"{mm['tflops']:.1f} TFLOP/s |")
    for flag in ("off", "on"):
        if flag in tf:
            lines.append(f"| paper preset, student's loss at step 1, TF32 {flag} | "
                         f"{tf[flag]['loss_step_1']:.3g}"
                         f"{' (the offset erased)' if tf[flag]['offset_erased'] else ''} |")
    for name in ("default", "channels_last"):
        if st.get(name, {}).get("seconds_per_step"):
            v = st[name]
            frac = (f", {v['tflops']:.1f} TFLOP/s = {100 * v['fraction_of_matmul']:.0f}% of "
                    "the matmul rate" if "tflops" in v else "")
            lines.append(f"| paper preset (VGG11, B 256, 50,000 synthetic 3x32x32), "
                         f"{name.replace('_', '-')} | {v['steps_per_s']:.1f} steps/s, "
                         f"{v['images_per_s']:,.0f} images/s{frac} |")
    if "flops_per_step" in st:
        lines.append(f"| FLOPs per training step (FlopCounterMode) | "
                     f"{st['flops_per_step'] / 1e9:.0f} GFLOP |")
    gr = g.get("group", {})
    if "speedup" in gr:
        same = all(a == b for a, b in gr["escape_steps_alone_vs_group"])
        lines.append(f"| {gr['runs']} digits runs x {gr['steps']} steps, runs per process vs "
                     f"one after the other | {gr['speedup']:.2f}x ({gr['group_s']:.1f} vs "
                     f"{gr['sequential_s']:.1f} s; escape steps "
                     f"{'identical' if same else 'differ'}) |")
    pr = g.get("probe", {})
    if "seconds" in pr:
        lines.append(f"| one evaluation at {pr['n_train']:,} x {pr['d']} (features, probe, "
                     f"kNN, spectra) | {pr['seconds']:.2f} s |")
    an = g.get("analyze", {})
    if an:
        lines.append(f"| analyze, VGG11, n = {an['n']:,}, every tap | {an['summary']} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes; writes nothing")
    p.add_argument("--skip", default="", help="comma-separated parts to skip (their "
                   "latest results are reused in the table): probe, "
                   "vgg11_probe, step, kmeans, sweep, main_job")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick}
    if "probe" not in skip:
        print("probe (bench_probe.py)", flush=True)
        probe_args = bench_probe.parse_args(["--quick"] if args.quick else [])
        results["probe"] = bench_probe.run_benchmark(probe_args)

    if "vgg11_probe" not in skip:
        print("vgg11 probe per evaluation", flush=True)
        results["vgg11_probe"] = vgg11_probe(args.quick)
    if "step" not in skip:
        print("training step (bench_step.py)", flush=True)
        step_args = argparse.Namespace(steps=40 if args.quick else 400,
                                       warmup=8 if args.quick else 40,
                                       repeats=1 if args.quick else 3, only="")
        results["step"] = bench_step.run(step_args)
    if "kmeans" not in skip:
        print("k-means", flush=True)
        results["kmeans"] = kmeans(args.quick)
    if "sweep" not in skip:
        print("sweep (bench_sweep.py)", flush=True)
        results["sweep"] = bench_sweep.run(args.quick)
    if "main_job" not in skip:
        print("main job", flush=True)
        results["main_job"] = main_job(args.quick)
    for part in sorted(skip):  # a skipped part's latest results, for the table and doc
        path = RESULTS / f"{part}.json"
        if path.exists() and not args.quick:
            saved = json.loads(path.read_text())
            # `python bench/bench_probe.py` alone writes probe.json without the wrapper
            results[part] = saved.get(part, saved)
            print(f"{part}: reusing {path.relative_to(ROOT)}", flush=True)
    results["machine"]["loadavg_end"] = os.getloadavg()
    width = max((len(r[0]) for r in rows(results)), default=10)
    print()
    for what, ratio, target, met in rows(results):
        print(f"{what:<{width}}  {ratio:>22}  target {target:<20} {met}")
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for part in ("probe", "vgg11_probe", "step", "kmeans", "sweep", "main_job"):
            if part in results and part not in skip:
                (RESULTS / f"{part}.json").write_text(json.dumps(
                    {"machine": results["machine"], part: results[part]}, indent=1,
                    default=_jsonable) + "\n")
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(markdown(results))
        print(f"wrote {RESULTS}/*.json and {DOC}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    main()
