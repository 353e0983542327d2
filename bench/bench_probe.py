"""Benchmark: escapelab's torch probes against scikit-learn's (issue 12).

What is measured
----------------
The linear probe (logistic regression, C = 1, on standardized features) fit by
``escapelab.probe.linear_probe`` (torch L-BFGS, float64 and float32, tol = probe.tol)
and by scikit-learn's ``LogisticRegression`` (lbfgs, its default tol 1e-4: the solver
the Evaluator used before), on four feature sets:

A1  digits, cold: the digits default's teacher encoder (``train.build(load_config(
    "digits"))``, ``probe.extract``): 1257 train x 64 features, 540 test images.
A2  digits, sequence: the digits default trained for real, its student saved at every
    step of its evaluation schedule (``derived.eval_steps``: 0, 20 log-spaced steps up to
    100, then every 100 to 3000) and the teacher first, as the Evaluator sees them.
B1  Fashion-MNIST, cold: ``--n`` training images (stratified; default all 60,000) and the
    10,000 test images through a random (teacher-initialized) VGG-style convnet, widths
    32-64-128-512, four conv3x3-ReLU-maxpool blocks: 28 -> 1 pixel, 512 features.
B2  Fashion-MNIST, sequence: the same convnet trained as an escape run with the digits
    default's settings (eta 3e4, B 64, N-MSE) for ``--seq-steps`` steps (default 500),
    its student saved at every step of the digits default's schedule up to there;
    ``--seq-n`` training and ``--seq-test`` test images (stratified).

Cold fits start at W = 0. In a sequence, torch starts each fit from the previous
step's solution (warm start, as the Evaluator does) and scikit-learn starts cold; A2 also
runs torch cold, to separate the warm start's gain from the solver's.

Per fit: wall time and this process's CPU time (features -> accuracy: standardization,
fit and prediction, as ``linear_probe`` does them), L-BFGS iterations, the objective
(``escapelab.reference.logistic_objective``: float64 NumPy on the float64-standardized
train features, for both solvers' weights), and test accuracy. The other processes'
share of the machine's CPUs during each timing is recorded (the machine is shared).

Both libraries get the same number of threads (``--threads``, default 1: on a shared
2-core machine two threads of OpenMP/BLAS spin against other jobs and can slow a small
fit 100x, for scikit-learn and torch alike). A1 also times scikit-learn with its own
default thread pools, as the Evaluator used to run it.

Targets (issue 12): a sequence >= 10x faster, a cold fit >= 3x faster on the CPU,
accuracy within 0.5 point at every step, objective within 1e-4 relative (ours minus
scikit-learn's, divided by scikit-learn's: negative means ours is lower, i.e. closer to
the optimum; the target bounds it from above).

``--quick`` runs every part on tiny sizes (seconds; for the tests), and writes nowhere
unless ``--out`` is given. Numbers measured here: bench/README.md.
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
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from escapelab.config import eval_schedule, load_config
from escapelab.data import Dataset, load_dataset, stratified_subset
from escapelab.models import EscapeNet, build_model
from escapelab.probe import ProbeDtype, extract, linear_probe
from escapelab.reference import logistic_objective
from escapelab.store import RunDir
from escapelab.train import build, train

TARGETS = {"sequence_speedup": 10.0, "cold_speedup": 3.0, "accuracy_points": 0.5,
           "objective_rel": 1e-4}
FM_WIDTHS = "[32,64,128,512]"  # four blocks take 28x28 to 1x1: 512 encoder features
TORCH_DTYPES: tuple[ProbeDtype, ...] = ("float64", "float32")


# ---------------------------------------------------------------------------------------
# Timing


def _busy() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall time) now."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return ((sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time(),
            time.perf_counter())


def timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn()'s result and its wall time, CPU time and the other processes' CPU share."""
    machine0, own0, wall0 = _busy()
    result = fn()
    machine1, own1, wall1 = _busy()
    wall = wall1 - wall0
    other = max(0.0, (machine1 - machine0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))
    return result, {"wall_s": wall, "cpu_s": own1 - own0, "other_cpu_share": other}


