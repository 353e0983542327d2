"""The step-size sweep with runs per process vs one process per run (issue 12).

    python bench/bench_sweep.py           # the step-size preset, 18 runs, both ways
    python bench/bench_sweep.py --quick   # 2 step sizes x 2 seeds, 100 steps

Both sweeps run ``escapelab sweep --preset step-size`` as a user would, on the same
cores (default workers: one per core), one after the other: ``--no-group`` (one spawned
process per point) and the default (points that differ only in step size and seed
trained together, :mod:`escapelab.group`). Reported: wall seconds of each, their ratio,
and whether every point has the same phase both ways and every step size's mean gain
agrees within the seeds' spread (the larger of the two standard deviations, at least
one test image).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET = 3.0


def sweep(out: Path, group: bool, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "escapelab", "sweep", "--preset", "step-size", "--out",
           str(out), "--group" if group else "--no-group", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run(quick: bool) -> dict[str, Any]:
    extra = ["train.steps=100", "--grid", "optim.lr=1e3,3e4", "--grid", "seed=0,1"] \
        if quick else []
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        seq_s = sweep(Path(tmp) / "sequential", False, extra)
        grp_s = sweep(Path(tmp) / "grouped", True, extra)
        rows = {name: {r["run"]: r for r in read(Path(tmp) / name / "runs.csv")}
                for name in ("sequential", "grouped")}
        tables = {name: read(Path(tmp) / name / "table.csv")
                  for name in ("sequential", "grouped")}
        groups = sorted({json.loads((p / "environment.json").read_text()).get("group", 1)
                         for p in (Path(tmp) / "grouped" / "runs").iterdir()})
    phases = {run: (r["phase"], rows["grouped"][run]["phase"])
              for run, r in rows["sequential"].items()}
    same_phase = all(a == b for a, b in phases.values())
    gains = []
    for a, b in zip(tables["sequential"], tables["grouped"], strict=True):
        spread = max(float(a["gain_std"] or 0), float(b["gain_std"] or 0), 1 / 540)
        diff = abs(float(a["gain_mean"]) - float(b["gain_mean"]))
        gains.append({"optim.lr": a["optim.lr"], "sequential": float(a["gain_mean"]),
                      "grouped": float(b["gain_mean"]), "difference": diff,
                      "spread": spread, "ok": diff <= spread})
    ratio = seq_s / grp_s
    return {"points": len(phases), "sequential_s": seq_s, "grouped_s": grp_s,
            "speedup": ratio, "group_sizes": groups, "same_phase": same_phase,
            "phases": phases, "gains": gains,
            "gains_ok": all(g["ok"] for g in gains),
            "met": ratio >= TARGET and same_phase and all(g["ok"] for g in gains)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    result = run(p.parse_args().quick)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
