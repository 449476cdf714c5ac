"""Turn an existing bottleneck ResNet (ours, torchvision's, timm-like trees) into a SASA model."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .._utils import BACKENDS, check_choice
from ..modules import SelfAttention2d


def _is_bottleneck_conv(name: str, conv: nn.Conv2d, parent: nn.Module) -> bool:
    """The default rule: a 3x3, groups=1, dilation=1 conv whose parent also holds a 1x1 conv
    directly (a bottleneck's spatial conv; stems and BasicBlocks have no 1x1 sibling)."""
    if conv.kernel_size != (3, 3) or conv.groups != 1 or conv.dilation != (1, 1):
        return False
    if conv.stride[0] != conv.stride[1]:
        return False
    return any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in parent.children())


def convert_to_sasa(model: nn.Module, kernel_size: int = 7, heads: int = 8, *,
                    predicate: Callable[[str, nn.Conv2d, nn.Module], bool] | None = None,
                    **attention_kwargs) -> nn.Module:
    """Replace every bottleneck 3x3 conv of `model` by a SelfAttention2d, in place; returns `model`.

    A conv is replaced when `predicate(qualified_name, conv, parent)` is true; the default
    predicate picks each nn.Conv2d with a 3x3 kernel, groups=1, dilation 1 and equal strides
    whose parent module also directly holds a 1x1 nn.Conv2d: the spatial conv of a (torchvision,
    timm, ours) Bottleneck. The stem and BasicBlocks (ResNet-18/34) are left alone.

    The SelfAttention2d has the conv's in/out channels and stride (stride 2 = attention, then a
    2x2 average pool: for odd H the output is H // 2 where the conv gave (H + 1) // 2), is moved
    to the conv's device and dtype, and has freshly initialised weights (a conv's weights do not
    map to attention). A conv bias is dropped (bottleneck convs have none; the next BN absorbs
    it). kernel_size, heads and attention_kwargs (dilation, padding, scale, rel_per_head,
    backend) go to SelfAttention2d; heads must divide every replaced conv's out_channels.

    `convert_to_sasa(resnet50())` has exactly the modules and state-dict keys of
    `sasa_resnet50(stem="conv")`.
    """
    if "backend" in attention_kwargs:
        check_choice(attention_kwargs["backend"], "backend", BACKENDS)
    predicate = predicate or _is_bottleneck_conv
    targets = []
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Conv2d) and predicate(name, child, parent):
                targets.append((name, parent, child_name, child))
    for name, parent, child_name, conv in targets:
        if conv.out_channels % heads != 0:
            raise ValueError(f"heads ({heads}) must divide out_channels ({conv.out_channels}) of conv {name!r}")
        layer = SelfAttention2d(conv.in_channels, conv.out_channels, kernel_size=kernel_size, stride=conv.stride[0],
                                heads=heads, **attention_kwargs)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        setattr(parent, child_name, layer)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the attention backend ("auto", "triton", "reference") of every SelfAttention2d and
    attention-stem module in `model`, in place; returns `model`."""
    check_choice(backend, "backend", BACKENDS)
    for m in model.modules():
        if isinstance(getattr(m, "backend", None), str):
            m.backend = backend
    return model
