"""Sharpness against the exact Hessian of tiny models (torch.autograd.functional.hessian
on the flat parameter vector, eigenvalues by numpy.linalg.eigvalsh in float64), the
Gauss-Newton shortcut at the teacher, warm starts, micro-batches, and what a run, its
report and the LR range test make of it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from conftest import interrupt_at, tiny_overrides
from escapelab.config import InitConfig, LossConfig, ModelConfig, SharpnessConfig, load_config
from escapelab.init import make_teacher_student
from escapelab.losses import make_loss
from escapelab.lr_range import RangeOptions, run_lr_range
from escapelab.models import build_model
from escapelab.report import load_run, run_figures
from escapelab.sharpness import (
    Chunks,
    Sharpness,
    gauss_newton_vector_product,
    hessian_vector_product,
    lanczos,
)
from escapelab.store import RunDir, read_jsonl
from escapelab.train import train

LOSSES = ("mse", "nmse", "ndmse")


def tiny(arch: str = "convnet", seed: int = 0):
    """A float64 teacher and student of a few hundred parameters, and 40 inputs."""
    widths = [3, 4] if arch == "convnet" else [12]
    template = build_model(ModelConfig(name=arch, widths=widths, d_out=6), (1, 4, 4), 6)
    teacher, student = make_teacher_student(template, InitConfig(sigma_eps=0.0), 10 + seed,
                                            20 + seed, torch.float64, "cpu")
    x = torch.randn(40, 1, 4, 4, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    return teacher, student, x


def moved(model, scale: float, seed: int = 1):
    """A copy with every parameter moved by `scale` times its own RMS (random signs)."""
    out = copy.deepcopy(model).requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            rms = float(p.pow(2).mean().sqrt()) or 1.0
            p.add_(scale * rms * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return out


def exact_hessian(model, chunks: Chunks, loss_fn) -> np.ndarray:
    """The full Hessian of sum_m w_m L(b_m) on the flat parameter vector (float64)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(flat):
        params = {n: part.view(s) for n, part, s in zip(names, flat.split(sizes), shapes,
                                                        strict=True)}
        return sum(w * loss_fn(functional_call(model, params, (xb,)), t)
                   for xb, t, w in zip(chunks.x, chunks.targets, chunks.weights, strict=True))

    return torch.autograd.functional.hessian(loss_of, flat0).numpy()


def sharpness_for(loss: str, chunks: Chunks, k: int = 1, tol: float = 1e-10,
                  max_hvp: int = 300) -> Sharpness:
    cfg = SharpnessConfig(k=k, tol=tol, max_hvp=max_hvp)
    return Sharpness(cfg, make_loss(LossConfig(name=loss)), loss, chunks,
                     torch.Generator().manual_seed(0))


def setup(loss: str, where: str, arch: str = "convnet", micro: int = 40):
    teacher, student, x = tiny(arch)
    model = student if where == "teacher" else moved(teacher, 0.3)
    chunks = Chunks.build(x, torch.arange(len(x)), None, teacher, micro)
    return teacher, model, chunks


@pytest.mark.parametrize("where", ["teacher", "away"])
@pytest.mark.parametrize("loss", LOSSES)
def test_top_eigenvalues_equal_the_exact_hessians(loss, where):
    teacher, model, chunks = setup(loss, where)
    n = sum(p.numel() for p in model.parameters())
    assert 150 < n < 400
    exact = np.linalg.eigvalsh(exact_hessian(model, chunks, make_loss(LossConfig(name=loss))))
    record = sharpness_for(loss, chunks, k=3).measure(model)
    assert record["converged"] and record["method"] == "hessian"
    np.testing.assert_allclose(record["eigenvalues"], exact[::-1][:3], rtol=1e-4)
    top = exact[-1]
    assert top > 1e-3 * np.abs(exact).max() > 0  # a real top eigenvalue, not rounding
    assert max(record["residuals"]) <= 1e-10 * abs(top) * 1.0001
    if where == "teacher":  # sigma_eps = 0: exactly the teacher, loss and gradient 0
        assert record["loss"] == 0.0


def test_mlp_too_and_the_whole_spectrum_at_the_end():
    _, model, chunks = setup("nmse", "away", arch="mlp")
    exact = np.linalg.eigvalsh(exact_hessian(model, chunks, make_loss(LossConfig(name="nmse"))))
    record = sharpness_for("nmse", chunks).measure(model)
    assert record["eigenvalues"][0] == pytest.approx(exact[-1], rel=1e-4)
    # Given as many products as parameters, Lanczos spans the space: every eigenvalue.
    n = len(exact)
    matrix = torch.from_numpy(exact_hessian(model, chunks, make_loss(LossConfig(name="nmse"))))
    eigen = lanczos(lambda v: matrix @ v, torch.ones(n, dtype=torch.float64), k=n, tol=1e-12,
                    max_products=n)
    np.testing.assert_allclose(eigen.values, exact[::-1], atol=1e-9 * abs(exact).max())


