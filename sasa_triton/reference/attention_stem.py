"""PyTorch reference of the fused attention stem (issue 13): the 1x1 projections of the image
into q, k and the M value maps, then the reference spatially-aware attention (SPEC section 2).

Readable, not frugal: it forms the (2 + M) * C_out channels per pixel that the fused op never
stores. It is the oracle of the fused op's tests; run it in float64 for exact comparisons.
"""
from __future__ import annotations

import torch

from .._utils import PADDINGS, WINDOWS, check_choice, check_positive_int, check_same_device, check_scale, check_tensor
from .spatial_attention import spatial_attention2d

# The fused op reads every input channel of every tap: it is meant for the stem's image (3 channels).
MAX_IN_CHANNELS = 8


def check_attention_stem_args(x, w_q, w_k, w_v, mix, heads, block_size, scale, window, padding):
    """Validate the arguments of attention_stem2d (both backends share these checks)."""
    check_tensor("x", x, rank=4)
    check_tensor("w_q", w_q, rank=2)
    check_tensor("w_k", w_k, rank=2)
    check_tensor("w_v", w_v, rank=3)
    check_tensor("mix", mix, rank=3)
    check_positive_int(heads, "heads")
    check_positive_int(block_size, "block_size")
    C_in = x.shape[1]
    if not 1 <= C_in <= MAX_IN_CHANNELS:
        raise ValueError(f"x must have 1 to {MAX_IN_CHANNELS} channels (the fused stem reads every channel of "
                         f"every key; use the 1x1 conv + spatial_attention2d for more), got {C_in}")
    C_out = w_q.shape[0]
    if w_q.shape[1] != C_in:
        raise ValueError(f"w_q must have shape (C_out, C_in) with C_in = {C_in} (x's channels), got {tuple(w_q.shape)}")
    if tuple(w_k.shape) != tuple(w_q.shape):
        raise ValueError(f"w_k must have the shape of w_q {tuple(w_q.shape)}, got {tuple(w_k.shape)}")
    if w_v.shape[1:] != w_q.shape or w_v.shape[0] < 1:
        raise ValueError(f"w_v must have shape (M, C_out, C_in) = (M, {C_out}, {C_in}) with M >= 1, "
                         f"got {tuple(w_v.shape)}")
    M = w_v.shape[0]
    if tuple(mix.shape) != (block_size, block_size, M):
        raise ValueError(f"mix must have shape (block_size, block_size, M) = ({block_size}, {block_size}, {M}), "
                         f"got {tuple(mix.shape)}")
    if C_out % heads != 0:
        raise ValueError(f"heads ({heads}) must divide C_out ({C_out}, w_q's rows)")
    check_scale(scale)
    check_choice(window, "window", WINDOWS)
    check_choice(padding, "padding", PADDINGS)
    check_same_device(x=x, w_q=w_q, w_k=w_k, w_v=w_v, mix=mix)


def attention_stem2d(x, w_q, w_k, w_v, mix, heads, block_size=4, scale=1.0, window="block", padding="zeros",
                     backend="reference"):
    """Reference of `sasa_triton.attention_stem2d`, same signature and shapes.

    x (B, C_in, H, W); w_q, w_k (C_out, C_in); w_v (M, C_out, C_in); mix (block_size, block_size, M).
    Returns (B, H, W, heads, C_out // heads) in x's dtype; computes in float32 at least (float64
    if any input is float64).
    """
    check_attention_stem_args(x, w_q, w_k, w_v, mix, heads, block_size, scale, window, padding)
    compute = torch.float64 if torch.float64 in (x.dtype, w_q.dtype, w_v.dtype, mix.dtype) else torch.float32
    C_out = w_q.shape[0]
    x_c = x.to(compute)
    q = torch.einsum("oc,bchw->bhwo", w_q.to(compute), x_c).unflatten(-1, (heads, C_out // heads))
    k = torch.einsum("oc,bchw->bhwo", w_k.to(compute), x_c).unflatten(-1, (heads, C_out // heads))
    values = torch.einsum("moc,bchw->bhwmo", w_v.to(compute), x_c).unflatten(-1, (heads, C_out // heads))
    y = spatial_attention2d(q, k, values, mix.to(compute), block_size, scale, window, padding)
    return y.to(x.dtype)


def attention_stem2d_from_tables(x, qk, w_eff, heads, block_size=4, window="block", padding="zeros"):
    """The stem's attention from the tables the fused op takes (`sasa_triton.ops.attention_stem.
    stem_tables`): QK (heads, C_in, C_in), the scale folded in, and W_eff (bs, bs, C_out, C_in).
    For pixel (i, j), head h and the keys (a, b): logit = x_ab . QK[h] x_ij and v_ab = W_eff[a, b]
    x_ab, as the spatial attention of q = QK[h] x_ij against k = x_ab with bs * bs value maps
    (W_eff[a, b] x) and a one-hot mix, q, k and the values zero-padded to one channel count.
    Returns (B, H, W, heads, C_out // heads) in x's dtype."""
    compute = torch.float64 if torch.float64 in (x.dtype, qk.dtype, w_eff.dtype) else torch.float32
    B, C_in, H, W = x.shape
    D = w_eff.shape[2] // heads
    pad = lambda t: torch.nn.functional.pad(t, (0, max(C_in, D) - t.shape[-1]))  # noqa: E731
    pixels = x.to(compute).permute(0, 2, 3, 1)                                    # (B, H, W, C_in)
    q = pad(torch.einsum("nce,bhwe->bhwnc", qk.to(compute), pixels))              # (B, H, W, heads, C)
    k = pad(pixels[:, :, :, None, :].expand(B, H, W, heads, C_in))
    values = torch.einsum("poc,bhwc->bhwpo", w_eff.to(compute).flatten(0, 1), pixels)
    values = pad(values.unflatten(-1, (heads, D)))                                # (B, H, W, bs*bs, heads, C)
    one_hot = torch.eye(block_size * block_size, dtype=compute, device=x.device)
    y = spatial_attention2d(q, k, values, one_hot.view(block_size, block_size, -1), block_size, 1.0, window, padding)
    return y[..., :D].to(x.dtype)
