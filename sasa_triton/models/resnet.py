"""Bottleneck ResNets with stand-alone self-attention (SPEC section 3, paper section 4, table 1).

One code path builds both the convolutional baselines and the SASA models: `ResNet(layers,
attention=...)`. Module names follow torchvision (conv1, bn1, relu, maxpool, layer1..4, avgpool,
fc; blocks conv1/bn1/conv2/bn2/conv3/bn3/downsample), so `resnet50()` loads a torchvision
ResNet-50 state dict, and `convert_to_sasa(resnet50())` has exactly the state-dict keys of
`sasa_resnet50(stem="conv")`.

Parameter counts (num_classes=1000, base_width=64) and FLOPs at 224x224 (multiply-add = 2,
`count_flops`; in brackets relative="full", the paper's way of counting the relative logits):

| model | conv baseline | SASA, conv stem | SASA, attention stem | paper: conv / SASA |
|---|---|---|---|---|
| ResNet-26 | 13.70 M, 4.69 G | 10.33 M, 4.39 G (4.48) | 10.32 M, 4.50 G (4.60) | 13.7 / 10.3 M; 4.7 / 4.5, 4.7 G |
| ResNet-38 | 19.63 M, 6.43 G | 14.17 M, 5.60 G (5.73) | 14.17 M, 5.71 G (5.84) | 19.6 / 14.1 M; 6.5 / 5.7, 6.1 G |
| ResNet-50 | 25.56 M, 8.18 G | 18.02 M, 6.81 G (6.97) | 18.01 M, 6.92 G (7.08) | 25.6 / 18.0 M; 8.2 / 7.0, 7.2 G |

The natural reading of the paper lands within 0.6 % of its counts, so nothing else had to be
guessed: every 3x3 conv of every bottleneck (the one that carries the stride, torchvision's
"v1.5") becomes a SelfAttention2d with the same in/out channels (3 * C_in * C_out projection
weights instead of 9 * C_in * C_out, plus k * D relative-embedding weights); the 1x1 convs, the
projection shortcuts (1x1 conv with stride + BN) and the classifier stay; the conv stem is
ResNet's. The attention stem (1.5 k parameters with its BN, against the conv stem's 9.5 k) changes the
count by less than 0.1 %, which is why the paper gives one number for both variants.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .._utils import BACKENDS, PADDINGS, check_choice, check_kernel_size, check_positive_int
from ..modules import SelfAttention2d

STEMS = ("conv", "attention", "small")

# Bottleneck blocks per stage (paper table 1 / section 4.1).
DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}


def spatial_layer(in_channels: int, out_channels: int, stride: int = 1, *, attention: bool = True,
                  kernel_size: int = 7, heads: int = 8, **attention_kwargs) -> nn.Module:
    """The spatial (3x3) layer of a bottleneck: SelfAttention2d, or the baseline's 3x3 conv.

    With attention, stride 2 means attention at stride 1 followed by a 2x2 average pool
    (SelfAttention2d does it). attention_kwargs go to SelfAttention2d (dilation, padding, scale,
    rel_per_head, backend).
    """
    if attention:
        return SelfAttention2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, heads=heads,
                               **attention_kwargs)
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """1x1 conv -> spatial layer (3x3 conv or SASA, carries the stride) -> 1x1 conv (x4), BN + ReLU.

    Shapes: (B, in_channels, H, W) -> (B, 4 * width, H // stride, W // stride).
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, *, attention: bool = True,
                 kernel_size: int = 7, heads: int = 8, **attention_kwargs):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = spatial_layer(width, width, stride, attention=attention, kernel_size=kernel_size, heads=heads,
                                   **attention_kwargs)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet, convolutional or with every spatial conv replaced by self-attention.

    Args:
        layers: bottleneck blocks per stage, e.g. (3, 4, 6, 3); 1 to 4 (or more) stages. Stage i has
            width base_width * 2**i (output 4x that); every stage after the first starts with stride 2.
        num_classes: classifier outputs.
        attention: True for SASA layers in the bottlenecks, False for the 3x3-conv baseline.
        stem: "conv" (7x7/2 conv + BN + ReLU + 3x3/2 max pool: 224 -> 56), "attention" (the
            spatially-aware AttentionStem of `sasa_triton.stem`: attention + BN + ReLU + 4x4/4 max
            pool, 224 -> 56), or "small" (3x3/1 conv + BN + ReLU, no pool: for 32x32-ish images).
        base_width: stem output channels and stage-1 bottleneck width (paper: 64).
        in_channels: image channels.
        kernel_size, heads, dilation, padding, scale, rel_per_head, backend: of every
            SelfAttention2d (paper: k = 7, 8 heads); backend also goes to the attention stem.
        stem_heads, stem_mixtures, stem_block_size: of the attention stem (paper: 4, 4, 4).
        zero_init_residual: zero the last BN scale of each block (Goyal et al.), off by default.

    Shapes: (B, in_channels, H, W) -> (B, num_classes). Both full-size stems reduce H and W by 4
    and every later stage by 2, so H and W should be multiples of 4 * 2**(len(layers) - 1) (32 for
    four stages); with "small", of 2**(len(layers) - 1). Other sizes work, rounding down at each
    stride-2 attention (avg pool) and up at the convs.

    Plain modules and no global state: works with channels_last, torch.save/load_state_dict and
    DistributedDataParallel.
    """

    def __init__(self, layers: Sequence[int], num_classes: int = 1000, *, attention: bool = True, stem: str = "conv",
                 base_width: int = 64, in_channels: int = 3, kernel_size: int = 7, heads: int = 8,
                 dilation: int = 1, padding: str = "zeros", scale: float | None = None, rel_per_head: bool = False,
                 backend: str = "auto", stem_heads: int = 4, stem_mixtures: int = 4, stem_block_size: int = 4,
                 zero_init_residual: bool = False):
        super().__init__()
        layers = tuple(layers)
        if not layers or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty sequence of positive ints, got {layers}")
        check_choice(stem, "stem", STEMS)
        check_positive_int(num_classes, "num_classes")
        check_positive_int(base_width, "base_width")
        check_positive_int(in_channels, "in_channels")
        check_choice(backend, "backend", BACKENDS)
        check_choice(padding, "padding", PADDINGS)
        if attention:
            check_kernel_size(kernel_size)
            check_positive_int(heads, "heads")
            if base_width % heads != 0:
                raise ValueError(f"heads ({heads}) must divide base_width ({base_width}) for the attention layers")
        self.layers_config, self.attention, self.stem_type = layers, attention, stem
        self.base_width, self.num_classes, self.backend = base_width, num_classes, backend
        self.kernel_size, self.heads = kernel_size, heads

        # Stem. The conv stems keep torchvision's names (conv1, bn1, relu, maxpool).
        self.relu = nn.ReLU(inplace=True)
        if stem == "attention":
            from ..stem import AttentionStem  # lazy: the stem module is optional for the conv models
            self.stem = AttentionStem(in_channels, base_width, block_size=stem_block_size, heads=stem_heads,
                                      mixtures=stem_mixtures, pool=4, backend=backend)
        elif stem == "conv":
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(base_width)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, kernel_size=3, stride=1, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(base_width)
            self.maxpool = nn.Identity()

        attention_kwargs = dict(attention=attention, kernel_size=kernel_size, heads=heads, dilation=dilation,
                                padding=padding, scale=scale, rel_per_head=rel_per_head, backend=backend)
        if not attention:
            attention_kwargs = dict(attention=False)
        channels = base_width
        for i, blocks in enumerate(layers):
            width = base_width * 2 ** i
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(Bottleneck(channels, width, stride, **attention_kwargs))
                channels = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.num_features = channels
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the last stage's feature map (B, num_features, H', W')."""
        if self.stem_type == "attention":
            x = self.stem(x)
        else:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return (f"layers={self.layers_config}, attention={self.attention}, stem={self.stem_type!r}, "
                f"base_width={self.base_width}, num_classes={self.num_classes}")


