from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import interrupt_at
from escapelab.config import load_config
from escapelab.errors import RunDirError
from escapelab.store import RunDir, read_jsonl
from escapelab.train import RunInterrupted, accumulate_gradient, build, resume, train


def _strip_wall(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def test_full_batch_step_equals_one_step_on_the_whole_batch(tiny_config):
    cfg = tiny_config(**{"data.batch_size": "full"})
    s = build(cfg)
    idx = torch.arange(len(s.data.y_train))
    # Escape away from the teacher first so that gradients are not ~0.
    with torch.no_grad():
        for p in s.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    whole = accumulate_gradient(s.student, s.data.x_train, idx, s.targets, s.teacher,
                                s.loss_fn, micro_batch=len(idx))
    g_whole = [p.grad.clone() for p in s.student.parameters()]
    parts = accumulate_gradient(s.student, s.data.x_train, idx, s.targets, s.teacher,
                                s.loss_fn, micro_batch=37)  # uneven micro-batches
    for a, p in zip(g_whole, s.student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=0)
    # And the mean gradient itself, against an explicit float64 per-sample average.
    model64 = s.student.double()
    targets64 = s.teacher.double()(s.data.x_train.double()).detach()
    ref = [torch.zeros_like(p) for p in model64.parameters()]
    for i in range(0, len(idx), 60):
        model64.zero_grad()
        out = model64(s.data.x_train[i:i + 60].double())
        (s.loss_fn(out, targets64[i:i + 60]) * 60 / len(idx)).backward()
        ref = [r + p.grad for r, p in zip(ref, model64.parameters(), strict=True)]
    for r, a in zip(ref, g_whole, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-8)


def test_micro_batched_run_follows_the_same_trajectory(tiny_config, tmp_path):
    # Away from float32 rounding level (a visible offset), micro-batching changes nothing.
    common = {"train.steps": 8, "init.sigma_eps": 1e-2, "optim.lr": 300}
    a = train(tiny_config(**common), tmp_path / "a")
    b = train(tiny_config(**common, **{"data.micro_batch_size": 10}), tmp_path / "b")
    la = read_jsonl(tmp_path / "a/metrics/steps.jsonl")
    lb = read_jsonl(tmp_path / "b/metrics/steps.jsonl")
    np.testing.assert_allclose([r["loss"] for r in lb], [r["loss"] for r in la], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in lb], [r["grad_norm"] for r in la],
                               rtol=1e-4)
    assert a["status"] == b["status"] == "completed"


def test_same_seed_gives_identical_metrics(tiny_config, tmp_path):
    cfg = tiny_config(**{"optim.lr": 3e4})
    train(cfg, tmp_path / "a")
    train(cfg, tmp_path / "b")
    for name in ("metrics/steps.jsonl", "metrics/evals.jsonl"):
        a = _strip_wall(read_jsonl(tmp_path / "a" / name))
        b = _strip_wall(read_jsonl(tmp_path / "b" / name))
        assert a == b and len(a) > 5
    other = tiny_config(**{"optim.lr": 3e4, "seed": 1})
    train(other, tmp_path / "c")
    assert (read_jsonl(tmp_path / "a/metrics/steps.jsonl")
            != read_jsonl(tmp_path / "c/metrics/steps.jsonl"))


