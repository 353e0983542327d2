"""One full-batch run over two processes (torch.distributed, gloo on the CPU) follows
the single-process trajectory."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from conftest import tiny_overrides
from escapelab.config import load_config
from escapelab.store import read_jsonl
from escapelab.train import train


def test_two_gloo_ranks_match_the_single_process_trajectory(tmp_path):
    # Away from the teacher's rounding level (a visible offset), so that the trajectory
    # is signal, not float32 noise.
    over = tiny_overrides(**{"data.batch_size": "full", "init.sigma_eps": 1e-2,
                             "optim.lr": 300, "train.steps": 12, "probe.log_until": 4,
                             "probe.every": 6})
    single = train(load_config("digits", over), tmp_path / "one")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "escapelab", "run", "--quiet", "--out", str(tmp_path / "two"), *over]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory:") == 1  # only rank 0 reports
    one = read_jsonl(tmp_path / "one/metrics/steps.jsonl")
    two = read_jsonl(tmp_path / "two/metrics/steps.jsonl")
    assert [r["step"] for r in two] == list(range(1, 13))
    for key in ("loss", "grad_norm", "dist_teacher"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4,
                                   err_msg=key)
    assert single["final_probe_acc"] is not None
    # The same run directory (the CLI adds its report), written once, by rank 0.
    written = {p.name for p in (tmp_path / "two").iterdir()} - {"report.html", "figures"}
    assert written == {p.name for p in (tmp_path / "one").iterdir()}
