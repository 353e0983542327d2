"""Benchmark: escapelab's layerwise analysis metrics against the naive float64 approach.

What is measured
----------------
The per-tap metrics of ONE checkpoint of a CIFAR-shaped VGG11 (He-initialized with a
seeded generator, random N(0, 1) inputs of shape 3x32x32, random labels in 0..9) over
``--n`` samples, for every layer tap (or those given by ``--taps``):

- OURS (escapelab.metrics): ``dead_units(X)``; ``GramView(X)`` (the smaller Gram matrix,
  d x d or n x n, accumulated in float64 chunk by chunk from the float32 features);
  singular values from it; effective rank and condition number; ``fisher(labels)``
  (computed in the span of the data when d > n).
- NAIVE: X converted to float64; ``np.linalg.svd(X, compute_uv=False)``; dead units;
  explicit d x d covariances Sigma_t, Sigma_b, Sigma_w (1/n normalization) and
  ``np.linalg.pinv(Sigma_w, rtol=1e-8, hermitian=True)`` for tr(pinv(Sigma_w) Sigma_b).

How it is measured
------------------
The parent process stays small (standard library only). One worker subprocess computes
the features of all selected taps once and writes them to raw float32 files. Then every
(tap, method) pair runs in a fresh subprocess that preallocates X, reads it from disk,
records its baseline (``ru_maxrss`` after X is in memory, and the current RSS), runs the
method once and reports its wall time and its extra peak memory,
``ru_maxrss_after - ru_maxrss_baseline``. Peak memory of a method on a tap is reported
as X bytes + extra peak (what a machine must hold).

The naive method is skipped as "infeasible" when its estimated memory need (float64 X +
the SVD's copy + three d x d covariances + pinv workspace, 16 n d + 56 d^2 bytes; an
*estimate*, labelled as such) exceeds ``--mem-fraction`` of MemAvailable. Naive runs share
a time budget (``--naive-budget-s``) and are attempted in order of increasing estimated
need, so that the budget covers as many taps as possible; a run that exceeds its timeout
is killed and reported as "timed out after T s" (a lower bound on its time).

Ratios naive/ours are computed only on the taps where both methods completed.

Run ``.venv/bin/python bench/bench_analysis.py --help`` for the options; see
bench/README.md for the numbers measured on the development machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Defaults. At n = 10,000 and full width our method alone takes far more than 10 minutes
# on a 2-core CPU (about 4 minutes for conv1 alone: its n x n float64 Gram costs ~1e13
# flops and, conv1 being rank-deficient, the discriminant needs a 10k x 10k
# eigendecomposition), so the default keeps the real full-width architecture (tap
# dimensions up to 65,536; the wide taps still have d > n) with fewer samples.
# `--n 10000` runs the full size. Measured numbers: bench/README.md.
DEFAULT_N = 2000
DEFAULT_WIDTH = 1.0
DEFAULT_NAIVE_BUDGET_S = 300.0
DEFAULT_REASON = (
    f"default n={DEFAULT_N} at full width, chosen to finish in under 10 min on a 2-core CPU: "
    "at n=10,000 our method alone takes minutes per wide tap there (conv1 ~4 min) and far "
    "more than 10 min over all taps (bench/README.md). Full width keeps the real VGG11 tap "
    "dimensions (d up to 65,536); --n 10000 runs the full size."
)
NUM_CLASSES = 10
MASS = 0.999
PINV_RTOL = 1e-8
RESULT_KEYS = ("erank", "condition_number", "tr_between", "tr_within", "tr_total",
               "discriminant")
AGREEMENT_TOL = 1e-6
CONTENTION_LIMIT = 0.1  # other processes' CPU share above which a timing is flagged


# ---------------------------------------------------------------------------------------
# Small helpers (standard library only: the parent never imports numpy or torch)


def _maxrss_bytes() -> int:
    """High-water mark of this process's resident set (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cpu_snapshot() -> tuple[float, float, float]:
    """(machine busy CPU-seconds, this process's CPU-seconds, wall time) now: their
    deltas over a measurement tell how much CPU other processes took meanwhile."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks[:8]) - idle) / hz, own.user + own.system, time.perf_counter()


def _contention(before: tuple[float, float, float]) -> dict[str, float]:
    """CPU use of this process and of all other processes since `before`, as shares of
    the machine's capacity over that interval (other > 0.1 makes a timing suspect)."""
    busy, own, wall = (a - b for a, b in zip(_cpu_snapshot(), before, strict=True))
    capacity = max(wall, 1e-9) * (os.cpu_count() or 1)
    return {"cpu_s": own, "own_share": own / capacity,
            "other_share": max(busy - own, 0.0) / capacity}


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def code_version() -> dict[str, Any]:
    """What is being benchmarked: the hash of escapelab/metrics.py, the git commit, the
    git tree of src/ and whether src/ has uncommitted changes (read-only git queries)."""
    spec = importlib.util.find_spec("escapelab.metrics")
    origin = spec.origin if spec else None
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--", "src")
    return {"metrics_sha256": _sha256(origin) if origin else None,
            "git_head": git("rev-parse", "HEAD"), "git_src_tree": git("rev-parse", "HEAD:src"),
            "src_uncommitted_changes": None if status is None else bool(status)}


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _gib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def naive_memory_estimate(n: int, d: int) -> int:
    """Estimated bytes the naive method needs on top of the float32 X: float64 X, the
    SVD's copy of it, three d x d float64 covariances and the hermitian pinv's workspace
    (a copy of Sigma_w, its eigenvectors, the scaled eigenvectors and the product)."""
    return 16 * n * d + 56 * d * d


