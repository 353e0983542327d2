from __future__ import annotations

import math

import pytest

from escapelab.config import ScheduleConfig
from escapelab.schedules import lr_at


def test_constant():
    assert [lr_at(k, 10, 1e4, ScheduleConfig()) for k in (1, 5, 10)] == [1e4] * 3


def test_linear_warmup():
    cfg = ScheduleConfig(name="linear_warmup", warmup_steps=4)
    assert [lr_at(k, 10, 100.0, cfg) for k in range(1, 7)] == [25, 50, 75, 100, 100, 100]


def test_cosine_warmup():
    cfg = ScheduleConfig(name="cosine_warmup", warmup_steps=4)
    got = [lr_at(k, 10, 2.0, cfg) for k in range(1, 6)]
    want = [1 - math.cos(math.pi * min(1, k / 4)) for k in range(1, 6)]
    assert got == pytest.approx(want)
    assert got[1] == pytest.approx(1.0) and got[3] == pytest.approx(2.0)


def test_exponential_range_spans_start_to_end_geometrically():
    cfg = ScheduleConfig(name="exponential", start_lr=1e-6)
    lrs = [lr_at(k, 13, 1e6, cfg) for k in range(1, 14)]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e6)
    assert lrs[6] == pytest.approx(1.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    assert ratios == pytest.approx([10.0] * 12)
