"""Shared fixtures: tiny configs that train in a second or two on the CPU."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from escapelab.config import load_config


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def tiny_overrides(**extra: object) -> list[str]:
    """A synthetic 8x8 data set and a small convnet: ~1 ms per step."""
    base = {
        "data.name": "synthetic", "data.synthetic.n_train": 240, "data.synthetic.n_test": 120,
        "data.synthetic.size": 8, "data.batch_size": 32, "model.widths": "[8,16]",
        "model.d_out": 64, "train.steps": 60, "probe.log_until": 10, "probe.log_points": 5,
        "probe.every": 20, "checkpoint.every": 0,
        # On so small a net a 1e-10 offset rounds away entirely in float32.
        "init.sigma_eps": 1e-6,
        # The digits preset measures the sharpness ~50 times a run; lambda_0 stays.
        "sharpness.enabled": False,
    }
    base.update({k: v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny_config():
    def make(**extra: object):
        return load_config("digits", tiny_overrides(**extra))

    return make


def interrupt_at(step: int, signum: int = signal.SIGINT):
    """A `progress` callback that sends this process `signum` when the loop reports
    `step` (Ctrl-C mid-run, as a user would)."""

    def progress(k: int, total: int, info: object) -> None:
        if k == step:
            os.kill(os.getpid(), signum)

    return progress


def finished_and_interrupted(root) -> None:
    """Train a tiny finished run into ``root/finished`` and the same run stopped by
    Ctrl-C at step 25 (resumable, checkpoints every 10 steps) into ``root/interrupted``."""
    from escapelab.errors import RunInterrupted
    from escapelab.train import train

    cfg = load_config("digits", tiny_overrides(**{"checkpoint.every": 10}))
    train(cfg, root / "finished")
    with pytest.raises(RunInterrupted):
        train(cfg, root / "interrupted", progress=interrupt_at(25))
