"""Models: one interface (encoder + linear head + named layer taps), built by name.

Every model is an :class:`EscapeNet`: an ``encoder`` (an ``nn.Sequential`` whose
children carry tap names such as ``conv1``, ``relu1``, ``pool1``) that maps images
(B, C, H, W) to features (B, d_enc), followed by one linear ``head`` (d_enc -> d_out,
paper: 512). Linear probes read the encoder output; the escape loss reads the head.

Taps are the outputs of each conv, BatchNorm, ReLU, pool and linear layer in network
order, plus ``encoder`` (the flattened encoder output) and ``head``; layerwise
analysis (paper Sec. 3) walks them with :meth:`EscapeNet.forward_taps`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from escapelab.config import ModelConfig

# The VGG paper's conv configurations (Simonyan & Zisserman, Table 1, A/B/D/E); "M" = max-pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
DEFAULT_WIDTHS = {"convnet": [16, 32, 64], "mlp": [256, 256]}


class EscapeNet(nn.Module):
    """Encoder + linear head with named taps.

    Args:
        encoder: children named by tap (``conv1``, ``relu1``...); the last child flattens.
        head: the linear layer d_enc -> d_out.
        arch: the registry name, kept for checkpoints.
    """

    def __init__(self, encoder: nn.Sequential, head: nn.Linear, arch: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.arch = arch

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, d_out)."""
        return self.head(self.encoder(x))

    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> encoder output (B, d_enc)."""
        return self.encoder(x)

    def tap_names(self) -> list[str]:
        """Tap names in network order."""
        names = [name for name, _ in self.encoder.named_children()
                 if not name.startswith("flatten")]
        return [*names, "encoder", "head"]

    def forward_taps(self, x: Tensor, taps: Iterable[str] | None = None) -> dict[str, Tensor]:
        """Outputs of the requested taps (all if None), in network order.

        Conv/pool taps keep their (B, C, H, W) shape; ``encoder`` is (B, d_enc) and
        ``head`` is (B, d_out). Stops as soon as the last requested tap is reached.
        """
        order = self.tap_names()
        wanted = set(order if taps is None else taps)
        unknown = wanted - set(order)
        if unknown:
            raise KeyError(f"unknown taps {sorted(unknown)}; available: {order}")
        out: dict[str, Tensor] = {}
        h = x
        for name, layer in self.encoder.named_children():
            h = layer(h)
            if name in wanted:
                out[name] = h
            if len(out) == len(wanted):
                return out
        if "encoder" in wanted:
            out["encoder"] = h
        if "head" in wanted:
            out["head"] = self.head(h)
        return out


def _vgg_layers(arch: str, cfg: ModelConfig, in_channels: int, size: int) -> OrderedDict:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, n_conv, n_pool = in_channels, 0, 0
    for item in VGG_CONFIGS[arch]:
        if item == "M":
            if size > 1:  # pool only while there is something to pool
                n_pool += 1
                layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
                size //= 2
            continue
        n_conv += 1
        width = max(1, round(int(item) * cfg.width_mult))
        layers[f"conv{n_conv}"] = nn.Conv2d(channels, width, 3, padding=1)
        if cfg.batch_norm:
            layers[f"bn{n_conv}"] = _batch_norm(width)
        layers[f"relu{n_conv}"] = nn.ReLU()
        channels = width
    return layers


def _convnet_layers(cfg: ModelConfig, in_channels: int, size: int) -> OrderedDict:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    for i, base in enumerate(cfg.widths or DEFAULT_WIDTHS["convnet"], start=1):
        width = max(1, round(base * cfg.width_mult))
        layers[f"conv{i}"] = nn.Conv2d(channels, width, 3, padding=1)
        if cfg.batch_norm:
            layers[f"bn{i}"] = _batch_norm(width)
        layers[f"relu{i}"] = nn.ReLU()
        if size > 1:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            size //= 2
        channels = width
    return layers


def _mlp_layers(cfg: ModelConfig, in_features: int) -> OrderedDict:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten_input=nn.Flatten())
    features = in_features
    for i, base in enumerate(cfg.widths or DEFAULT_WIDTHS["mlp"], start=1):
        width = max(1, round(base * cfg.width_mult))
        layers[f"fc{i}"] = nn.Linear(features, width)
        layers[f"relu{i}"] = nn.ReLU()
        features = width
    return layers


def _batch_norm(width: int) -> nn.BatchNorm2d:
    # Batch statistics in training and evaluation alike: a frozen teacher has no
    # meaningful running statistics at initialization.
    return nn.BatchNorm2d(width, track_running_stats=False)


def _finish(layers: OrderedDict, input_shape: Sequence[int], head_dim: int, arch: str,
            ) -> EscapeNet:
    layers["flatten"] = nn.Flatten()
    encoder = nn.Sequential(layers)
    with torch.no_grad():
        d_enc = encoder(torch.zeros(1, *input_shape)).shape[1]
    return EscapeNet(encoder, nn.Linear(d_enc, head_dim), arch)


Builder = Callable[[ModelConfig, tuple[int, int, int], int], EscapeNet]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return add


def _vgg_builder(arch: str) -> Builder:
    def build(cfg: ModelConfig, shape: tuple[int, int, int], head_dim: int) -> EscapeNet:
        return _finish(_vgg_layers(arch, cfg, shape[0], shape[1]), shape, head_dim, arch)

    return build


for _arch in VGG_CONFIGS:
    register(_arch)(_vgg_builder(_arch))


@register("convnet")
def _build_convnet(cfg: ModelConfig, shape: tuple[int, int, int], head_dim: int) -> EscapeNet:
    return _finish(_convnet_layers(cfg, shape[0], shape[1]), shape, head_dim, "convnet")


@register("mlp")
def _build_mlp(cfg: ModelConfig, shape: tuple[int, int, int], head_dim: int) -> EscapeNet:
    return _finish(_mlp_layers(cfg, shape[0] * shape[1] * shape[2]), shape, head_dim, "mlp")


MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(cfg: ModelConfig, input_shape: tuple[int, int, int], head_dim: int,
                ) -> EscapeNet:
    """Build (uninitialized) ``cfg.name`` for inputs of shape (C, H, W), H == W."""
    if cfg.name not in _REGISTRY:
        raise KeyError(f"unknown model {cfg.name!r}; allowed: {', '.join(MODEL_NAMES)}")
    return _REGISTRY[cfg.name](cfg, tuple(input_shape), head_dim)  # type: ignore[arg-type]