def _sasa(depth: int, stem: str, kwargs) -> ResNet:
    return ResNet(DEPTHS[depth], attention=True, stem=stem, **kwargs)


def _conv(depth: int, kwargs) -> ResNet:
    return ResNet(DEPTHS[depth], attention=False, **kwargs)


def sasa_resnet26(stem: str = "conv", **kwargs) -> ResNet:
    """SASA ResNet-26 (blocks [1, 2, 4, 1]); stem "conv" or "attention"; kwargs as `ResNet`. ~10.3 M params."""
    return _sasa(26, stem, kwargs)


def sasa_resnet38(stem: str = "conv", **kwargs) -> ResNet:
    """SASA ResNet-38 (blocks [2, 3, 5, 2]); stem "conv" or "attention"; kwargs as `ResNet`. ~14.1 M params."""
    return _sasa(38, stem, kwargs)


def sasa_resnet50(stem: str = "conv", **kwargs) -> ResNet:
    """SASA ResNet-50 (blocks [3, 4, 6, 3]); stem "conv" or "attention"; kwargs as `ResNet`. ~18.0 M params."""
    return _sasa(50, stem, kwargs)


def resnet26(**kwargs) -> ResNet:
    """Convolutional baseline ResNet-26 (blocks [1, 2, 4, 1]), kwargs as `ResNet`. ~13.7 M params."""
    return _conv(26, kwargs)


def resnet38(**kwargs) -> ResNet:
    """Convolutional baseline ResNet-38 (blocks [2, 3, 5, 2]), kwargs as `ResNet`. ~19.6 M params."""
    return _conv(38, kwargs)


def resnet50(**kwargs) -> ResNet:
    """Convolutional baseline ResNet-50 (blocks [3, 4, 6, 3]), torchvision's layout. ~25.6 M params."""
    return _conv(50, kwargs)
