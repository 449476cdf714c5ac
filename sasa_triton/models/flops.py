"""FLOP counting for conv / SASA networks, on meta tensors (instant, no memory, any model size).

Convention (the paper's, table 1): a multiply-add is 2 FLOPs; only the multiply-adds of
convolutions, linear layers and attention are counted. BatchNorm, ReLU, pooling, the softmax's
exponentials and residual additions are ignored (they are < 1 % and foldable / memory-bound).

- nn.Conv2d: 2 * B * C_out * H_out * W_out * (C_in / groups) * kh * kw.
- nn.Linear: 2 * (output elements) * in_features.
- SelfAttention2d: its 1x1 q/k/v projection is an nn.Conv2d child, counted as such; on top, per
  pixel at the layer's input resolution (the attention runs at stride 1 and is then pooled) and
  per head: k*k*D multiply-adds for q.k, k*k*D for p.v, and k*D/2 + k*D/2 = k*D for the
  relative logits (2k dot products of length D/2). Total 2 * B * H * W * C_out * (2k^2 + k).
  With relative="full", the relative logit counts as one more length-D dot product per (query,
  key) pair, k*k*D (the naive q . concat(rel_rows, rel_cols) form): 2 * B * H * W * C_out * 3k^2.
  That is the count that reproduces the paper's table 1 (SASA conv stem: 4.5 / 5.7 / 7.0 G for
  ResNet-26 / 38 / 50, where the factored count gives 4.4 / 5.6 / 6.8 G).
- SpatialAttention2d (the stem, block-local, `block` x `block` keys, M value mixtures): its
  fused 1x1 projection (q, k and the M value maps) is an nn.Conv2d child; on top, per pixel and
  channel, block^2 multiply-adds for q.k, block^2 for p.v and M for the value mixing
  sum_m p(a, b, m) * V_m (block^2 * M for the sliding window, where p depends on the query).
  Total 2 * B * H * W * C_out * (2 * block^2 + M).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torch.func import functional_call

from .._utils import check_choice
from ..modules import SelfAttention2d


def _spatial_attention_type():
    try:
        from ..stem import SpatialAttention2d
    except ImportError:  # the stem module is optional
        return None
    return SpatialAttention2d


def _conv_flops(m: nn.Conv2d, inputs, out) -> int:
    kh, kw = m.kernel_size
    return 2 * out.numel() * (m.in_channels // m.groups) * kh * kw


def _linear_flops(m: nn.Linear, inputs, out) -> int:
    return 2 * out.numel() * m.in_features


RELATIVE = ("factored", "full")


def _sasa_flops(m: SelfAttention2d, inputs, out, relative: str = "factored") -> int:
    x = inputs[0]
    B, _, H, W = x.shape
    k = m.kernel_size
    rel = k if relative == "factored" else k * k
    return 2 * B * H * W * m.out_channels * (2 * k * k + rel)


def _spatial_attention_flops(m: nn.Module, inputs, out) -> int:
    x = inputs[0]
    B, _, H, W = x.shape
    keys = m.block_size * m.block_size
    # Block windows mix each key's values once (p depends only on the key's place in its block);
    # a sliding window's p depends on the query too, so the mixing is per (query, key) pair.
    mixing = m.mixtures * (keys if getattr(m, "window", "block") == "sliding" else 1)
    return 2 * B * H * W * m.out_channels * (2 * keys + mixing)


def flops_by_module(model: nn.Module, input_size=(1, 3, 224, 224), relative: str = "factored"
                    ) -> "OrderedDict[str, int]":
    """FLOPs (multiply-add = 2) of each counted module of `model` for one forward pass of an
    input of shape `input_size` (the batch included), in execution order; see the module docstring.

    Runs the forward on meta tensors (torch.func.functional_call with meta copies of every
    parameter and buffer): nothing is computed or allocated, the model is left as it was
    (its attention backends are set to "reference" during the call and restored).
    relative: "factored" (what the kernels compute) or "full" (the paper's count).
    """
    check_choice(relative, "relative", RELATIVE)
    counters = [(nn.Conv2d, _conv_flops), (nn.Linear, _linear_flops),
                (SelfAttention2d, partial(_sasa_flops, relative=relative))]
    spatial = _spatial_attention_type()
    if spatial is not None:
        counters.append((spatial, _spatial_attention_flops))
    names = {m: n for n, m in model.named_modules()}
    result: "OrderedDict[str, int]" = OrderedDict()
    handles, saved_backends = [], []

    def make_hook(fn):
        def hook(module, inputs, out):
            name = names.get(module, module.__class__.__name__)
            result[name] = result.get(name, 0) + int(fn(module, inputs, out))
        return hook

    modes = [(m, m.training) for m in model.modules()]
    try:
        for m in model.modules():
            for cls, fn in counters:
                if isinstance(m, cls):
                    handles.append(m.register_forward_hook(make_hook(fn)))
                    break
            backend = getattr(m, "backend", None)
            if isinstance(backend, str):
                saved_backends.append((m, backend))
                m.backend = "reference"
        model.eval()
        state = {n: torch.empty_like(t, device="meta") for n, t in
                 list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}
        x = torch.empty(*input_size, device="meta")
        with torch.no_grad():
            functional_call(model, state, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
        for m, backend in saved_backends:
            m.backend = backend
        for m, training in modes:
            m.training = training
    return result


def count_flops(model: nn.Module, input_size=(1, 3, 224, 224), relative: str = "factored") -> int:
    """Total FLOPs (multiply-add = 2) of one forward pass of `model` on an input of shape
    `input_size`; see `flops_by_module`. At 224x224: ResNet-50 8.18 G (conv baseline), 6.81 G
    (SASA, conv stem), 6.92 G (SASA, attention stem); 7.0 / 7.1 G with relative="full"."""
    return sum(flops_by_module(model, input_size, relative).values())
