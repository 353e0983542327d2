from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from escapelab.analyze import AnalysisOptions, analyze, read_analysis
from escapelab.config import load_config
from escapelab.data import load_dataset
from escapelab.errors import EscapelabError
from escapelab.models import build_model
from escapelab.store import RunDir
from escapelab.train import train
from test_metrics import ref_erank, ref_fisher  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_overrides

    out = tmp_path_factory.mktemp("analysis") / "run"
    cfg = load_config("digits", tiny_overrides(**{"optim.lr": 3e4, "checkpoint.steps": "[10]"}))
    train(cfg, out)
    return out, cfg


def _features(out, cfg, checkpoint, tap, split="test"):
    """The tap's features recomputed by hand: walk the encoder's children."""
    data = load_dataset(cfg.data)
    derived = json.loads((out / "derived.json").read_text())
    model = build_model(cfg.model, data.input_shape, derived["head_dim"])
    tensors, _ = RunDir(out).load_checkpoint(checkpoint)
    model.load_state_dict(tensors)
    h = data.x_test if split == "test" else data.x_train
    with torch.no_grad():
        for name, layer in model.encoder.named_children():
            h = layer(h)
            if name == tap:
                break
        if tap == "head":
            h = model.head(h)
    labels = (data.y_test if split == "test" else data.y_train).numpy()
    return h.double().numpy(), labels


def test_analysis_matches_an_independent_computation(tiny_run):
    out, cfg = tiny_run
    result = analyze(out, AnalysisOptions(probe_samples=None))
    assert set(result.checkpoints) == {"T", "C", "S", "step_10"}
    assert list(result.checkpoints)[:3] == ["T", "C", "S"]
    for checkpoint in ("T", "C", "S"):
        for tap in ("conv1", "relu2", "pool2", "encoder", "head"):
            feats, labels = _features(out, cfg, checkpoint, tap)
            flat = feats.reshape(len(feats), -1)
            assert result.value(checkpoint, tap, "erank") == pytest.approx(ref_erank(flat),
                                                                           rel=1e-6)
            dead = int((flat == 0).all(axis=0).sum())
            assert result.value(checkpoint, tap, "dead_units") == dead
            assert result.value(checkpoint, tap, "dead_frac") == pytest.approx(dead / flat.shape[1])
            want, _ = ref_fisher(flat, labels)
            for key, value in want.items():
                assert result.value(checkpoint, tap, key) == pytest.approx(value, rel=1e-6,
                                                                           abs=1e-12)
            rel = result.value(checkpoint, tap, "discriminant_rel_teacher")
            assert rel == pytest.approx(result.value(checkpoint, tap, "discriminant")
                                        / result.value("T", tap, "discriminant"))
    # The encoder tap's probe is the training-time probe of the same checkpoint.
    summary = json.loads((out / "summary.json").read_text())
    assert result.value("T", "encoder", "probe_acc") == summary["teacher_probe_acc"]
    assert result.value("S", "encoder", "probe_acc") == summary["final_probe_acc"]


def test_analysis_files_are_tidy(tiny_run):
    out, _ = tiny_run
    result = analyze(out, AnalysisOptions(checkpoints=("T", "S"), probe=False))
    with (out / "analysis.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["checkpoint", "layer", "metric", "value"]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    model_taps = result.layers
    assert layers == model_taps  # network order
    assert {r["checkpoint"] for r in rows} == {"T", "S"}
    metrics = {r["metric"] for r in rows}
    assert {"erank", "condition_number", "dead_units", "dead_frac", "tr_between",
            "tr_within", "tr_total", "discriminant", "discriminant_rel_teacher",
            "kmeans_discriminant", "kmeans_tr_between"} <= metrics
    assert "probe_acc" not in metrics
    again = read_analysis(out)
    assert again.rows == json.loads(json.dumps(result.rows))


def test_dead_units_per_channel_and_memory_groups(tiny_run):
    out, cfg = tiny_run
    wide = analyze(out, AnalysisOptions(checkpoints=("C",), dead="channel", probe=False,
                                        label_free=False))
    feats, _ = _features(out, cfg, "C", "relu1")
    per_channel = int((feats == 0).all(axis=(0, 2, 3)).sum())
    assert wide.value("C", "relu1", "dead_units") == per_channel
    assert wide.value("C", "relu1", "units") == feats.shape[1]
    tight = analyze(out, AnalysisOptions(checkpoints=("C",), dead="channel", probe=False,
                                         label_free=False, memory_gb=1e-5))
    assert tight.rows == wide.rows


def test_bad_requests_are_clear(tiny_run):
    out, _ = tiny_run
    with pytest.raises(EscapelabError, match="unknown layers"):
        analyze(out, AnalysisOptions(layers=("conv9",)))
    with pytest.raises(EscapelabError, match="available: T, C, S, step_10"):
        analyze(out, AnalysisOptions(checkpoints=("X",)))
    with pytest.raises(EscapelabError, match="exceeds"):
        analyze(out, AnalysisOptions(samples=10**6))
    result = subprocess.run([sys.executable, "-m", "escapelab", "analyze", str(out),
                             "--layers", "nope"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown layers" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_a_table(tiny_run):
    out, _ = tiny_run
    result = subprocess.run([sys.executable, "-m", "escapelab", "analyze", str(out),
                             "--checkpoints", "T,C", "--layers", "relu1,encoder",
                             "--split", "train", "--samples", "100"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "relu1" in result.stdout and "encoder" in result.stdout
    assert "analysis.csv" in result.stdout


def test_diverged_checkpoints_give_empty_values(tmp_path):
    """Spectral metrics are None exactly at the taps whose features (recomputed by hand)
    are not finite, and finite elsewhere; a checkpoint with non-finite weights gives
    None at every tap."""
    out = tmp_path / "mse"
    cfg = load_config("digits", ["optim.lr=1e4", "loss.name=mse", "train.steps=200"])
    train(cfg, out)
    tensors, meta = RunDir(out).load_checkpoint("S")
    blown = {k: v * 1e38 if v.is_floating_point() else v for k, v in tensors.items()}
    RunDir(out).save_checkpoint("step_1", blown, {**meta, "kind": "step"})
    result = analyze(out, AnalysisOptions(checkpoints=("T", "S", "step_1"), probe=False,
                                          label_free=False))
    assert result.value("T", "encoder", "erank") > 1
    seen = set()
    for checkpoint in ("S", "step_1"):
        for tap in result.layers:
            feats, _ = _features(out, cfg, checkpoint, tap)
            finite = bool(np.isfinite(feats).all())
            seen.add(finite)
            value = result.value(checkpoint, tap, "erank")
            assert (value is None) == (not finite), (checkpoint, tap)
            if finite:
                assert value == pytest.approx(ref_erank(feats.reshape(len(feats), -1)),
                                              rel=1e-6)
    assert seen == {True, False}  # both cases were exercised
