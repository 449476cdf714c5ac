"""PyTorch reference of the spatially-aware attention op of the stem (SPEC section 2).

Readable: window="block" cuts the zero-padded image into its non-overlapping blocks and runs a
dense softmax attention inside each (bs*bs queries x bs*bs keys); window="sliding" loops over
the bs*bs window positions (a, b) with shifted views of a zero-padded K/V. It is the CPU path and
the oracle of the tests; run it in float64 for exact comparisons.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_spatial_attention_args


def spatial_attention2d(q, k, values, mix, block_size=4, scale=1.0, window="block", padding="zeros",
                        backend="reference"):
    """Reference spatially-aware attention. Same signature and shapes as `sasa_triton.spatial_attention2d`.

    q, k: (B, H, W, heads, D); values: (B, H, W, M, heads, D); mix: (block_size, block_size, M).
    Returns (B, H, W, heads, D). Computes in float32 at least (float64 stays float64) and returns
    q's dtype.
    """
    check_spatial_attention_args(q, k, values, mix, block_size, scale, window, padding)
    out_dtype = q.dtype
    compute = torch.float64 if torch.float64 in (q.dtype, mix.dtype) else torch.float32
    q, k, values, mix = q.to(compute), k.to(compute), values.to(compute), mix.to(compute)
    B, H, W, heads, D = q.shape
    bs = block_size
    if window == "block":
        return _block_attention(q, k, values, mix, bs, scale, padding).to(out_dtype)

    # Sliding window: offsets -(bs // 2) .. bs - 1 - bs // 2 (one more after than before for even
    # bs). The key (a, b) of query (i, j) sits at (i + a, j + b) of the padded K/V.
    before, after = bs // 2, bs - 1 - bs // 2
    pad = (0, 0, 0, 0, before, after, before, after)
    k_pad = F.pad(k, pad)                                   # zeros outside the image
    v_pad = F.pad(values, (0, 0) + pad)
    inside = F.pad(torch.ones(H, W, dtype=torch.bool, device=q.device), pad[4:])

    logits, mixed_values = [], []
    for a in range(bs):
        for b in range(bs):
            logit = (q * k_pad[:, a:a + H, b:b + W]).sum(-1) * scale  # (B, H, W, heads)
            if padding == "mask":
                logit = logit.masked_fill(~inside[a:a + H, b:b + W][None, :, :, None], float("-inf"))
            logits.append(logit)
            # v_ab = sum_m mix[a, b, m] * V_m at that key.
            mixed_values.append(torch.einsum("bhwmnd,m->bhwnd", v_pad[:, a:a + H, b:b + W], mix[a, b]))
    probs = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, H, W, heads, bs*bs)
    out = sum(probs[..., index, None] * v for index, v in enumerate(mixed_values))
    return out.to(out_dtype)


def _block_attention(q, k, values, mix, bs, scale, padding):
    """Non-overlapping blocks: pad H, W up to whole blocks (zeros), cut into blocks of bs*bs
    pixels in row-major (a, b) order, attend within each block, crop."""
    B, H, W, heads, D = q.shape
    M = values.shape[3]
    pad_bottom, pad_right = -H % bs, -W % bs
    pad = (0, 0, 0, 0, 0, pad_right, 0, pad_bottom)
    rows, cols = (H + pad_bottom) // bs, (W + pad_right) // bs

    def to_blocks(t):  # (B, H', W', ...) -> (B, rows, cols, bs*bs, ...)
        t = t.reshape(t.shape[0], rows, bs, cols, bs, *t.shape[3:]).transpose(2, 3)
        return t.reshape(t.shape[0], rows, cols, bs * bs, *t.shape[5:])

    q_blocks, k_blocks = to_blocks(F.pad(q, pad)), to_blocks(F.pad(k, pad))  # (B, r, c, P, heads, D)
    v_blocks = to_blocks(F.pad(values, (0, 0) + pad))                         # (B, r, c, P, M, heads, D)
    inside = to_blocks(F.pad(torch.ones(1, H, W, dtype=torch.bool, device=q.device), pad[4:]))[0]  # (r, c, P)

    logits = torch.einsum("brcpnd,brcsnd->brcnps", q_blocks, k_blocks) * scale  # query p, key s
    if padding == "mask":
        logits = logits.masked_fill(~inside[None, :, :, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    mixed = torch.einsum("brcsmnd,sm->brcsnd", v_blocks, mix.reshape(bs * bs, M))  # v_ab = sum_m p(a,b,m) V_m
    out = torch.einsum("brcnps,brcsnd->brcpnd", probs, mixed)                       # (B, r, c, P, heads, D)
    out = out.reshape(B, rows, cols, bs, bs, heads, D).transpose(2, 3).reshape(B, rows * bs, cols * bs, heads, D)
    return out[:, :H, :W].contiguous()
