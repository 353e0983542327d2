"""escapelab finetune: fair starts, an independent check of what is measured, skipping
what is done, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from escapelab.config import FinetuneOptions
from escapelab.data import load_dataset
from escapelab.errors import EscapelabError
from escapelab.finetune import compare, finetune, finetune_one, fresh_classifier
from escapelab.models import build_model
from escapelab.store import RunDir
from escapelab.train import train

QUICK = {"epochs": 2, "evals_per_epoch": 2, "seeds": (0, 1), "batch_size": 48}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from escapelab.config import load_config

    out = tmp_path_factory.mktemp("ft") / "run"
    train(load_config("digits", tiny_overrides()), out)
    return out


def test_the_classifier_depends_on_the_seed_only():
    a, b, c = fresh_classifier(16, 3, 0), fresh_classifier(16, 3, 0), fresh_classifier(16, 3, 1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert float(a.weight.detach().abs().max()) <= 1 / 4  # nn.Linear's bound 1/sqrt(16)


def test_first_record_is_the_fresh_classifier_on_standardized_features(run_dir):
    """Step 0's accuracy, recomputed in float64 NumPy from the encoder's features."""
    run = RunDir(run_dir)
    cfg, derived = run.config(), run.derived()
    data = load_dataset(cfg.data)
    template = build_model(cfg.model, data.input_shape, derived.head_dim)
    tensors, _ = run.load_checkpoint("S")
    options = FinetuneOptions(epochs=1, evals_per_epoch=1, batch_size=1000)
    records = finetune_one(template, tensors, data, options, seed=3, start="S")
    model = build_model(cfg.model, data.input_shape, derived.head_dim)
    model.load_state_dict(tensors)
    model.eval()
    with torch.no_grad():
        f_tr = model.features(data.x_train).double().numpy()
        f_te = model.features(data.x_test).double().numpy()
    std = f_tr.std(0)
    z = (f_te - f_tr.mean(0)) / np.where(std > 1e-12, std, 1.0)
    lin = fresh_classifier(model.feature_dim, data.num_classes, 3)
    logits = z @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    expected = float((logits.argmax(1) == data.y_test.numpy()).mean())
    assert records[0]["step"] == 0 and records[0]["test_acc"] == pytest.approx(expected,
                                                                                abs=1e-9)
    # one epoch of full batches of 1000: one step, then the final evaluation
    steps = [r["step"] for r in records]
    assert steps == [0, 1]
    assert records[-1]["epoch"] == 1.0 and np.isfinite(records[-1]["train_loss"])


def test_one_seed_gives_one_classifier_and_one_batch_order(run_dir):
    """The same start and seed twice: identical curves (init and batch order come from
    the seed alone); another seed: another curve."""
    run = RunDir(run_dir)
    cfg, derived = run.config(), run.derived()
    data = load_dataset(cfg.data)
    template = build_model(cfg.model, data.input_shape, derived.head_dim)
    tensors, _ = run.load_checkpoint("T")
    options = FinetuneOptions(epochs=1, evals_per_epoch=4, batch_size=32, optimizer="sgd")

    def curve(seed):
        return [(r["step"], r["train_loss"], r["test_acc"])
                for r in finetune_one(template, tensors, data, options, seed)]

    assert curve(5) == curve(5)
    assert curve(5) != curve(6)


def test_training_learns_on_every_start_and_seed(run_dir):
    payload = finetune(run_dir, FinetuneOptions(starts=("T", "S"), **QUICK))
    curves = RunDir(run_dir).finetune_curves()
    assert {(r["start"], r["seed"]) for r in curves} == {("T", 0), ("T", 1), ("S", 0),
                                                         ("S", 1)}
    for start in ("T", "S"):
        info = payload["starts"][start]
        assert info["seeds"] == [0, 1]
        finals = [info["final_test_acc"][s] for s in ("0", "1")]
        assert info["final_test_acc_mean"] == pytest.approx(np.mean(finals))
        first = [r["test_acc"] for r in curves if r["start"] == start and r["step"] == 0]
        assert info["final_test_acc_mean"] > np.mean(first)  # it learned something
    steps = {(s, k): [r["step"] for r in curves if (r["start"], r["seed"]) == (s, k)]
             for s in ("T", "S") for k in (0, 1)}
    assert len(set(map(tuple, steps.values()))) == 1  # the same evaluation steps
    # the report draws the seed means
    from escapelab.report import load_run, run_figures

    fig = next(d.figure for d in run_figures(load_run(run_dir)) if d.id == "fig_finetune")
    line = next(ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "finetune/S")
    s_steps = steps[("S", 0)]
    mean = [100 * np.mean([r["test_acc"] for r in curves
                           if r["start"] == "S" and r["step"] == k]) for k in s_steps]
    np.testing.assert_allclose(line.get_ydata(), mean)
    np.testing.assert_array_equal(line.get_xdata(), s_steps)


def test_a_second_call_skips_what_is_done_and_other_options_need_overwrite(run_dir):
    options = FinetuneOptions(starts=("T", "S"), **QUICK)
    finetune(run_dir, options)
    before = RunDir(run_dir).finetune_curves()
    again = finetune(run_dir, options)
    assert RunDir(run_dir).finetune_curves() == before  # nothing recomputed
    assert set(again["starts"]) == {"T", "S"}
    more = finetune(run_dir, FinetuneOptions(starts=("T", "S", "C"), **QUICK))
    assert set(more["starts"]) == {"T", "S", "C"}
    assert RunDir(run_dir).finetune_curves()[:len(before)] == before
    other = FinetuneOptions(starts=("T",), **{**QUICK, "epochs": 1})
    with pytest.raises(EscapelabError, match="--overwrite"):
        finetune(run_dir, other)
    replaced = finetune(run_dir, other, overwrite=True)
    assert set(replaced["starts"]) == {"T"}
    assert {r["start"] for r in RunDir(run_dir).finetune_curves()} == {"T"}
    with pytest.raises(EscapelabError, match="not in"):
        finetune(run_dir, FinetuneOptions(starts=("X",)))


def test_steps_to_target_uses_one_target_for_every_start():
    def curve(start, seed, accs):
        return [{"start": start, "seed": seed, "step": 10 * i, "epoch": i / 2,
                 "test_acc": a} for i, a in enumerate(accs)]

    curves = (curve("T", 0, [0.1, 0.5, 0.8, 0.9]) + curve("T", 1, [0.1, 0.7, 0.8, 1.0])
              + curve("S", 0, [0.1, 0.2, 0.3, 0.5]) + curve("S", 1, [0.1, 0.2, 0.3, 0.6]))
    out = compare(curves)
    assert out["T"]["final_test_acc_mean"] == pytest.approx(0.95)
    assert out["T"]["target_acc"] == pytest.approx(0.95 * 0.95)
    assert out["T"]["steps_to_target"] == 30  # mean 0.95 at step 30; 0.8 at 20
    assert out["S"]["steps_to_target"] is None
    assert out["T"]["epoch1_test_acc_mean"] == pytest.approx(0.8)  # first at epoch >= 1


def test_cli_finetune_and_its_errors(run_dir, tmp_path):
    cli = [sys.executable, "-m", "escapelab", "finetune", str(run_dir)]
    ok = subprocess.run([*cli, "--from", "T,S", "--seeds", "0", "--epochs", "1",
                         "--overwrite"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "steps to target" in ok.stdout
    payload = json.loads((run_dir / "finetune/finetune.json").read_text())
    assert set(payload["starts"]) == {"T", "S"} and payload["options"]["epochs"] == 1
    bad = subprocess.run([*cli, "--from", "T,Q"], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("escapelab: error:")
    neg = subprocess.run([*cli, "--epochs", "0"], capture_output=True, text=True,
                         timeout=300)
    assert neg.returncode == 2 and "--epochs" in neg.stderr
    missing = subprocess.run([sys.executable, "-m", "escapelab", "finetune",
                              str(tmp_path / "nothing")], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 2 and "not a run directory" in missing.stderr
