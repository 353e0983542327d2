from __future__ import annotations

import pytest
import torch

from escapelab.config import ModelConfig
from escapelab.models import MODEL_NAMES, build_model

# VGG11 on CIFAR-sized inputs (Simonyan & Zisserman, config A): conv widths and the
# spatial size each conv sees; a pool follows convs 1, 2, 4, 6 and 8.
VGG11_CIFAR = [(64, 32), (128, 16), (256, 8), (256, 8), (512, 4), (512, 4), (512, 2), (512, 2)]
CONV_COUNT = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16, "convnet": 3, "mlp": 0}


def test_registry_holds_the_issue_models():
    assert set(MODEL_NAMES) == {"vgg11", "vgg13", "vgg16", "vgg19", "convnet", "mlp"}


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
def test_every_model_builds_with_consistent_taps(name, shape):
    cfg = ModelConfig(name=name, width_mult=0.25 if name.startswith("vgg") else 1.0)
    model = build_model(cfg, shape, head_dim=17)
    x = torch.randn(5, *shape)
    taps = model.forward_taps(x)
    assert list(taps) == model.tap_names()
    assert taps["encoder"].shape == (5, model.feature_dim)
    assert taps["head"].shape == (5, 17)
    torch.testing.assert_close(taps["head"], model(x))
    torch.testing.assert_close(taps["encoder"], model.features(x))
    convs = [t for t in taps if t.startswith("conv")]
    assert len(convs) == CONV_COUNT[name]
    for tap in convs:
        out = taps[tap]
        relu = taps[tap.replace("conv", "relu")]
        assert out.ndim == 4 and relu.shape == out.shape
        torch.testing.assert_close(relu, out.clamp_min(0))
    # Max-pools only while there is something to pool: nothing below 1x1.
    assert all(t.shape[-1] >= 1 for t in taps.values())


def test_vgg11_matches_the_papers_architecture_on_cifar():
    model = build_model(ModelConfig(name="vgg11"), (3, 32, 32), head_dim=512)
    taps = model.forward_taps(torch.randn(2, 3, 32, 32))
    for i, (width, size) in enumerate(VGG11_CIFAR, start=1):
        assert taps[f"conv{i}"].shape == (2, width, size, size)
    assert [t for t in taps if t.startswith("pool")] == [f"pool{i}" for i in range(1, 6)]
    assert taps["pool5"].shape == (2, 512, 1, 1)
    assert taps["encoder"].shape == (2, 512) and taps["head"].shape == (2, 512)
    assert model.head.in_features == 512 and model.head.out_features == 512


def test_digits_sized_vgg_stops_pooling_at_one_pixel():
    model = build_model(ModelConfig(name="vgg11"), (1, 8, 8), head_dim=512)
    taps = model.forward_taps(torch.randn(2, 1, 8, 8))
    assert [t for t in taps if t.startswith("pool")] == ["pool1", "pool2", "pool3"]
    assert taps["encoder"].shape == (2, 512)


def test_width_multiplier_and_batch_norm():
    model = build_model(ModelConfig(name="convnet", widths=[4, 8], width_mult=2.0,
                                    batch_norm=True), (1, 8, 8), head_dim=3)
    taps = model.forward_taps(torch.randn(6, 1, 8, 8))
    assert taps["conv1"].shape[1] == 8 and taps["conv2"].shape[1] == 16
    assert "bn1" in taps and taps["encoder"].shape == (6, 16 * 2 * 2)


def test_forward_taps_subset_and_unknown_name():
    model = build_model(ModelConfig(name="mlp", widths=[7, 5]), (1, 4, 4), head_dim=3)
    assert model.tap_names() == ["fc1", "relu1", "fc2", "relu2", "encoder", "head"]
    out = model.forward_taps(torch.randn(2, 1, 4, 4), ["relu1"])
    assert list(out) == ["relu1"] and out["relu1"].shape == (2, 7)
    with pytest.raises(KeyError, match="available"):
        model.forward_taps(torch.randn(2, 1, 4, 4), ["conv9"])