def _reldiff(a: float, b: float) -> float:
    if a == b:  # also both inf
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def _jsonable(obj: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _load_features(path: str, n: int, d: int) -> Any:
    """Preallocate X (n, d) float32 and fill it straight from disk, so that the
    high-water mark after loading is X's own size (no temporary copy)."""
    import numpy as np

    x = np.empty((n, d), dtype=np.float32)
    view = memoryview(x).cast("B")
    pos = 0
    with open(path, "rb", buffering=0) as f:
        while pos < len(view):
            got = f.readinto(view[pos:])
            if not got:
                raise OSError(f"{path}: short read at byte {pos}")
            pos += got
    return x


# ---------------------------------------------------------------------------------------
# Workers (each runs in its own subprocess)


def worker_features(spec: dict[str, Any]) -> dict[str, Any]:
    """Build and initialize the model, draw inputs and labels, and write the features of
    every requested tap to ``<workdir>/<tap>.f32`` (row-major (n, d) float32)."""
    import numpy as np
    import torch

    from escapelab.config import InitConfig, ModelConfig
    from escapelab.init import init_weights
    from escapelab.models import build_model

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    seed, n = spec["seed"], spec["n"]
    model = build_model(ModelConfig(name="vgg11", width_mult=spec["width"]), (3, 32, 32),
                        head_dim=512)
    with torch.no_grad():
        init_weights(model, InitConfig(), torch.Generator().manual_seed(seed))
    model.eval()
    all_taps = model.tap_names()
    taps = spec["taps"] or all_taps
    unknown = sorted(set(taps) - set(all_taps))
    if unknown:
        raise SystemExit(f"unknown taps {unknown}; available: {all_taps}")
    taps = [t for t in all_taps if t in set(taps)]  # network order
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    labels = torch.randint(0, NUM_CLASSES, (n,),
                           generator=torch.Generator().manual_seed(seed + 2))
    workdir = Path(spec["workdir"])
    np.save(workdir / "labels.npy", labels.numpy().astype(np.int64))
    files = {t: open(workdir / f"{t}.f32", "wb") for t in taps}  # noqa: SIM115
    shapes: dict[str, list[int]] = {}
    try:
        with torch.no_grad():
            for chunk in x.split(spec["batch_size"]):
                feats = model.forward_taps(chunk, taps)
                for t in taps:
                    shapes[t] = list(feats[t].shape[1:])
                    files[t].write(feats[t].reshape(len(chunk), -1).float().contiguous()
                                   .numpy())
    finally:
        for f in files.values():
            f.close()
    return {"taps": taps, "shapes": shapes, "d": {t: math.prod(shapes[t]) for t in taps},
            "time_s": time.perf_counter() - t0, "torch": torch.__version__,
            "numpy": np.__version__}


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """escapelab.metrics on X (float32, as analyze does)."""
    import numpy as np
    import torch

    from escapelab.metrics import (
        GramView,
        condition_number_from_singular_values,
        dead_units,
        effective_rank_from_singular_values,
    )

    torch.set_num_threads(spec["threads"])
    x_np = _load_features(spec["path"], spec["n"], spec["d"])
    labels = np.load(spec["labels"])
    base_maxrss, base_rss = _maxrss_bytes(), _rss_bytes()
    cpu0 = _cpu_snapshot()
    t0 = time.perf_counter()
    x = torch.from_numpy(x_np)  # zero-copy
    dead = dead_units(x)
    t1 = time.perf_counter()
    view = GramView(x)
    t2 = time.perf_counter()
    s = view.singular_values(False)
    erank = effective_rank_from_singular_values(s)
    cond = condition_number_from_singular_values(s, MASS)
    t3 = time.perf_counter()
    fisher = view.fisher(labels, PINV_RTOL)
    t4 = time.perf_counter()
    peak = _maxrss_bytes()
    import escapelab.metrics

    return {
        "metrics_sha256": _sha256(escapelab.metrics.__file__),
        "time_s": t4 - t0, "cpu": _contention(cpu0),
        "breakdown_s": {"dead_units": t1 - t0, "gram": t2 - t1, "spectrum": t3 - t2,
                        "fisher": t4 - t3},
        "gram": "d x d" if view.by_features else "n x n",
        "baseline_maxrss_bytes": base_maxrss, "baseline_rss_bytes": base_rss,
        "extra_peak_bytes": peak - base_maxrss,
        "metrics": {"dead_units": dead, "erank": erank, "condition_number": cond, **fisher},
    }


def _spectrum_metrics(s: Any) -> tuple[float, float]:
    """Effective rank and condition number of a descending spectrum s (the paper's
    formulas: p = s / sum(s), erank = exp(H(p)); cond = s_0 / s_k with k the first index
    whose cumulative share reaches 99.9%)."""
    import numpy as np

    total = float(s.sum())
    if total <= 0 or not math.isfinite(total):
        return 0.0, math.inf
    p = s / total
    q = p[p > 0]
    erank = float(np.exp(-(q * np.log(q)).sum()))
    k = min(int(np.searchsorted(np.cumsum(p), MASS)), len(s) - 1)
    return erank, float(s[0] / s[k])


def worker_naive(spec: dict[str, Any]) -> dict[str, Any]:
    """The textbook computation in float64 NumPy: full SVD, explicit covariances, pinv."""
    import numpy as np

    n, d = spec["n"], spec["d"]
    x32 = _load_features(spec["path"], n, d)
    labels = np.load(spec["labels"])
    base_maxrss, base_rss = _maxrss_bytes(), _rss_bytes()
    cpu0 = _cpu_snapshot()
    t0 = time.perf_counter()
    x = x32.astype(np.float64)
    s = np.linalg.svd(x, compute_uv=False)
    erank, cond = _spectrum_metrics(s)
    dead = int((x == 0).all(axis=0).sum())
    t1 = time.perf_counter()
    mu = x.mean(axis=0)
    xc = x - mu
    sigma_t = xc.T @ xc / n
    del xc
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    onehot = (inverse[:, None] == np.arange(len(classes))).astype(np.float64)
    means = onehot.T @ x / counts[:, None]
    dm = means - mu
    sigma_b = (dm.T * (counts / n)) @ dm
    xw = x - means[inverse]
    sigma_w = xw.T @ xw / n
    del xw
    t2 = time.perf_counter()
    pinv = np.linalg.pinv(sigma_w, rtol=PINV_RTOL, hermitian=True)
    discriminant = float(np.trace(pinv @ sigma_b))
    t3 = time.perf_counter()
    peak = _maxrss_bytes()
    cpu = _contention(cpu0)
    # Diagnostic, outside the timing: the same spectrum with the values below escapelab's
    # documented resolution, sqrt(max(n, d) eps) s_max, set to zero.
    resolution = math.sqrt(max(n, d) * np.finfo(np.float64).eps) * (s[0] if len(s) else 0.0)
    erank_res, cond_res = _spectrum_metrics(np.where(s > resolution, s, 0.0))
    return {
        "time_s": t3 - t0, "cpu": cpu,
        "breakdown_s": {"svd+dead_units": t1 - t0, "covariances": t2 - t1,
                        "pinv+trace": t3 - t2},
        "baseline_maxrss_bytes": base_maxrss, "baseline_rss_bytes": base_rss,
        "extra_peak_bytes": peak - base_maxrss,
        "metrics": {"dead_units": dead, "erank": erank, "condition_number": cond,
                    "tr_between": float(np.trace(sigma_b)),
                    "tr_within": float(np.trace(sigma_w)),
                    "tr_total": float(np.trace(sigma_t)), "discriminant": discriminant},
        "resolved": {"erank": erank_res, "condition_number": cond_res,
                     "below_resolution": int((s <= resolution).sum()),
                     "smallest_nonzero_rel": float(s[s > 0][-1] / s[0]) if s[0] > 0 else 0.0},
    }


WORKERS = {"features": worker_features, "ours": worker_ours, "naive": worker_naive}


# ---------------------------------------------------------------------------------------
# Parent side


def run_worker(kind: str, spec: dict[str, Any], threads: int, timeout: float | None,
               workdir: Path) -> dict[str, Any]:
    """Run one worker in a fresh interpreter; returns its result plus ``status``
    ("ok", "timeout" or "error") and ``process_wall_s`` (start-up and loading included)."""
    spec_path = workdir / f"spec-{kind}.json"
    out_path = workdir / f"result-{kind}.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--spec", str(spec_path)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout,
                "process_wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not out_path.exists():
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"status": "error", "returncode": proc.returncode, "stderr_tail": tail,
                "process_wall_s": wall}
    return {"status": "ok", **json.loads(out_path.read_text()), "process_wall_s": wall}


