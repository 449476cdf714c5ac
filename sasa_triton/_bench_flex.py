"""The SASA op written with torch's FlexAttention: a benchmark baseline, not a backend.

Queries are the H*W pixels; keys are the (H + 2r) * (W + 2r) pixels of the zero-padded key map
(padding="zeros": outside keys are zero and stay in the softmax; "mask" leaves them out in the
mask). The k x k window is a mask_mod (a BlockMask, so flex skips key blocks outside every
window of a query block), and the relative term q[:Dr].rel_rows[a-i] + q[Dr:].rel_cols[b-j] is
a score_mod that gathers from two (B, heads, H*W, k) tables computed by einsum (2k dot products
per query, as the fused kernel). Flex fuses only under torch.compile; eager flex materialises
the full score matrix (fine for the small shapes of the tests, and forward-only on CPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _window_mask_mod(H, W, kernel_size, dilation, padding):
    radius = dilation * (kernel_size // 2)
    Wp = W + 2 * radius

    def mask_mod(b, h, q_idx, kv_idx):
        i, j = q_idx // W, q_idx % W
        a, c = kv_idx // Wp, kv_idx % Wp  # padded coordinates: image pixel (a - r, c - r)
        da, dc = a - i, c - j  # 0..2r inside the window
        ok = (da >= 0) & (da <= 2 * radius) & (dc >= 0) & (dc <= 2 * radius)
        ok = ok & (da % dilation == 0) & (dc % dilation == 0)
        if padding == "mask":
            ok = ok & (a >= radius) & (a < radius + H) & (c >= radius) & (c < radius + W)
        return ok

    return mask_mod


def window_block_mask(H, W, kernel_size, dilation=1, padding="zeros", device="cpu"):
    """The BlockMask of the k x k window over the zero-padded key map (independent of batch and
    head, so it is built once per shape, outside any timed region)."""
    from torch.nn.attention.flex_attention import create_block_mask

    radius = dilation * (kernel_size // 2)
    kv_len = (H + 2 * radius) * (W + 2 * radius)
    return create_block_mask(_window_mask_mod(H, W, kernel_size, dilation, padding), None, None, H * W, kv_len,
                             device=str(device))


def flex_local_attention2d(q, k, v, rel_rows=None, rel_cols=None, kernel_size=7, dilation=1, scale=1.0,
                           padding="zeros", block_mask=None, min_head_dim=1):
    """local_attention2d (same arguments and (B, H, W, heads, D) shapes) through flex_attention.

    block_mask: from `window_block_mask` (built here when None). min_head_dim: zero-pad the head
    dim of q, k, v up to this (compiled flex needs D >= 16; zero channels change nothing).
    Wrap in torch.compile for the fused kernel; eager is a slow unfused fallback.
    """
    from torch.nn.attention.flex_attention import flex_attention

    B, H, W, heads, D = q.shape
    radius = dilation * (kernel_size // 2)
    Hp, Wp = H + 2 * radius, W + 2 * radius
    d_rows = D // 2
    if block_mask is None:
        block_mask = window_block_mask(H, W, kernel_size, dilation, padding, q.device)

    qh = q.permute(0, 3, 1, 2, 4).reshape(B, heads, H * W, D)
    pad = (0, 0, 0, 0, radius, radius, radius, radius)
    kh = F.pad(k, pad).permute(0, 3, 1, 2, 4).reshape(B, heads, Hp * Wp, D)
    vh = F.pad(v, pad).permute(0, 3, 1, 2, 4).reshape(B, heads, Hp * Wp, D)

    score_mod = None
    if rel_rows is not None:
        def rel_logits(q_part, rel):
            rel = rel.to(q_part.dtype)
            equation = "bnqd,td->bnqt" if rel.dim() == 2 else "bnqd,ntd->bnqt"
            return torch.einsum(equation, q_part, rel).float()  # (B, heads, H*W, k)

        row_logits = rel_logits(qh[..., :d_rows], rel_rows)
        col_logits = rel_logits(qh[..., d_rows:], rel_cols)

        def score_mod(score, b, h, q_idx, kv_idx):
            i, j = q_idx // W, q_idx % W
            a, c = kv_idx // Wp, kv_idx % Wp
            # Clamped: flex also evaluates score_mod on masked pairs of a partially masked block.
            t_row = ((a - i) // dilation).clamp(0, kernel_size - 1)
            t_col = ((c - j) // dilation).clamp(0, kernel_size - 1)
            return score + scale * (row_logits[b, h, q_idx, t_row] + col_logits[b, h, q_idx, t_col])

    if D < min_head_dim:
        extra = (0, min_head_dim - D)
        qh, kh, vh = F.pad(qh, extra), F.pad(kh, extra), F.pad(vh, extra)
    out = flex_attention(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=float(scale))
    return out[..., :D].reshape(B, heads, H, W, D).permute(0, 2, 3, 1, 4)