def test_run_directory_contents(tiny_config, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(**{"checkpoint.steps": "[0,5]"}), out)
    for name in ("config.yaml", "derived.json", "environment.json", "init.json",
                 "status.json", "summary.json", "metrics/steps.jsonl", "metrics/evals.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text()) == summary.model_dump()
    names = RunDir(out).checkpoint_names()
    assert {"T", "S", "step_0", "step_5"} <= set(names)
    assert not (out / "checkpoints/last.safetensors").exists()
    steps = read_jsonl(out / "metrics/steps.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert set(steps[0]) == {"step", "lr", "loss", "grad_norm", "dist_teacher"}
    evals = read_jsonl(out / "metrics/evals.jsonl")
    assert evals[0]["model"] == "teacher"
    for key in ("status", "teacher_probe_acc", "final_probe_acc", "min_probe_acc",
                "min_probe_acc_step", "escape_step", "collapse_step", "erank_teacher",
                "erank_collapse", "erank_final", "dead_frac_teacher", "dead_frac_collapse",
                "dead_frac_final", "wall_s"):
        assert key in summary.model_dump()
    for key in ("teacher_probe_acc", "final_probe_acc", "min_probe_acc"):
        assert 0.0 <= summary[key] <= 1.0
    # The saved S checkpoint reproduces the final evaluation.
    cfg = tiny_config(**{"checkpoint.steps": "[0,5]"})
    s = build(cfg)
    tensors, meta = RunDir(out).load_checkpoint("S")
    s.student.load_state_dict(tensors)
    assert meta["step"] == 60
    assert s.evaluator(s.student)["probe_acc"] == summary["final_probe_acc"]
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg, out)
    tf32 = json.loads((out / "environment.json").read_text())["tf32"]
    assert tf32 == {"matmul_allow_tf32": False, "cudnn_allow_tf32": False,
                    "float32_matmul_precision": "highest"}


def test_tf32_is_set_explicitly_both_ways():
    """PyTorch's default lets cuDNN convolutions use TF32; escape runs switch it off."""
    from escapelab.runtime import set_tf32, setup_torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    try:
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        setup_torch(None, False, "cpu")
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "highest"
        set_tf32(True)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_escape_and_collapse_are_found(tiny_config, tmp_path):
    # On this tiny net a 1e-10 offset rounds away entirely in float32; use 1e-6.
    summary = train(tiny_config(**{"optim.lr": 3e4, "train.steps": 40,
                                   "init.sigma_eps": 1e-6}), tmp_path / "r")
    steps = read_jsonl(tmp_path / "r/metrics/steps.jsonl")
    first = next(r["step"] for r in steps if r["loss"] > 1e-8)
    assert summary["escape_step"] == first
    evals = [r for r in read_jsonl(tmp_path / "r/metrics/evals.jsonl")
             if r["model"] == "student" and r["step"] >= first]
    lowest = min(evals, key=lambda r: r["erank"])
    assert summary["collapse_step"] == lowest["step"]
    assert summary["erank_collapse"] == lowest["erank"]
    _, meta = RunDir(tmp_path / "r").load_checkpoint("C")
    assert meta["step"] == lowest["step"]


def test_mse_at_huge_step_size_diverges_with_a_complete_run_directory(tmp_path):
    cfg = load_config("digits", ["optim.lr=1e4", "loss.name=mse"])
    summary = train(cfg, tmp_path / "r")
    assert summary["status"] == "diverged" and "non-finite" in summary["reason"]
    steps = read_jsonl(tmp_path / "r/metrics/steps.jsonl")
    assert steps[-1]["step"] < 3000
    assert steps[-1]["loss"] is None or steps[-1]["grad_norm"] is None
    assert all(r["loss"] is not None for r in steps[:-1])
    assert summary["steps_completed"] == steps[-1]["step"] - 1
    assert RunDir(tmp_path / "r").status().status == "diverged"
    _, meta = RunDir(tmp_path / "r").load_checkpoint("S")
    assert meta["step"] == summary["steps_completed"] and meta["kind"] == "last_finite"
    assert summary["teacher_probe_acc"] is not None


def test_interrupted_run_resumes_to_the_same_result(tiny_config, tmp_path):
    cfg = tiny_config(**{"checkpoint.every": 20, "optim.lr": 3e4})
    reference = train(cfg, tmp_path / "ref")

    interrupt = interrupt_at(30)

    with pytest.raises(RunInterrupted, match="--resume"):
        train(cfg, tmp_path / "cut", progress=interrupt)
    run = RunDir(tmp_path / "cut")
    assert not run.finished and run.status().status == "interrupted"
    assert run.status().step == 30  # the signal came during step 30: stops after it
    assert run.status().resumable
    resumed = resume(tmp_path / "cut")
    for key in ("final_probe_acc", "escape_step", "collapse_step", "erank_final"):
        assert resumed[key] == reference[key]
    for name in ("metrics/steps.jsonl", "metrics/evals.jsonl"):
        assert (_strip_wall(read_jsonl(tmp_path / "cut" / name))
                == _strip_wall(read_jsonl(tmp_path / "ref" / name)))
    with pytest.raises(RunDirError, match="nothing to resume"):
        resume(tmp_path / "cut")


def test_momentum_state_survives_resume(tiny_config, tmp_path):
    cfg = tiny_config(**{"checkpoint.every": 20, "optim.lr": 10, "optim.momentum": 0.9,
                         "loss.name": "ce"})
    train(cfg, tmp_path / "ref")

    interrupt = interrupt_at(25)

    with pytest.raises(RunInterrupted):
        train(cfg, tmp_path / "cut", progress=interrupt)
    resume(tmp_path / "cut")
    assert (read_jsonl(tmp_path / "cut/metrics/steps.jsonl")
            == read_jsonl(tmp_path / "ref/metrics/steps.jsonl"))


@pytest.mark.parametrize(("overrides", "status"), [
    ({"loss.name": "mse", "optim.lr": 1.0}, "completed"),
    ({"loss.name": "mse", "optim.lr": 1e4}, "diverged"),
    ({"loss.name": "ndmse", "schedule.name": "linear_warmup", "schedule.warmup_steps": 20},
     "completed"),
    ({"loss.name": "dino", "optim.lr": 10, "schedule.name": "cosine_warmup",
      "schedule.warmup_steps": 10}, "completed"),
    ({"loss.name": "onehot_mse", "optim.lr": 0.1, "data.batch_size": "full"}, "completed"),
    ({"model.name": "mlp", "model.batch_norm": False, "optim.weight_decay": 1e-4,
      "optim.lr": 1e3}, "completed"),
    # eta * weight decay = 3: each step multiplies the weights by -2.
    ({"model.name": "mlp", "optim.weight_decay": 1e-4, "optim.lr": 3e4}, "diverged"),
    ({"model.batch_norm": True, "data.micro_batch_size": 16}, "completed"),
    ({"schedule.name": "exponential", "schedule.start_lr": 1e-3, "optim.lr": 1e3},
     "completed"),
    ({"train.steps": "null", "train.epochs": 2}, "completed"),
    ({"loss.name": "ce", "optim.lr": 1.0, "train.max_loss": 1e-3}, "capped"),
])
def test_configurations_run_to_their_expected_end(tiny_config, tmp_path, overrides, status):
    summary = train(tiny_config(**overrides), tmp_path / "r")
    assert summary.status == status, summary.reason
    steps = read_jsonl(tmp_path / "r/metrics/steps.jsonl")
    assert len(steps) == summary.steps_completed + (status != "completed")
    if status == "completed":
        assert all(np.isfinite([r["loss"] for r in steps]))
        assert summary.steps_completed == summary.total_steps
    if status == "diverged":
        assert steps[-1]["loss"] is None or steps[-1]["grad_norm"] is None
    if status == "capped":
        assert steps[-1]["loss"] > 1e-3 and summary.steps_completed == steps[-1]["step"] - 1
    if overrides.get("schedule.name") == "exponential":
        assert steps[0]["lr"] == pytest.approx(1e-3) and steps[-1]["lr"] == pytest.approx(1e3)
    if "train.epochs" in overrides:
        assert summary.total_steps == 2 * (240 // 32)


def test_float64_run_realizes_the_offset(tiny_config, tmp_path):
    cfg = tiny_config(**{"dtype": "float64", "init.sigma_eps": 1e-10, "train.steps": 5})
    summary = train(cfg, tmp_path / "r")
    init = json.loads((tmp_path / "r/init.json").read_text())
    assert init["offset_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert summary["loss_init"] > 0
    tensors, _ = RunDir(tmp_path / "r").load_checkpoint("S")
    assert all(t.dtype == torch.float64 for t in tensors.values())


def test_denormal_flushing_does_not_leak_out_of_training(tiny_config, tmp_path):
    from escapelab.runtime import flushing_denormals

    assert not flushing_denormals()
    train(tiny_config(**{"train.steps": 3, "train.flush_denormal": True}), tmp_path / "r")
    assert not flushing_denormals()
    assert float(torch.tensor([1e-40]) * 1.0) > 0  # subnormals survive after a run


def test_channels_last_keeps_the_float64_trajectory(tmp_path):
    """Channels-last memory changes kernels, not the arithmetic: in float64 the run
    follows the default one to rounding level (1e-4 relative leaves room for the
    escape's amplification of ~1e-16 differences, and none for a wrong batch, step
    size, teacher, or a max-pool that breaks ties elsewhere: the digits background
    gives tied maxima, and torch.compile's max-pool, which breaks them differently,
    moved the first gradient's norm 4x)."""
    extra = ["dtype=float64", "train.steps=40", "probe.enabled=false",
             "sharpness.enabled=false", "checkpoint.every=0", "optim.lr=3e4"]
    default = train(load_config("digits", extra), tmp_path / "default")
    other = train(load_config("digits", [*extra, "train.channels_last=true"]),
                  tmp_path / "other")
    a = read_jsonl(tmp_path / "default/metrics/steps.jsonl")
    b = read_jsonl(tmp_path / "other/metrics/steps.jsonl")
    assert len(a) == len(b) == 40
    assert a[-1]["loss"] > 1e6 * a[0]["loss"]  # it escaped within the comparison
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "grad_norm", "dist_teacher"):
            assert abs(x[key] - y[key]) <= 1e-4 * abs(x[key]), (key, x, y)
    assert other.status == default.status == "completed"
    tensors, _ = RunDir(tmp_path / "other").load_checkpoint("S")  # contiguous on disk
    assert all(t.is_contiguous() for t in tensors.values())


def test_dist_teacher_is_the_float64_distance_of_the_saved_weights(tmp_path):
    """The step record's distance after the last update against NumPy float64 on the
    checkpoints S and T; and at step 1, where a float32 student is ~1e-6 away and the
    squares of its differences would underflow float32."""
    from conftest import tiny_overrides

    train(load_config("digits", tiny_overrides()), tmp_path / "r")
    run = RunDir(tmp_path / "r")
    s, _ = run.load_checkpoint("S")
    t, _ = run.load_checkpoint("T")
    want = np.sqrt(sum(np.sum((s[k].double().numpy() - t[k].double().numpy()) ** 2)
                       for k in s))
    last = read_jsonl(tmp_path / "r/metrics/steps.jsonl")[-1]
    assert last["dist_teacher"] == pytest.approx(want, rel=1e-7)
    from escapelab.init import distance

    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():  # differences of ~1e-25: their squares underflow float32
        a.weight.mul_(1e-24)
        b.weight.copy_(a.weight * 1.5)
        b.bias.copy_(a.bias)
    got = distance(b, a).item()
    diff = (b.weight.detach().double() - a.weight.detach().double()).numpy()
    assert got == pytest.approx(np.sqrt(np.sum(diff**2)), rel=1e-6) and got > 1e-26
