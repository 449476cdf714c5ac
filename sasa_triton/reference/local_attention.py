"""PyTorch reference of the SASA local attention op (SPEC section 1).

Readable and memory-friendly: it loops over the k*k window offsets and uses shifted views of a
padded K/V, so it never unfolds K/V. It is the CPU path and the oracle of the tests; run it in
float64 for exact comparisons.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._utils import check_local_attention_args


def local_attention2d(q, k, v, rel_rows=None, rel_cols=None, kernel_size=7, dilation=1, scale=1.0,
                      padding="zeros", backend="reference"):
    """Reference local 2D attention. Same signature and shapes as `sasa_triton.local_attention2d`.

    q, k, v: (B, H, W, heads, D). rel_rows: (k, D // 2) or (heads, k, D // 2); rel_cols:
    (k, D - D // 2) or (heads, k, D - D // 2); either may be None. Returns (B, H, W, heads, D).
    Computes in float32 at least (float64 stays float64) and returns q's dtype.
    """
    check_local_attention_args(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)
    out_dtype = q.dtype
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    B, H, W, heads, D = q.shape
    d_rows = D // 2
    radius = dilation * (kernel_size // 2)

    # Relative logits: 2k dot products of length D/2 per query, never k*k relative vectors.
    # row_logits[..., t] = q[..., :Dr] . rel_rows[t], shape (B, H, W, heads, k).
    def rel_logits(q_part, rel):
        if rel is None:
            return None
        rel = rel.to(compute)
        if rel.dim() == 2:
            return torch.einsum("bhwnd,td->bhwnt", q_part, rel)
        return torch.einsum("bhwnd,ntd->bhwnt", q_part, rel)

    row_logits = rel_logits(q[..., :d_rows], rel_rows)
    col_logits = rel_logits(q[..., d_rows:], rel_cols)

    # Pad K/V spatially; "zeros" pads with zero keys/values that stay in the softmax, "mask"
    # leaves them out through the `inside` indicator.
    pad = (0, 0, 0, 0, radius, radius, radius, radius)
    k_pad = F.pad(k, pad)
    v_pad = F.pad(v, pad)
    inside = F.pad(torch.ones(H, W, dtype=torch.bool, device=q.device), (radius,) * 4)

    logits = []
    for t_row in range(kernel_size):
        for t_col in range(kernel_size):
            r0, c0 = t_row * dilation, t_col * dilation
            k_shift = k_pad[:, r0:r0 + H, c0:c0 + W]
            logit = (q * k_shift).sum(-1)  # (B, H, W, heads)
            if row_logits is not None:
                logit = logit + row_logits[..., t_row]
            if col_logits is not None:
                logit = logit + col_logits[..., t_col]
            logit = logit * scale
            if padding == "mask":
                valid = inside[r0:r0 + H, c0:c0 + W][None, :, :, None]
                logit = logit.masked_fill(~valid, float("-inf"))
            logits.append(logit)
    probs = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, H, W, heads, k*k)

    out = torch.zeros_like(q)
    for index in range(kernel_size * kernel_size):
        r0 = (index // kernel_size) * dilation
        c0 = (index % kernel_size) * dilation
        out = out + probs[..., index, None] * v_pad[:, r0:r0 + H, c0:c0 + W]
    return out.to(out_dtype)