def agreement(ours: dict[str, Any], naive: dict[str, Any]) -> dict[str, Any]:
    """Relative differences of every metric between the two methods."""
    a, b = ours["metrics"], naive["metrics"]
    rel = {k: _reldiff(float(a[k]), float(b[k])) for k in RESULT_KEYS}
    worst = max(rel.values())
    # erank and condition number against the naive spectrum with the values below
    # escapelab's documented resolution zeroed: separates resolution from error.
    res = naive["resolved"]
    rel_res = {**rel, "erank": _reldiff(float(a["erank"]), float(res["erank"])),
               "condition_number": _reldiff(float(a["condition_number"]),
                                            float(res["condition_number"]))}
    return {"reldiff": rel, "max_reldiff": worst,
            "reldiff_at_resolution": rel_res,
            "max_reldiff_at_resolution": max(rel_res.values()),
            "naive_values_below_resolution": res["below_resolution"],
            "worst_metric": max(rel, key=lambda k: rel[k]),
            "dead_units_equal": a["dead_units"] == b["dead_units"],
            "within_tol": worst <= AGREEMENT_TOL and a["dead_units"] == b["dead_units"]}


def _mark(m: dict[str, Any]) -> str:
    return "*" if m["cpu"]["other_share"] > CONTENTION_LIMIT else ""


