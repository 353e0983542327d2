from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from escapelab.config import InitConfig, ModelConfig
from escapelab.init import distance, make_teacher_student, offset_stats
from escapelab.models import build_model


@pytest.fixture
def template():
    return build_model(ModelConfig(name="convnet", widths=[32, 64]), (1, 8, 8), head_dim=128)


def test_teacher_follows_kaiming_and_is_frozen(template):
    teacher, student = make_teacher_student(template, InitConfig(), 1, 2, torch.float32, "cpu")
    conv = teacher.encoder.conv2.weight.detach().double().numpy()
    fan_in = 32 * 3 * 3
    assert conv.std() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.05)
    assert abs(conv.mean()) < 0.01
    assert np.all(teacher.encoder.conv2.bias.numpy() == 0)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    fan_out = make_teacher_student(template, InitConfig(mode="fan_out"), 1, 2, torch.float32,
                                   "cpu")[0].encoder.conv2.weight.detach().double()
    assert float(fan_out.std()) == pytest.approx(math.sqrt(2.0 / (64 * 9)), rel=0.05)


def test_xavier_scale(template):
    teacher, _ = make_teacher_student(template, InitConfig(scheme="xavier_normal"), 1, 2,
                                      torch.float64, "cpu")
    w = teacher.head.weight.detach().numpy()
    fan_in, fan_out = w.shape[1], w.shape[0]
    assert w.std() == pytest.approx(math.sqrt(2.0 / (fan_in + fan_out)), rel=0.05)


def test_same_seed_same_teacher_and_different_seed_differs(template):
    a, _ = make_teacher_student(template, InitConfig(), 7, 8, torch.float32, "cpu")
    b, _ = make_teacher_student(template, InitConfig(), 7, 9, torch.float32, "cpu")
    c, _ = make_teacher_student(template, InitConfig(), 6, 8, torch.float32, "cpu")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.head.weight, c.head.weight)


def _he_draw(template, seed):
    """theta_tilde written out by hand: one generator, the weights of every conv and
    linear layer in module order, each N(0, 2 / fan_in) (He, fan_in, ReLU gain);
    biases zero."""
    generator = torch.Generator().manual_seed(seed)
    weights = []
    for module in template.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            shape = module.weight.shape
            fan_in = int(np.prod(shape[1:]))
            weights.append(torch.randn(shape, generator=generator, dtype=torch.float64)
                           * math.sqrt(2.0 / fan_in))
    return weights


def test_float64_realizes_the_intended_offset(template):
    cfg = InitConfig(sigma_eps=1e-10)
    teacher, student = make_teacher_student(template, cfg, 1, 2, torch.float64, "cpu")
    # Independent reference: the offset is sigma_eps times a fresh He draw from the
    # student's seed, drawn here without escapelab's init code.
    tilde = _he_draw(template, 2)
    teacher_weights = [m.weight for m in teacher.modules()
                       if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    student_weights = [m.weight for m in student.modules()
                       if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    for t, s_, d in zip(teacher_weights, student_weights, tilde, strict=True):
        # (s - t) carries the rounding of s, half an ulp of |t| <= ~1: atol 1e-15.
        torch.testing.assert_close(s_.detach() - t.detach(), 1e-10 * d, rtol=1e-6, atol=1e-15)
    intended = 1e-10 * math.sqrt(sum(float(d.pow(2).sum()) for d in tilde))
    stats = offset_stats(teacher, student, template, cfg, 2)
    assert stats["offset_intended"] == pytest.approx(intended, rel=1e-12)
    assert stats["offset_ratio"] == pytest.approx(1.0, abs=1e-5)
    weights = sum(p.numel() for n, p in teacher.named_parameters() if n.endswith("weight"))
    assert stats["changed_frac"] == pytest.approx(weights / stats["n_params"], abs=1e-3)
    assert float(distance(student, teacher)) == pytest.approx(stats["offset_realized"],
                                                               rel=1e-9)


def test_float32_loses_most_of_a_tiny_offset(template):
    cfg = InitConfig(sigma_eps=1e-10)
    teacher, student = make_teacher_student(template, cfg, 1, 2, torch.float32, "cpu")
    stats = offset_stats(teacher, student, template, cfg, 2)
    # Count, independently in NumPy, the weights that float32 rounding let move.
    moved = sum(int(np.sum(ps.detach().numpy() != pt.detach().numpy()))
                for ps, pt in zip(student.parameters(), teacher.parameters(), strict=True))
    assert stats["changed_frac"] == pytest.approx(moved / stats["n_params"])
    assert 0 < stats["changed_frac"] < 0.05
    assert 0 < stats["offset_ratio"] < 0.5
    # A larger offset survives rounding.
    big = offset_stats(*make_teacher_student(template, InitConfig(sigma_eps=1e-3), 1, 2,
                                             torch.float32, "cpu"),
                       template, InitConfig(sigma_eps=1e-3), 2)
    assert big["offset_ratio"] == pytest.approx(1.0, rel=1e-3)


def test_rescale_preserves_variance(template):
    cfg = InitConfig(sigma_eps=0.5, rescale=True)
    teacher, student = make_teacher_student(template, cfg, 1, 2, torch.float64, "cpu")
    tilde = _he_draw(template, 2)[-1]  # the head is the last linear layer
    expected = (teacher.head.weight + 0.5 * tilde) / math.sqrt(1.25)
    torch.testing.assert_close(student.head.weight.detach(), expected)
