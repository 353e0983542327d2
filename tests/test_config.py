from __future__ import annotations

import pytest
from pydantic import ValidationError

from escapelab.config import (
    Config,
    derive,
    describe_keys,
    eval_schedule,
    load_config,
    parse_overrides,
    preset_names,
)
from escapelab.errors import ConfigError


def test_presets_load_with_the_papers_values():
    assert {"digits", "cifar10-vgg11"} <= set(preset_names())
    paper = load_config("cifar10-vgg11")
    assert paper.model.name == "vgg11" and paper.model.d_out == 512
    assert not paper.model.batch_norm
    assert paper.init.scheme == "kaiming_normal" and paper.init.sigma_eps == 1e-10
    assert paper.loss.name == "nmse" and paper.optim.lr == 1e4
    assert paper.optim.momentum == 0 and paper.optim.weight_decay == 0
    assert paper.data.batch_size == 256 and paper.train.epochs == 100
    digits = load_config("digits")
    assert digits.data.name == "digits" and digits.model.name == "convnet"
    fashion = load_config("fashion-mnist")
    assert fashion.data.name == "fashion-mnist" and fashion.model.name == "convnet"
    assert fashion.init.sigma_eps == 1e-10 and fashion.dtype == "float32"
    assert fashion.loss.name == "nmse" and fashion.optim.momentum == 0
    # Probes on fixed subsets that fit Fashion-MNIST's 60,000 / 10,000 images.
    derived = derive(fashion, n_train=60000, n_test=10000, num_classes=10,
                     input_shape=(1, 28, 28), device="cpu")
    assert fashion.probe.train_samples is not None and fashion.probe.test_samples is not None
    assert fashion.probe.train_samples < 60000 and fashion.probe.test_samples < 10000
    assert derived.total_steps == fashion.train.steps and len(derived.eval_steps) < 30


def test_overrides_are_typed_from_text():
    tree = parse_overrides(["optim.lr=1e4", "data.batch_size=full", "seed=3",
                            "model.widths=[8, 16]", "train.epochs=null", "loss.name=mse"])
    assert tree == {"optim": {"lr": 1e4}, "data": {"batch_size": "full"}, "seed": 3,
                    "model": {"widths": [8, 16]}, "train": {"epochs": None},
                    "loss": {"name": "mse"}}
    cfg = load_config("digits", ["optim.lr=1e4", "data.batch_size=full", "seed=3"])
    assert cfg.optim.lr == 10000.0 and cfg.data.batch_size == "full" and cfg.seed == 3


@pytest.mark.parametrize(("override", "names"), [
    (["data.batchsize=3"], ["data.batchsize", "batch_size"]),
    (["optimizer.lr=3"], ["optimizer", "optim"]),
    (["optim.lr=fast"], ["optim.lr", "fast"]),
    (["optim.lr=-1"], ["optim.lr", "greater than 0"]),
    (["data.batch_size=0"], ["data.batch_size", "'full'"]),
    (["data.batch_size=many"], ["data.batch_size", "'full'"]),
    (["loss.name=l1"], ["loss.name", "'nmse'", "'ndmse'"]),
    (["model.name=resnet"], ["model.name", "vgg11", "convnet"]),
    (["train.epochs=3"], ["train.steps", "train.epochs"]),
    (["optim.nesterov=true"], ["momentum"]),
    (["schedule.name=linear_warmup"], ["warmup_steps"]),
    (["device=tpu"], ["device", "cuda"]),
    (["optim.lr=.inf"], ["optim.lr"]),
    (["data.micro_batch_size=100"], ["micro_batch_size", "exceeds"]),
    (["lr"], ["key=value"]),
])
def test_config_errors_name_the_key_and_what_is_allowed(override, names):
    with pytest.raises(ConfigError) as info:
        load_config("digits", override)
    for name in names:
        assert name in str(info.value)


def test_unknown_preset_lists_the_presets(tmp_path):
    with pytest.raises(ConfigError, match="digits"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim"):
        load_config(bad)


def test_config_is_frozen():
    cfg = load_config("digits")
    with pytest.raises(ValidationError):
        cfg.optim.lr = 1.0  # type: ignore[misc]


def test_derived_values():
    cfg = load_config("digits", ["data.batch_size=100", "data.micro_batch_size=30",
                                 "train.steps=null", "train.epochs=2.5"])
    d = derive(cfg, n_train=1257, n_test=540, num_classes=10, input_shape=(1, 8, 8),
               device="cpu")
    assert d.steps_per_epoch == 12  # 1257 // 100, last incomplete batch dropped
    assert d.total_steps == 30 and d.accumulation_steps == 4 and d.micro_batch_size == 30
    full = derive(load_config("digits", ["data.batch_size=full"]), n_train=1257, n_test=540,
                  num_classes=10, input_shape=(1, 8, 8), device="cpu")
    assert full.batch_size == 1257 and full.steps_per_epoch == 1
    with pytest.raises(ConfigError, match="data.batch_size"):
        derive(load_config("digits", ["data.batch_size=5000"]), n_train=1257, n_test=540,
               num_classes=10, input_shape=(1, 8, 8), device="cpu")
    supervised = derive(load_config("digits", ["loss.name=ce"]), n_train=1257, n_test=540,
                        num_classes=10, input_shape=(1, 8, 8), device="cpu")
    assert supervised.head_dim == 10


def test_eval_schedule_is_log_spaced_then_regular():
    steps = eval_schedule(1000, log_until=100, log_points=10, every=250)
    assert steps[:4] == [0, 1, 2, 3]
    assert [s for s in steps if s > 100] == [250, 500, 750, 1000]
    early = [s for s in steps if 0 < s <= 100]
    ratios = [b / a for a, b in zip(early, early[1:], strict=False)]
    assert early[-1] == 100 and max(ratios) <= 2.0 and len(early) == 10


def test_every_key_is_described():
    rows = describe_keys()
    keys = {k for k, _, _ in rows}
    assert {"optim.lr", "data.batch_size", "init.sigma_eps", "probe.knn_k"} <= keys
    assert all(text for _, _, text in rows)
    assert Config().optim.lr == 3e4