@pytest.mark.parametrize("loss", LOSSES)
def test_gauss_newton_equals_the_hessian_at_the_teacher(loss):
    teacher, model, chunks = setup(loss, "teacher")
    loss_fn = make_loss(LossConfig(name=loss))
    hessian = exact_hessian(teacher, chunks, loss_fn)
    n = len(hessian)
    basis = torch.eye(n, dtype=torch.float64)
    gauss_newton = torch.stack([gauss_newton_vector_product(teacher, chunks, loss_fn, e)[0]
                                for e in basis]).numpy()
    np.testing.assert_allclose(gauss_newton, hessian, atol=1e-10 * np.abs(hessian).max())
    record = sharpness_for(loss, chunks).at_teacher(teacher)
    assert record["method"] == "gauss_newton" and record["loss"] == 0.0
    assert record["eigenvalues"][0] == pytest.approx(np.linalg.eigvalsh(hessian)[-1], rel=1e-4)


def test_gauss_newton_is_not_the_hessian_away_from_the_teacher():
    # The comparison that passes at the teacher fails here: the residual term matters.
    _, model, chunks = setup("nmse", "away")
    loss_fn = make_loss(LossConfig(name="nmse"))
    exact = np.linalg.eigvalsh(exact_hessian(model, chunks, loss_fn))[-1]
    gn = sharpness_for("nmse", chunks).measure(model, gauss_newton=True)["eigenvalues"][0]
    assert abs(gn - exact) / exact > 1e-3  # 10x the tolerance that holds at the teacher
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv = hessian_vector_product(model, chunks, loss_fn, v)[0]
    gv = gauss_newton_vector_product(model, chunks, loss_fn, v)[0]
    assert float((hv - gv).norm() / hv.norm()) > 1e-3


def test_warm_start_needs_fewer_products():
    teacher, _, x = tiny()
    chunks = Chunks.build(x, torch.arange(len(x)), None, teacher, 40)
    here = moved(teacher, 0.3)
    there = moved(here, 0.01, seed=7)  # a nearby point, as one measurement to the next
    sharp = sharpness_for("nmse", chunks, tol=1e-6)
    sharp.measure(here)
    warm = sharp.measure(there)
    sharp.vectors = None
    cold = sharp.measure(there)
    assert warm["converged"] and cold["converged"]
    assert warm["eigenvalues"][0] == pytest.approx(cold["eigenvalues"][0], rel=1e-6)
    assert warm["hvp"] < cold["hvp"], (warm["hvp"], cold["hvp"])


def test_micro_batches_give_the_eigenvalue_of_the_whole_subset():
    teacher, _, x = tiny()
    model = moved(teacher, 0.3)
    idx = torch.arange(len(x))
    whole = Chunks.build(x, idx, None, teacher, len(x))
    parts = Chunks.build(x, idx, None, teacher, 7)  # uneven: 5 x 7 + 5
    assert len(parts.x) == 6 and sum(parts.weights) == pytest.approx(1.0)
    with torch.no_grad():  # targets: the teacher on each micro-batch
        torch.testing.assert_close(torch.cat(parts.targets), teacher(x))
    a = sharpness_for("nmse", whole).measure(model)
    b = sharpness_for("nmse", parts).measure(model)
    assert b["eigenvalues"][0] == pytest.approx(a["eigenvalues"][0], rel=1e-8)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)


SHARP = {"optim.lr": 3e4, "sharpness.enabled": True, "sharpness.log_until": 10,
         "sharpness.log_points": 4, "sharpness.every": 25, "sharpness.samples": 100}


@pytest.fixture(scope="module")
def sharp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "run"
    summary = train(load_config("digits", tiny_overrides(**SHARP)), out)
    return out, summary


