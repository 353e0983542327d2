"""Step-size schedules as pure functions of the (1-based) step.

Step k uses ``lr_at(k, ...)`` for the update that turns theta^(k-1) into theta^(k).

- constant:       eta
- linear_warmup:  eta * min(1, k / W)                        (paper App. A)
- cosine_warmup:  eta * (1 - cos(pi * min(1, k / W))) / 2
- exponential:    start * (eta / start) ** ((k - 1) / (T - 1)), from start at step 1 to
                  eta at step T (the LR range test, paper Fig. 1a: 1e-6 -> 1e6)
"""

from __future__ import annotations

import math

from escapelab.config import ScheduleConfig


def lr_at(step: int, total_steps: int, lr: float, cfg: ScheduleConfig) -> float:
    """Step size of step `step` (1..total_steps) for peak/final step size `lr`."""
    if cfg.name == "constant":
        return lr
    if cfg.name == "linear_warmup":
        return lr * min(1.0, step / cfg.warmup_steps)
    if cfg.name == "cosine_warmup":
        return lr * (1.0 - math.cos(math.pi * min(1.0, step / cfg.warmup_steps))) / 2.0
    if cfg.name == "exponential":
        if total_steps <= 1:
            return lr
        frac = (step - 1) / (total_steps - 1)
        return cfg.start_lr * math.exp(frac * math.log(lr / cfg.start_lr))
    raise ValueError(f"unknown schedule {cfg.name!r}")