# ---------------------------------------------------------------------------------------
# Fits


def sklearn_fit(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, y_te: np.ndarray,
                threads: int | None) -> dict[str, Any]:
    """scikit-learn's probe as the Evaluator ran it (tol 1e-4, max_iter 1000), timed."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def run() -> tuple[Any, float]:
        with threadpool_limits(limits=threads), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            scaler = StandardScaler().fit(f_tr)
            clf = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(f_tr), y_tr)
            return clf, float(clf.score(scaler.transform(f_te), y_te))

    (clf, acc), clock = timed(run)
    return {**clock, "iterations": int(clf.n_iter_[0]), "accuracy": acc,
            "coef": clf.coef_, "intercept": clf.intercept_}


def torch_fit(f_tr: torch.Tensor, y_tr: torch.Tensor, f_te: torch.Tensor, y_te: torch.Tensor,
              dtype: ProbeDtype, init: Any = None, tol: float | None = None,
              ) -> dict[str, Any]:
    kwargs = {} if tol is None else {"tol": tol}
    (acc, fit), clock = timed(lambda: linear_probe(f_tr, y_tr, f_te, y_te, dtype=dtype,
                                                   init=init, **kwargs))
    return {**clock, "iterations": fit.n_iter, "accuracy": acc, "fit": fit,
            "coef": fit.weight.double().numpy(), "intercept": fit.bias.double().numpy()}


def objective(result: dict[str, Any], x_std: np.ndarray, y: np.ndarray) -> float:
    return logistic_objective(result["coef"], result["intercept"], x_std, y, 1.0)


def _standardized(f_tr: np.ndarray) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(f_tr)


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("coef", "intercept", "fit")}


def cold(f_tr: torch.Tensor, y_tr: torch.Tensor, f_te: torch.Tensor, y_te: torch.Tensor,
         threads: int, sklearn_default_threads: bool = False) -> dict[str, Any]:
    """One cold fit per solver on the same features."""
    n64 = [t.double().numpy() for t in (f_tr, f_te)]
    y_np = [t.numpy() for t in (y_tr, y_te)]
    x_std = _standardized(n64[0])
    fits: dict[str, dict[str, Any]] = {
        "sklearn": sklearn_fit(n64[0], y_np[0], n64[1], y_np[1], threads)}
    if sklearn_default_threads:
        fits["sklearn_default_threads"] = sklearn_fit(n64[0], y_np[0], n64[1], y_np[1], None)
    for dtype in TORCH_DTYPES:
        fits[f"torch_{dtype}"] = torch_fit(f_tr, y_tr, f_te, y_te, dtype)
    ref = fits["sklearn"]
    f_ref = objective(ref, x_std, y_np[0])
    out: dict[str, Any] = {"n_train": len(y_tr), "n_test": len(y_te), "d": f_tr.shape[1]}
    for name, fit in fits.items():
        f = objective(fit, x_std, y_np[0])
        out[name] = {**_public(fit), "objective": f,
                     "objective_rel_vs_sklearn": (f - f_ref) / f_ref,
                     "accuracy_diff_points": 100 * (fit["accuracy"] - ref["accuracy"]),
                     "speedup_wall": ref["wall_s"] / fit["wall_s"],
                     "speedup_cpu": ref["cpu_s"] / max(fit["cpu_s"], 1e-9)}
    return out


def sequence(steps: list[tuple[str, Callable[[], tuple[torch.Tensor, ...]]]], threads: int,
             torch_cold: bool) -> dict[str, Any]:
    """Fits at every step: torch warm-started (both dtypes), scikit-learn cold, and torch
    cold if asked. `steps` are (label, features thunk) in evaluation order."""
    rows: list[dict[str, Any]] = []
    warm: dict[str, Any] = {}  # run name -> its last fit
    for label, features in steps:
        f_tr, y_tr, f_te, y_te = features()
        if not (torch.isfinite(f_tr).all() and torch.isfinite(f_te).all()):
            rows.append({"step": label, "skipped": "non-finite features"})
            continue
        n64 = [t.double().numpy() for t in (f_tr, f_te)]
        y_np = [t.numpy() for t in (y_tr, y_te)]
        x_std = _standardized(n64[0])
        ref = sklearn_fit(n64[0], y_np[0], n64[1], y_np[1], threads)
        f_ref = objective(ref, x_std, y_np[0])
        row: dict[str, Any] = {"step": label, "sklearn": {**_public(ref), "objective": f_ref}}
        runs = [(f"torch_{d}_warm", d, True) for d in TORCH_DTYPES]
        runs += [("torch_float32_warm_tol1e-4", "float32", True)]  # scikit-learn's tol
        runs += [("torch_float64_cold", "float64", False)] if torch_cold else []
        for name, dtype, is_warm in runs:
            tol = 1e-4 if name.endswith("tol1e-4") else None
            fit = torch_fit(f_tr, y_tr, f_te, y_te, dtype,
                            warm.get(name) if is_warm else None, tol=tol)
            if is_warm:
                warm[name] = fit["fit"]
            f = objective(fit, x_std, y_np[0])
            row[name] = {**_public(fit), "objective": f,
                         "objective_rel_vs_sklearn": (f - f_ref) / f_ref,
                         "accuracy_diff_points": 100 * (fit["accuracy"] - ref["accuracy"])}
        rows.append(row)
        print(f"    step {label:>5}: sklearn {ref['wall_s']:7.3f} s {ref['iterations']:4d} it"
              + "".join(f" | {name} {row[name]['wall_s']:7.3f} s "
                        f"{row[name]['iterations']:4d} it "
                        f"{row[name]['accuracy_diff_points']:+.2f} pt "
                        f"{row[name]['objective_rel_vs_sklearn']:+.1e}"
                        for name, _, _ in runs), flush=True)
    return {"steps": rows, "summary": summarize_sequence(rows)}


def summarize_sequence(rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in rows if "sklearn" in r]
    out: dict[str, Any] = {"fits": len(done), "skipped": len(rows) - len(done)}
    if not done:
        return out
    for key in ("wall_s", "cpu_s", "iterations"):
        out[f"sklearn_{key}"] = sum(r["sklearn"][key] for r in done)
    for name in [k for k in done[0] if k.startswith("torch_")]:
        s: dict[str, Any] = {key: sum(r[name][key] for r in done)
                             for key in ("wall_s", "cpu_s", "iterations")}
        s["speedup_wall"] = out["sklearn_wall_s"] / s["wall_s"]
        s["speedup_cpu"] = out["sklearn_cpu_s"] / max(s["cpu_s"], 1e-9)
        s["max_abs_accuracy_diff_points"] = max(abs(r[name]["accuracy_diff_points"])
                                                for r in done)
        s["max_objective_rel_vs_sklearn"] = max(r[name]["objective_rel_vs_sklearn"]
                                                for r in done)
        s["min_objective_rel_vs_sklearn"] = min(r[name]["objective_rel_vs_sklearn"]
                                                for r in done)
        s["max_other_cpu_share"] = max(r[name]["other_cpu_share"] for r in done)
        out[name] = s
    return out


# ---------------------------------------------------------------------------------------
# Feature sets


def _model_at(template: EscapeNet, tensors: dict[str, torch.Tensor]) -> EscapeNet:
    import copy

    model = copy.deepcopy(template)
    model.load_state_dict(tensors)
    return model.eval()


def _features_of(model: EscapeNet, data: Dataset, tr: torch.Tensor, te: torch.Tensor,
                 ) -> tuple[torch.Tensor, ...]:
    f_tr, _ = extract(model, data.x_train[tr], 1000)
    f_te, _ = extract(model, data.x_test[te], 1000)
    return f_tr, data.y_train[tr], f_te, data.y_test[te]


def trained_steps(overrides: list[str], total: int, workdir: Path, tr: torch.Tensor,
                  te: torch.Tensor,
                  ) -> tuple[list[tuple[str, Callable[[], tuple[torch.Tensor, ...]]]],
                             dict[str, Any]]:
    """Train the digits preset with `overrides`, its student saved at every step of the
    digits default's evaluation schedule up to `total`; the steps' feature thunks
    (teacher first) and facts of the run."""
    digits = load_config("digits").probe
    schedule = [s for s in eval_schedule(3000, digits.log_until, digits.log_points,
                                         digits.every) if s <= total]
    steps = "[" + ",".join(map(str, schedule)) + "]"
    run_cfg = load_config("digits", [*overrides, f"train.steps={total}",
                                     f"checkpoint.steps={steps}", "checkpoint.every=0",
                                     "checkpoint.every_minutes=0", "probe.enabled=false",
                                     "probe.solver=torch"])
    out = workdir / f"run_{run_cfg.name}"
    (summary, clock) = timed(lambda: train(run_cfg, out, overwrite=True))
    run = RunDir(out)
    data = load_dataset(run_cfg.data)
    template = build_model(run_cfg.model, data.input_shape, run.derived().head_dim)

    def thunk(name: str) -> Callable[[], tuple[torch.Tensor, ...]]:
        return lambda: _features_of(_model_at(template, run.load_checkpoint(name)[0]), data,
                                    tr, te)

    labels = [("T", thunk("T"))] + [(str(s), thunk(f"step_{s}")) for s in schedule]
    facts = {"train_steps": total, "schedule": schedule, "train_wall_s": clock["wall_s"],
             "status": summary["status"], "escape_step": summary["escape_step"]}
    return labels, facts


def fm_overrides(args: argparse.Namespace, n: int, n_test: int) -> list[str]:
    return ["name=fm512", "data.name=fashion-mnist", "data.download=false",
            f"model.widths={FM_WIDTHS}", f"probe.train_samples={n}",
            f"probe.test_samples={n_test}", f"train.threads={args.threads}"]


def _subsets(data: Dataset, n: int, n_test: int, seed: int = 0,
             ) -> tuple[torch.Tensor, torch.Tensor]:
    tr = torch.from_numpy(stratified_subset(data.y_train.numpy(), n, seed)) \
        if n < len(data.y_train) else torch.arange(len(data.y_train))
    te = torch.from_numpy(stratified_subset(data.y_test.numpy(), n_test, seed)) \
        if n_test < len(data.y_test) else torch.arange(len(data.y_test))
    return tr, te


# ---------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "benchmark": "escapelab torch probes vs scikit-learn (issue 12)",
        "targets": TARGETS, "quick": args.quick,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__, "sklearn": _sklearn_version(),
                    "loadavg_start": os.getloadavg()},
        "code": _git_head(),
    }
    warm_up(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        workdir = Path(tmp)
        # A: digits
        digits = [f"train.threads={args.threads}"] + (["model.widths=[8,16,16]"]
                                                       if args.quick else [])
        setup = build(load_config("digits", digits))
        every = torch.arange(len(setup.data.y_train)), torch.arange(len(setup.data.y_test))
        print("A1 digits, cold fit on the teacher's encoder features", flush=True)
        result["digits_cold"] = cold(*_features_of(setup.teacher, setup.data, *every),
                                     args.threads, sklearn_default_threads=True)
        print_cold(result["digits_cold"])
        print("A2 digits, the evaluation sequence of a real run", flush=True)
        steps, facts = trained_steps(digits, 30 if args.quick else 3000, workdir, *every)
        result["digits_sequence"] = {**facts, **sequence(steps, args.threads, True)}
        # B: Fashion-MNIST, 512 features
        if not args.skip_fm:
            fm = load_config("digits", fm_overrides(args, args.n, args.n_test))
            data = load_dataset(fm.data)
            template = build_model(fm.model, data.input_shape, fm.model.d_out)
            from escapelab.init import make_teacher_student

            teacher, _ = make_teacher_student(template, fm.init, 0, 1, torch.float32, "cpu")
            print(f"B1 Fashion-MNIST, cold fit: n={args.n}, 512 features", flush=True)
            feats, clock = timed(lambda: _features_of(teacher, data,
                                                      *_subsets(data, args.n, args.n_test)))
            result["fm_cold"] = {**cold(*feats, args.threads),
                                 "features_wall_s": clock["wall_s"]}
            del feats
            print_cold(result["fm_cold"])
            print(f"B2 Fashion-MNIST, sequence: n={args.seq_n}, {args.seq_steps} steps",
                  flush=True)
            steps, facts = trained_steps(fm_overrides(args, args.seq_n, args.seq_test),
                                         args.seq_steps, workdir,
                                         *_subsets(data, args.seq_n, args.seq_test))
            result["fm_sequence"] = {**facts, **sequence(steps, args.threads, False)}
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t0
    result["verdict"] = verdict(result)
    return result


def warm_up(threads: int) -> None:
    """One small fit per solver first: the first call pays one-off costs (imports, lazy
    initialization) that no later fit pays."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 16, generator=gen), torch.arange(200) % 4
    for dtype in TORCH_DTYPES:
        torch_fit(x, y, x, y, dtype)
    sklearn_fit(x.double().numpy(), y.numpy(), x.double().numpy(), y.numpy(), threads)


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Each target against each measurement (float64 torch, the default; float32 too)."""
    out: dict[str, Any] = {}
    for part in ("digits_sequence", "fm_sequence"):
        if part not in result:
            continue
        s = result[part]["summary"]
        for name in ("torch_float64_warm", "torch_float32_warm",
                     "torch_float32_warm_tol1e-4"):
            if name in s:
                out[f"{part}/{name}"] = {
                    "speedup_wall": s[name]["speedup_wall"],
                    "speedup_ok": s[name]["speedup_wall"] >= TARGETS["sequence_speedup"],
                    "accuracy_ok": s[name]["max_abs_accuracy_diff_points"]
                    <= TARGETS["accuracy_points"],
                    "objective_ok": s[name]["max_objective_rel_vs_sklearn"]
                    <= TARGETS["objective_rel"]}
    for part in ("digits_cold", "fm_cold"):
        if part not in result:
            continue
        for name in ("torch_float64", "torch_float32"):
            r = result[part][name]
            out[f"{part}/{name}"] = {
                "speedup_wall": r["speedup_wall"],
                "speedup_ok": r["speedup_wall"] >= TARGETS["cold_speedup"],
                "accuracy_ok": abs(r["accuracy_diff_points"]) <= TARGETS["accuracy_points"],
                "objective_ok": r["objective_rel_vs_sklearn"] <= TARGETS["objective_rel"]}
    return out


def print_cold(r: dict[str, Any]) -> None:
    print(f"  n={r['n_train']} d={r['d']} test={r['n_test']}")
    for name, v in r.items():
        if isinstance(v, dict):
            print(f"  {name:<24} wall {v['wall_s']:8.3f} s  cpu {v['cpu_s']:8.3f} s  "
                  f"it {v['iterations']:4d}  objective {v['objective']:.8f} "
                  f"({v['objective_rel_vs_sklearn']:+.1e})  acc {100 * v['accuracy']:.2f}% "
                  f"({v['accuracy_diff_points']:+.2f} pt)  speedup {v['speedup_wall']:.2f}x "
                  f"(cpu {v['speedup_cpu']:.2f}x)  other CPU {v['other_cpu_share']:.0%}",
                  flush=True)


def print_table(result: dict[str, Any]) -> None:
    t = result["targets"]
    print(f"\ntargets: sequence >= {t['sequence_speedup']:g}x, cold fit >= "
          f"{t['cold_speedup']:g}x (wall, same threads), accuracy within "
          f"{t['accuracy_points']:g} point, objective <= scikit-learn's + "
          f"{t['objective_rel']:g} relative")
    print(f"{'measurement':<42} {'speedup':>9} {'cpu':>7} {'|d acc| pt':>10} "
          f"{'d obj rel':>10}  verdict")
    for part in ("digits_cold", "fm_cold"):
        for name in ("torch_float64", "torch_float32", "sklearn_default_threads"):
            v = result.get(part, {}).get(name)
            if v is None:
                continue
            ok = result["verdict"].get(f"{part}/{name}")
            print(f"{part + '/' + name:<42} {v['speedup_wall']:8.2f}x "
                  f"{v['speedup_cpu']:6.2f}x {abs(v['accuracy_diff_points']):10.2f} "
                  f"{v['objective_rel_vs_sklearn']:+10.1e}  {_ok(ok)}")
    for part in ("digits_sequence", "fm_sequence"):
        s = result.get(part, {}).get("summary", {})
        for name in ("torch_float64_warm", "torch_float32_warm", "torch_float64_cold"):
            v = s.get(name)
            if v is None:
                continue
            ok = result["verdict"].get(f"{part}/{name}")
            print(f"{part + '/' + name:<42} {v['speedup_wall']:8.2f}x "
                  f"{v['speedup_cpu']:6.2f}x {v['max_abs_accuracy_diff_points']:10.2f} "
                  f"{v['max_objective_rel_vs_sklearn']:+10.1e}  {_ok(ok)}"
                  f"  ({s['fits']} fits; iterations {v['iterations']} vs "
                  f"{s['sklearn_iterations']})")
    m = result["machine"]
    print(f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at "
          f"end; {result['config']['threads']} thread(s); benchmark {result['wall_s']:.0f} s")


def _ok(v: dict[str, Any] | None) -> str:
    if v is None:
        return "(no target)"
    return " ".join(f"{k[:-3]} {'ok' if v[k] else 'MISSED'}"
                    for k in ("speedup_ok", "accuracy_ok", "objective_ok"))


def _sklearn_version() -> str:
    import sklearn

    return str(sklearn.__version__)


def _git_head() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True,
                              cwd=Path(__file__).parent)
        return done.stdout.strip()

    return {"git_head": git("rev-parse", "HEAD"),
            "src_uncommitted_changes": bool(git("status", "--porcelain", "--", "../src"))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, every part (tests)")
    p.add_argument("--n", type=int, default=60000, help="B1: Fashion-MNIST training images")
    p.add_argument("--n-test", type=int, default=10000, help="B1: test images")
    p.add_argument("--seq-n", type=int, default=5000, help="B2: training images per fit")
    p.add_argument("--seq-test", type=int, default=1000, help="B2: test images per fit")
    p.add_argument("--seq-steps", type=int, default=500,
                   help="B2: training steps (the digits schedule up to here)")
    p.add_argument("--skip-fm", action="store_true", help="digits only (A1, A2)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of torch and of scikit-learn's BLAS/OpenMP pools")
    p.add_argument("--out", default=None,
                   help="JSON result file (default: bench/results/probe.json; none with "
                        "--quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.n_test, args.seq_n, args.seq_test, args.seq_steps = 600, 300, 300, 200, 12
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_benchmark(args)
    print_table(result)
    out = args.out or (None if args.quick else "bench/results/probe.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
        print(f"wrote {out}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if __name__ == "__main__":
    sys.exit(main())