def test_a_run_writes_its_schedule_and_lambda0(sharp_run):
    out, summary = sharp_run
    run = RunDir(out)
    derived, records = run.derived(), run.sharpness()
    teacher = records[0]
    assert teacher.model == "teacher" and teacher.method == "gauss_newton"
    student = [r for r in records if r.model == "student"]
    assert [r.step for r in student] == derived.sharpness_steps
    assert derived.sharpness_steps[:2] == [0, 1] and derived.sharpness_steps[-1] == 60
    assert all(r.samples == 100 and r.hvp <= 20 and len(r.eigenvalues) == 1 for r in records)
    assert summary["lambda0"] == teacher.top > 0
    assert summary["eta_lambda0"] == pytest.approx(3e4 * teacher.top)
    assert summary["lambda_max"] == max(r.top for r in student)
    assert summary["lambda_final"] == student[-1].top
    # Step 0: a student 1e-6 from its teacher has (nearly) the teacher's Hessian.
    assert student[0].top == pytest.approx(teacher.top, rel=1e-2)
    # The same lines, read as plain JSON.
    assert [r["step"] for r in read_jsonl(out / "metrics/sharpness.jsonl")] == \
        [0] + derived.sharpness_steps


def test_sharpness_off_still_measures_lambda0(tiny_config, tmp_path):
    summary = train(tiny_config(**{"train.steps": 5}), tmp_path / "run")
    records = RunDir(tmp_path / "run").sharpness()
    assert [r.model for r in records] == ["teacher"]
    assert summary["lambda0"] == records[0].top and summary["lambda_max"] is None


def test_rewind_keeps_lambda0_and_the_measurements_up_to_the_step(sharp_run, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(sharp_run[0], copy_dir)
    run = RunDir(copy_dir)
    kept = run.rewind(6)
    steps = [(r.model, r.step) for r in run.sharpness()]
    assert steps == [("teacher", 0)] + [("student", k) for k in run.derived().sharpness_steps
                                        if k <= 6]
    assert len(steps) >= 4 and list(kept.values())[-1] == len(steps)


def test_report_draws_exactly_the_files_series(sharp_run):
    out, summary = sharp_run
    figs = {d.id: d.figure for d in run_figures(load_run(out))}
    lines = {line.get_gid(): line for ax in figs["fig1b_sharpness"].axes
             for line in ax.get_lines() if line.get_gid()}
    records = [r for r in read_jsonl(out / "metrics/sharpness.jsonl") if r["model"] == "student"]
    shown = [r for r in records if r["eigenvalues"][0] > 0]
    np.testing.assert_array_equal(lines["lambda_1"].get_xdata(), [r["step"] for r in shown])
    np.testing.assert_allclose(lines["lambda_1"].get_ydata(),
                               [r["eigenvalues"][0] for r in shown])
    steps = read_jsonl(out / "metrics/steps.jsonl")
    np.testing.assert_allclose(lines["two_over_eta"].get_ydata(), [2 / r["lr"] for r in steps])
    np.testing.assert_array_equal(lines["two_over_eta"].get_xdata(), [r["step"] for r in steps])
    positive = [r for r in steps if r["loss"] > 0]
    np.testing.assert_allclose(lines["loss"].get_ydata(), [r["loss"] for r in positive])
    assert lines["lambda0"].get_ydata()[0] == pytest.approx(summary["lambda0"])
    assert summary["collapse_step"] is not None
    assert lines["collapse"].get_xdata()[0] == summary["collapse_step"]


def test_lr_range_reports_lambda0_per_seed(tmp_path):
    payload = run_lr_range(load_config("digits", tiny_overrides(**SHARP)), tmp_path,
                           RangeOptions(steps=20, seeds=(0, 1), supervised="none"))
    for seed in ("0", "1"):
        info = payload["curves"]["escape"]["seeds"][seed]
        run = RunDir(tmp_path / "runs" / f"escape-s{seed}")
        assert info["lambda0"] == run.summary()["lambda0"] > 0
        assert info["edge_lr"] == pytest.approx(2 / info["lambda0"])
        if info["depart_lr"] is not None:
            assert info["depart_eta_lambda0"] == pytest.approx(info["depart_lr"]
                                                               * info["lambda0"])
        # The curves measure lambda_0 only: no sharpness schedule during the range test.
        assert [r.model for r in run.sharpness()] == ["teacher"]
    assert not math.isnan(payload["curves"]["escape"]["seeds"]["0"]["lambda0"])


def test_resume_continues_the_warm_start(tmp_path):

    from escapelab.train import RunInterrupted, resume

    cfg = load_config("digits", tiny_overrides(**SHARP, **{"checkpoint.every": 20}))
    train(cfg, tmp_path / "ref")

    interrupt = interrupt_at(30)

    with pytest.raises(RunInterrupted):
        train(cfg, tmp_path / "cut", progress=interrupt)
    resume(tmp_path / "cut")
    ref, cut = RunDir(tmp_path / "ref").sharpness(), RunDir(tmp_path / "cut").sharpness()
    assert [(r.model, r.step, r.hvp) for r in cut] == [(r.model, r.step, r.hvp) for r in ref]
    for a, b in zip(cut, ref, strict=True):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-6)