def _naive_cell(r: dict[str, Any]) -> str:
    st = r["naive"]["status"]
    if st == "ok":
        return f"{r['naive']['time_s']:.2f}{_mark(r['naive'])}"
    if st == "timeout":
        return f">{r['naive']['timeout_s']:.0f} (timed out)"
    if st == "infeasible":
        return f"infeasible (needs ~{_gib(r['naive']['estimated_need_bytes'])} GiB, est.)"
    if st == "budget_exhausted":
        return "not run (budget)"
    return st


def print_table(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print()
    print(f"VGG11 width_mult={cfg['width']}  n={cfg['n']}  threads={cfg['threads']}  "
          f"seed={cfg['seed']}  naive budget={cfg['naive_budget_s']:.0f}s")
    if cfg["reason"]:
        print(f"({cfg['reason']})")
    head = (f"{'tap':<8} {'d':>6} {'gram':>5} {'X MiB':>6} | {'ours s':>7} {'+MiB':>6} | "
            f"{'naive s':>8} {'+MiB':>6} | {'t x':>6} {'mem x':>5} | {'rel diff':>8} "
            f"{'at res.':>8}")
    print(head)
    print("-" * len(head))
    for r in result["taps"]:
        o, nv = r["ours"], r["naive"]
        ours_t = f"{o['time_s']:.2f}{_mark(o)}" if o["status"] == "ok" else o["status"]
        ours_m = _mib(o.get("extra_peak_bytes"))
        both = o["status"] == "ok" and nv["status"] == "ok"
        line = (f"{r['tap']:<8} {r['d']:>6} {o.get('gram', '?'):>5} {_mib(r['x_bytes']):>6} | "
                f"{ours_t:>7} {ours_m:>6} | ")
        if both:
            ag = r["agreement"]
            flag = "" if ag["within_tol"] else " !"
            line += (f"{nv['time_s']:>7.2f}{_mark(nv) or ' '} {_mib(nv['extra_peak_bytes']):>6} | "
                     f"{r['time_ratio']:>6.1f} {r['peak_ratio']:>5.1f} | "
                     f"{ag['max_reldiff']:>8.1e} {ag['max_reldiff_at_resolution']:>8.1e}{flag}")
        else:
            line += _naive_cell(r)
        print(line)
    s = result["summary"]
    print()
    print(f"ours:  {s['ours_completed']}/{s['taps']} taps, total {s['ours_total_time_s']:.1f} s, "
          f"peak (X + extra, max over taps) {_gib(s['ours_peak_bytes'])} GiB")
    print(f"naive: {s['naive_completed']}/{s['taps']} taps completed "
          f"({s['naive_infeasible']} infeasible by memory estimate, {s['naive_timed_out']} "
          f"timed out, {s['naive_not_run_budget']} not run: budget), total "
          f"{s['naive_total_time_s']:.1f} s on the completed taps")
    b = s["both"]
    if b["taps"]:
        print(f"on the {len(b['taps'])} taps where both completed ({', '.join(b['taps'])}):")
        print(f"  time  naive/ours = {b['time_ratio']:.1f}x  "
              f"({b['naive_time_s']:.1f} s vs {b['ours_time_s']:.1f} s; per tap "
              f"{b['time_ratio_min']:.1f}x .. {b['time_ratio_max']:.1f}x)")
        print(f"  peak  naive/ours = {b['peak_ratio']:.1f}x  "
              f"({_gib(b['naive_peak_bytes'])} GiB vs {_gib(b['ours_peak_bytes'])} GiB; per "
              f"tap {b['peak_ratio_min']:.1f}x .. {b['peak_ratio_max']:.1f}x)")
        ok = b["agreement_within_tol"]
        print(f"  agreement: max relative difference {b['max_reldiff']:.1e} "
              f"({b['worst_metric']} at {b['worst_tap']}); "
              + (f"all metrics agree to {AGREEMENT_TOL:g} and dead units match on every tap"
                 if ok else f"NOT within {AGREEMENT_TOL:g} on: "
                 f"{', '.join(b['taps_outside_tol'])}"))
        print("  per metric: " + ", ".join(f"{k} {v:.1e}"
                                           for k, v in b["max_reldiff_by_metric"].items())
              + f"; dead units differ on {b['dead_units_mismatches']} taps")
        print(f"  with the naive singular values below escapelab's documented resolution "
              f"(sqrt(max(n, d) eps) s_max) set to zero: max relative difference "
              f"{b['max_reldiff_at_resolution']:.1e}")
    else:
        print("no tap where both methods completed: no ratios and no agreement check")
    code = result["code"]
    print(f"code: git {code['start']['git_head']}, escapelab/metrics.py sha256 "
          f"{str(code['start']['metrics_sha256'])[:12]}"
          + (", src/ has uncommitted changes" if code["start"]["src_uncommitted_changes"]
             else ""))
    if not code["consistent"]:
        print("WARNING: escapelab's code changed during the benchmark (src/ tree, src/ status "
              "or metrics.py differ between start, end and workers): results mix versions")
    if s["contended_timings"]:
        print(f"WARNING: other processes used more than {CONTENTION_LIMIT:.0%} of the CPUs "
              f"during {len(s['contended_timings'])} timings (marked *; max "
              f"{s['max_other_cpu_share']:.0%}): those times are inflated")
    else:
        print(f"no contention: other processes used at most {s['max_other_cpu_share']:.0%} of "
              "the CPUs during any timing")
    print(f"benchmark wall time {result['wall_s']:.1f} s "
          f"(features {result['features']['time_s']:.1f} s)")
    print(f"[t x / mem x: naive/ours time and peak (X + extra); +MiB: extra peak above the "
          f"worker's baseline with X loaded; rel diff: max relative difference over erank, "
          f"condition number, traces and discriminant; at res.: the same with the naive "
          f"singular values below escapelab's documented resolution zeroed; '!': rel diff "
          f"above {AGREEMENT_TOL:g} or dead units differ]")


def summarize(taps: list[dict[str, Any]]) -> dict[str, Any]:
    ours_ok = [r for r in taps if r["ours"]["status"] == "ok"]
    naive_ok = [r for r in taps if r["naive"]["status"] == "ok"]
    both = [r for r in taps if r["ours"]["status"] == "ok" and r["naive"]["status"] == "ok"]

    def peak(r: dict[str, Any], m: str) -> int:
        return r["x_bytes"] + r[m]["extra_peak_bytes"]

    out: dict[str, Any] = {
        "taps": len(taps),
        "ours_completed": len(ours_ok),
        "ours_total_time_s": sum(r["ours"]["time_s"] for r in ours_ok),
        "ours_peak_bytes": max((peak(r, "ours") for r in ours_ok), default=None),
        "naive_completed": len(naive_ok),
        "naive_total_time_s": sum(r["naive"]["time_s"] for r in naive_ok),
        "naive_peak_bytes": max((peak(r, "naive") for r in naive_ok), default=None),
        "naive_infeasible": sum(r["naive"]["status"] == "infeasible" for r in taps),
        "naive_timed_out": sum(r["naive"]["status"] == "timeout" for r in taps),
        "naive_not_run_budget": sum(r["naive"]["status"] == "budget_exhausted" for r in taps),
        "naive_errors": sum(r["naive"]["status"] == "error" for r in taps),
        "contended_timings": [f"{r['tap']}/{m}" for r in taps for m in ("ours", "naive")
                              if r[m]["status"] == "ok"
                              and r[m]["cpu"]["other_share"] > CONTENTION_LIMIT],
        "max_other_cpu_share": max((r[m]["cpu"]["other_share"] for r in taps
                                    for m in ("ours", "naive") if r[m]["status"] == "ok"),
                                   default=0.0),
        "note": "totals are over the taps each method completed; compare methods with "
                "'both', which is restricted to the taps where both completed",
    }
    b: dict[str, Any] = {"taps": [r["tap"] for r in both]}
    if both:
        t_naive = sum(r["naive"]["time_s"] for r in both)
        t_ours = sum(r["ours"]["time_s"] for r in both)
        p_naive = max(peak(r, "naive") for r in both)
        p_ours = max(peak(r, "ours") for r in both)
        worst = max(both, key=lambda r: r["agreement"]["max_reldiff"])
        b.update({
            "naive_time_s": t_naive, "ours_time_s": t_ours, "time_ratio": t_naive / t_ours,
            "time_ratio_min": min(r["time_ratio"] for r in both),
            "time_ratio_max": max(r["time_ratio"] for r in both),
            "naive_peak_bytes": p_naive, "ours_peak_bytes": p_ours,
            "peak_ratio": p_naive / p_ours,
            "peak_ratio_min": min(r["peak_ratio"] for r in both),
            "peak_ratio_max": max(r["peak_ratio"] for r in both),
            "max_reldiff": worst["agreement"]["max_reldiff"],
            "worst_metric": worst["agreement"]["worst_metric"], "worst_tap": worst["tap"],
            "max_reldiff_by_metric": {k: max(r["agreement"]["reldiff"][k] for r in both)
                                      for k in RESULT_KEYS},
            "max_reldiff_at_resolution": max(r["agreement"]["max_reldiff_at_resolution"]
                                             for r in both),
            "dead_units_mismatches": sum(not r["agreement"]["dead_units_equal"] for r in both),
            "taps_outside_tol": [r["tap"] for r in both if not r["agreement"]["within_tol"]],
            "agreement_within_tol": all(r["agreement"]["within_tol"] for r in both),
        })
    out["both"] = b
    return out


def code_check(start: dict[str, Any], end: dict[str, Any], rows: list[dict[str, Any]],
               ) -> dict[str, Any]:
    """The code version at start and end, and whether every worker of our method ran the
    same escapelab/metrics.py (it is imported afresh by each worker). Commits that do not
    touch src/ do not count as a change."""
    seen = sorted({r["ours"]["metrics_sha256"] for r in rows if r["ours"]["status"] == "ok"})
    keys = ("metrics_sha256", "git_src_tree", "src_uncommitted_changes")
    consistent = (all(start.get(k) == end.get(k) for k in keys)
                  and seen in ([], [start["metrics_sha256"]]))
    return {"start": start, "end": end, "worker_metrics_sha256": seen,
            "consistent": consistent}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    code_start = code_version()
    threads = args.threads
    workdir = Path(tempfile.mkdtemp(prefix="bench_analysis_", dir=args.workdir))
    try:
        spec = {"n": args.n, "width": args.width, "seed": args.seed, "threads": threads,
                "batch_size": args.batch_size, "workdir": str(workdir),
                "taps": [t for t in args.taps.split(",") if t] if args.taps else None}
        print(f"computing features: VGG11 width_mult={args.width}, n={args.n} ...", flush=True)
        feats = run_worker("features", spec, threads, None, workdir)
        if feats["status"] != "ok":
            raise SystemExit(f"feature worker failed:\n{feats.get('stderr_tail', '')}")
        print(f"  {len(feats['taps'])} taps in {feats['time_s']:.1f} s", flush=True)
        n = args.n
        labels = str(workdir / "labels.npy")
        rows: list[dict[str, Any]] = []
        for tap in feats["taps"]:
            d = feats["d"][tap]
            rows.append({"tap": tap, "shape": feats["shapes"][tap], "d": d,
                         "x_bytes": 4 * n * d,
                         "naive_estimated_need_bytes": naive_memory_estimate(n, d)})

        # OURS on every tap, network order.
        for r in rows:
            job = {"path": str(workdir / f"{r['tap']}.f32"), "labels": labels, "n": n,
                   "d": r["d"], "threads": threads}
            r["ours"] = run_worker("ours", job, threads, args.ours_timeout_s, workdir)
            o = r["ours"]
            msg = (f"{o['time_s']:.2f} s, +{_mib(o['extra_peak_bytes'])} MiB ({o['gram']})"
                   if o["status"] == "ok" else o["status"])
            print(f"  ours  {r['tap']:<8} d={r['d']:<6} {msg}", flush=True)

        # NAIVE, cheapest first, under the memory check and the time budget.
        budget_left = args.naive_budget_s
        for r in sorted(rows, key=lambda r: r["naive_estimated_need_bytes"]):
            need = r["naive_estimated_need_bytes"] + r["x_bytes"]
            available = _meminfo("MemAvailable")
            if need > args.mem_fraction * available:
                r["naive"] = {"status": "infeasible", "estimated_need_bytes": need,
                              "mem_available_bytes": available,
                              "note": "memory need is an ESTIMATE (16nd + 56d^2 + X bytes); "
                                      "not run"}
            elif budget_left < 1.0:
                r["naive"] = {"status": "budget_exhausted",
                              "note": "not run: naive time budget exhausted"}
            else:
                timeout = budget_left
                if args.naive_tap_timeout_s is not None:
                    timeout = min(timeout, args.naive_tap_timeout_s)
                job = {"path": str(workdir / f"{r['tap']}.f32"), "labels": labels, "n": n,
                       "d": r["d"], "threads": threads}
                r["naive"] = run_worker("naive", job, threads, timeout, workdir)
                budget_left -= r["naive"]["process_wall_s"]
                if r["naive"]["status"] == "timeout":
                    r["naive"]["note"] = (f"timed out after {timeout:.0f} s: its time is a "
                                          "lower bound, not a measurement")
            nv = r["naive"]
            msg = (f"{nv['time_s']:.2f} s, +{_mib(nv['extra_peak_bytes'])} MiB"
                   if nv["status"] == "ok" else _naive_cell(r))
            print(f"  naive {r['tap']:<8} d={r['d']:<6} {msg}", flush=True)

        for r in rows:
            if r["ours"]["status"] == "ok" and r["naive"]["status"] == "ok":
                r["agreement"] = agreement(r["ours"], r["naive"])
                r["time_ratio"] = r["naive"]["time_s"] / r["ours"]["time_s"]
                r["peak_ratio"] = ((r["x_bytes"] + r["naive"]["extra_peak_bytes"])
                                   / (r["x_bytes"] + r["ours"]["extra_peak_bytes"]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    default = args.n == DEFAULT_N and args.width == DEFAULT_WIDTH
    return {
        "benchmark": "escapelab layerwise analysis metrics vs naive float64 (one checkpoint)",
        "config": {"model": "vgg11", "width": args.width, "n": n, "input": [3, 32, 32],
                   "classes": NUM_CLASSES, "seed": args.seed, "threads": threads,
                   "naive_budget_s": args.naive_budget_s,
                   "naive_tap_timeout_s": args.naive_tap_timeout_s,
                   "ours_timeout_s": args.ours_timeout_s, "mem_fraction": args.mem_fraction,
                   "batch_size": args.batch_size, "reason": DEFAULT_REASON if default else "",
                   "taps_option": args.taps},
        "machine": {"cpus": os.cpu_count(), "mem_total_bytes": _meminfo("MemTotal"),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": feats["torch"], "numpy": feats["numpy"]},
        "memory_measure": "extra_peak_bytes = ru_maxrss after the method - ru_maxrss at the "
                          "baseline (X loaded into a preallocated array); peak = X bytes + "
                          "extra; each (tap, method) in a fresh subprocess",
        "features": {"time_s": feats["time_s"]},
        "taps": rows,
        "code": code_check(code_start, code_version(), rows),
        "summary": summarize(rows),
        "wall_s": time.perf_counter() - t_start,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=DEFAULT_N, help="samples")
    p.add_argument("--width", type=float, default=DEFAULT_WIDTH, help="VGG11 width_mult")
    p.add_argument("--taps", default="", help="comma-separated taps (default: all)")
    p.add_argument("--naive-budget-s", type=float, default=DEFAULT_NAIVE_BUDGET_S,
                   help="total wall-time budget of the naive runs")
    p.add_argument("--naive-tap-timeout-s", type=float, default=None,
                   help="per-tap timeout of a naive run (default: what is left of the budget)")
    p.add_argument("--ours-timeout-s", type=float, default=None,
                   help="per-tap timeout of our method (default: none)")
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="naive runs whose estimated need exceeds this share of MemAvailable "
                        "are skipped as infeasible")
    p.add_argument("--out", default="bench/results/analysis.json", help="JSON result file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads per worker (torch.set_num_threads and BLAS)")
    p.add_argument("--batch-size", type=int, default=250, help="forward-pass batch size")
    p.add_argument("--workdir", default=None,
                   help="where the temporary feature files go (default: the system temp dir)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        result = WORKERS[args.worker](spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return
    result = run_benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(result), indent=1, allow_nan=False) + "\n")
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
