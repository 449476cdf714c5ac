"""The attention stem from the image in one pass (SPEC section 2, issue 13): Triton kernels.

Algorithm: for a query pixel x_i, head h and its bs*bs taps t (the keys of its block or window),
    logit_it = scale * (W_Q^h x_i) . (W_K^h x_t) = x_t^T QK^h x_i,  QK^h = scale * W_K^hT W_Q^h  (C_in x C_in)
    y_i^h    = sum_t softmax_t(logit_it) W_eff(t)^h x_t,            W_eff(t) = sum_m p(t, m) W_V^m
so with C_in = 3 channels a program reads x (its queries and their taps) and writes y and one
log-sum-exp per (pixel, head): q, k and the M value maps are never formed, not even on chip (u = QK^h x_i
is a C_in-vector per query). The bs*bs taps of a query are a (BLOCK_M, taps, C_in) tile: the softmax
is exact (no online rescaling) and y = Z @ W_eff^h with Z[i, (t, c)] = P_it x_t[c], one dot of depth
bs*bs*C_in. QK and W_eff are formed in PyTorch (heads*C_in^2 and bs*bs*C_out*C_in numbers), so their
gradients reach W_Q, W_K, every W_V^m and the mixture p exactly through autograd.

Backward, deterministic and without atomics: a query-stationary kernel recomputes P from the
log-sum-exp and gives per-program partial sums of dQK and dW_eff (each program owns one row of
the partial buffers, summed by torch), and per (query, tap) the gradient gx the query sends to
that tap's pixel (C_in numbers, summed over heads); a second kernel gathers, per pixel, the gx of
every query that sees it: dx. Trade-off: gx is bs*bs*C_in fp32 per pixel of transient memory (192 B
for the paper's stem), in exchange for no recomputation and no key-stationary pass.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .._library import autocast_inputs, define_op, differentiable_backward, launch
from .._utils import check_kernel_dtype, dot_precision, interpreter_enabled, resolve_backend, transforms_active
from ..reference.attention_stem import MAX_IN_CHANNELS, check_attention_stem_args


@triton.jit
def _tile_pixels(tile, H, W, n_tiles_h, n_tiles_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Batch, rows, columns and in-image flags of the TILE_H x TILE_W pixels of flat tile `tile`
    (tiles run over the batch, then tile rows, then tile columns)."""
    per_image = n_tiles_h * n_tiles_w
    batch = (tile // per_image).to(tl.int64)
    offs = tl.arange(0, TILE_H * TILE_W)
    row = ((tile % per_image) // n_tiles_w) * TILE_H + offs // TILE_W
    col = ((tile % per_image) % n_tiles_w) * TILE_W + offs % TILE_W
    return batch, row, col, (row < H) & (col < W)


@triton.jit
def _tap_pixels(row, col, H, W, BS: tl.constexpr, WINDOW: tl.constexpr, TPAD: tl.constexpr):
    """Rows, columns and in-image flags (BLOCK_M, TPAD) of the taps t = a * BS + b of each query:
    the pixel (a, b) of its block (WINDOW 0) or of its window, offsets -(BS // 2) .. (WINDOW 1)."""
    t = tl.arange(0, TPAD)
    if WINDOW == 0:
        key_row = ((row // BS) * BS)[:, None] + (t // BS)[None, :]
        key_col = ((col // BS) * BS)[:, None] + (t % BS)[None, :]
    else:
        key_row = row[:, None] + (t // BS - BS // 2)[None, :]
        key_col = col[:, None] + (t % BS - BS // 2)[None, :]
    inside = (key_row >= 0) & (key_row < H) & (key_col >= 0) & (key_col < W) & (t < BS * BS)[None, :]
    return key_row, key_col, inside


@triton.jit
def _load_taps(X, batch, row, col, q_in, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
               C_IN: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr, MASK_PADDING: tl.constexpr,
               TPAD: tl.constexpr, CPAD: tl.constexpr):
    """x of each query (BLOCK_M, CPAD), x of its taps (BLOCK_M, TPAD, CPAD) in fp32 (zeros outside
    the image: k = v = 0 there) and which taps enter the softmax (BLOCK_M, TPAD)."""
    offs_c = tl.arange(0, CPAD)
    c_ok = offs_c < C_IN
    x_base = X + batch * stride_xb + offs_c * stride_xc
    x_q = tl.load(x_base[None, :] + (row * stride_xh + col * stride_xw)[:, None],
                  mask=q_in[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    key_row, key_col, key_in = _tap_pixels(row, col, H, W, BS, WINDOW, TPAD)
    key_in = key_in & q_in[:, None]
    x_taps = tl.load(x_base[None, None, :] + (key_row * stride_xh + key_col * stride_xw)[:, :, None],
                     mask=key_in[:, :, None] & c_ok[None, None, :], other=0.0).to(tl.float32)
    tap_ok = (tl.arange(0, TPAD) < BS * BS)[None, :] & q_in[:, None]
    if MASK_PADDING:
        tap_ok = tap_ok & key_in
    return x_q, x_taps, tap_ok


@triton.jit
def _head_tables(QK, WEFF, head, C_OUT, C_IN: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                 TPAD: tl.constexpr, CPAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """QK^h (CPAD, CPAD) [key channel, query channel] and W_eff^h as a (TPAD * CPAD, BLOCK_D) tile,
    row k = t * CPAD + c, both fp32 and zero-padded."""
    offs_c = tl.arange(0, CPAD)
    c_ok = offs_c < C_IN
    qk = tl.load(QK + head * C_IN * C_IN + offs_c[:, None] * C_IN + offs_c[None, :],
                 mask=c_ok[:, None] & c_ok[None, :], other=0.0)
    offs_k = tl.arange(0, TPAD * CPAD)
    k_t, k_c = offs_k // CPAD, offs_k % CPAD
    offs_d = tl.arange(0, BLOCK_D)
    w = tl.load(WEFF + k_t[:, None] * (C_OUT * C_IN) + (head * D + offs_d)[None, :] * C_IN + k_c[:, None],
                mask=((k_t < BS * BS) & (k_c < C_IN))[:, None] & (offs_d < D)[None, :], other=0.0)
    return qk, w


@triton.jit
def _stem_fwd_kernel(
    X, QK, WEFF, Y, LSE,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
    H, W, heads, n_tiles_h, n_tiles_w,
    C_IN: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr, MASK_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, TPAD: tl.constexpr,
    CPAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A program: one tile of queries, every head; x and the taps' x are loaded once.
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    batch, row, col, q_in = _tile_pixels(tl.program_id(0), H, W, n_tiles_h, n_tiles_w, TILE_H, TILE_W)
    x_q, x_taps, tap_ok = _load_taps(X, batch, row, col, q_in, H, W, stride_xb, stride_xc, stride_xh, stride_xw,
                                     C_IN, BS, WINDOW, MASK_PADDING, TPAD, CPAD)
    offs_d = tl.arange(0, BLOCK_D)
    y_ptrs = (Y + batch * stride_yb + (row * stride_yh + col * stride_yw)[:, None]
              + offs_d[None, :] * stride_yd)
    y_mask = q_in[:, None] & (offs_d < D)[None, :]
    lse_ptrs = LSE + batch * heads * H * W + row * W + col
    for head in range(heads):
        qk, w = _head_tables(QK, WEFF, head, heads * D, C_IN, D, BS, TPAD, CPAD, BLOCK_D)
        u = tl.sum(x_q[:, None, :] * qk[None, :, :], axis=2)               # QK^h x_i
        logits = tl.sum(u[:, None, :] * x_taps, axis=2) * 1.4426950408889634            # (BLOCK_M, TPAD), log2 units
        logits = tl.where(tap_ok, logits, float("-inf"))
        m = tl.max(logits, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # pixels outside the image: no tap at all
        p = tl.exp2(logits - m[:, None])
        l = tl.sum(p, axis=1)
        l = tl.where(l == 0.0, 1.0, l)
        z = tl.reshape((p / l[:, None])[:, :, None] * x_taps, (BLOCK_M, TPAD * CPAD))
        y = tl.dot(z, w, input_precision=DOT_PRECISION)
        tl.store(y_ptrs + head * stride_yn, y.to(Y.dtype.element_ty), mask=y_mask)
        tl.store(lse_ptrs + head * H * W, (m + tl.log2(l)) * 0.6931471805599453, mask=q_in)


@triton.jit
def _stem_bwd_kernel(
    X, QK, WEFF, LSE, DY, GX, DQK_PART, DW_PART,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dyb, stride_dyh, stride_dyw, stride_dyn, stride_dyd,
    H, W, heads, n_tiles_h, n_tiles_w, n_tiles,
    C_IN: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr, MASK_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr, TPAD: tl.constexpr,
    CPAD: tl.constexpr, BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr,
):
    # Query-stationary: TILES_PER_PROGRAM tiles, every head; the program's partial dQK and dW_eff
    # accumulate in its own rows of DQK_PART / DW_PART (zeroed by the launcher).
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    KPAD: tl.constexpr = TPAD * CPAD
    pid = tl.program_id(0)
    offs_c = tl.arange(0, CPAD)
    offs_t = tl.arange(0, TPAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, KPAD)
    for tile in range(pid * TILES_PER_PROGRAM, tl.minimum(pid * TILES_PER_PROGRAM + TILES_PER_PROGRAM, n_tiles)):
        batch, row, col, q_in = _tile_pixels(tile, H, W, n_tiles_h, n_tiles_w, TILE_H, TILE_W)
        x_q, x_taps, tap_ok = _load_taps(X, batch, row, col, q_in, H, W, stride_xb, stride_xc, stride_xh,
                                         stride_xw, C_IN, BS, WINDOW, MASK_PADDING, TPAD, CPAD)
        gx = tl.zeros((BLOCK_M, TPAD, CPAD), dtype=tl.float32)  # what query i sends to its tap t's pixel
        dx_q = tl.zeros((BLOCK_M, CPAD), dtype=tl.float32)      # the query's own gradient (through q)
        dy_ptrs = (DY + batch * stride_dyb + (row * stride_dyh + col * stride_dyw)[:, None]
                   + offs_d[None, :] * stride_dyd)
        dy_mask = q_in[:, None] & (offs_d < D)[None, :]
        lse_ptrs = LSE + batch * heads * H * W + row * W + col
        for head in range(heads):
            qk, w = _head_tables(QK, WEFF, head, heads * D, C_IN, D, BS, TPAD, CPAD, BLOCK_D)
            u = tl.sum(x_q[:, None, :] * qk[None, :, :], axis=2)
            logits = tl.sum(u[:, None, :] * x_taps, axis=2) * 1.4426950408889634
            lse2 = tl.load(lse_ptrs + head * H * W, mask=q_in, other=0.0) * 1.4426950408889634
            p = tl.where(tap_ok, tl.exp2(logits - lse2[:, None]), 0.0)       # (BLOCK_M, TPAD)
            # Renormalized: exp2(logit - lse) sums to 1 only to within lse's rounding (|lse| ulps),
            # which ds = p (dp - delta) amplifies where delta cancels dp: 4-20x PyTorch's own fp32
            # error in dx and dQK at logits of 60-120 without this (bench/RESULTS.md, 2026-12-01).
            p_sum = tl.sum(p, axis=1)
            p = p / tl.where(p_sum == 0.0, 1.0, p_sum)[:, None]
            dy = tl.load(dy_ptrs + head * stride_dyn, mask=dy_mask, other=0.0).to(tl.float32)
            # dz[i, t, c] = (W_eff(t)^hT dy_i)[c]: the gradient of P_it x_t[c].
            dz = tl.reshape(tl.dot(dy, tl.trans(w), input_precision=DOT_PRECISION), (BLOCK_M, TPAD, CPAD))
            dp = tl.sum(dz * x_taps, axis=2)                                  # dy_i . v_it
            delta = tl.sum(p * dp, axis=1)                                    # dy_i . y_i
            ds = p * (dp - delta[:, None])                                    # d logit_it
            gx += p[:, :, None] * dz + ds[:, :, None] * u[:, None, :]
            key_sum = tl.sum(ds[:, :, None] * x_taps, axis=1)                 # sum_t ds_it x_t
            dx_q += tl.sum(key_sum[:, :, None] * qk[None, :, :], axis=1)
            dqk = tl.sum(key_sum[:, :, None] * x_q[:, None, :], axis=0)
            dw = tl.dot(tl.trans(dy), tl.reshape(p[:, :, None] * x_taps, (BLOCK_M, KPAD)),
                        input_precision=DOT_PRECISION)
            # Add to the program's own partial rows. Threads may hold copies of one element: the
            # barriers order every read of the row before any write, and the writes before the next read.
            part = (pid * heads + head).to(tl.int64)
            dqk_ptrs = DQK_PART + part * CPAD * CPAD + offs_c[:, None] * CPAD + offs_c[None, :]
            dw_ptrs = DW_PART + part * BLOCK_D * KPAD + offs_d[:, None] * KPAD + offs_k[None, :]
            dqk += tl.load(dqk_ptrs)
            dw += tl.load(dw_ptrs)
            tl.debug_barrier()
            tl.store(dqk_ptrs, dqk)
            tl.store(dw_ptrs, dw)
            tl.debug_barrier()
        # The query is one of its own taps: its gradient through q travels with that tap's gx.
        if WINDOW == 0:
            self_tap = (row % BS) * BS + col % BS
        else:
            self_tap = (BS // 2) * BS + BS // 2 + tl.zeros_like(row)
        gx += tl.where((offs_t[None, :] == self_tap[:, None])[:, :, None], dx_q[:, None, :], 0.0)
        pixel = (batch * H + row) * W + col
        tl.store(GX + pixel[:, None, None] * (BS * BS * C_IN) + offs_t[None, :, None] * C_IN
                 + offs_c[None, None, :], gx,
                 mask=q_in[:, None, None] & (offs_t < BS * BS)[None, :, None] & (offs_c < C_IN)[None, None, :])


@triton.jit
def _stem_dx_kernel(
    GX, DX,
    stride_dxb, stride_dxc, stride_dxh, stride_dxw,
    H, W, n_tiles_h, n_tiles_w,
    C_IN: tl.constexpr, BS: tl.constexpr, WINDOW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    TPAD: tl.constexpr, CPAD: tl.constexpr,
):
    # dx_j = sum over the queries i that see pixel j (s = 0 .. bs*bs - 1) of gx[i, tap of j for i].
    batch, row, col, inside = _tile_pixels(tl.program_id(0), H, W, n_tiles_h, n_tiles_w, TILE_H, TILE_W)
    s = tl.arange(0, TPAD)
    offs_c = tl.arange(0, CPAD)
    if WINDOW == 0:  # the queries of j's block; j is tap (row % BS, col % BS) of each
        q_row = ((row // BS) * BS)[:, None] + (s // BS)[None, :]
        q_col = ((col // BS) * BS)[:, None] + (s % BS)[None, :]
        tap = ((row % BS) * BS + col % BS)[:, None] + tl.zeros_like(s)[None, :]
    else:  # j is tap s of the query at j - offset(s)
        q_row = row[:, None] + (BS // 2 - s // BS)[None, :]
        q_col = col[:, None] + (BS // 2 - s % BS)[None, :]
        tap = s[None, :] + tl.zeros_like(row)[:, None]
    seen = (inside[:, None] & (s < BS * BS)[None, :] & (q_row >= 0) & (q_row < H) & (q_col >= 0)
            & (q_col < W))
    pixel = (batch * H + q_row) * W + q_col
    g = tl.load(GX + (pixel * (BS * BS * C_IN) + tap * C_IN)[:, :, None] + offs_c[None, None, :],
                mask=seen[:, :, None] & (offs_c < C_IN)[None, None, :], other=0.0)
    dx = tl.sum(g, axis=1)
    tl.store(DX + batch * stride_dxb + (row * stride_dxh + col * stride_dxw)[:, None] + offs_c[None, :] * stride_dxc,
             dx.to(DX.dtype.element_ty), mask=inside[:, None] & (offs_c < C_IN)[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configs and launchers
# ----------------------------------------------------------------------------------------------

# The backward's programs each own one row of the partial-sum buffers (heads * BLOCK_D * TPAD * CPAD
# fp32: 16 KB for the paper's stem): at most MAX_BWD_PROGRAMS of them, and at least
# MIN_TILES_PER_PROGRAM tiles each, so that row costs at most ~128 B per pixel.
MAX_BWD_PROGRAMS = 1024
MIN_TILES_PER_PROGRAM = 8


def default_config(kernel: str, block_size: int) -> dict:
    """Tiles of `kernel` ("fwd", "bwd", "dx"): TILE_H x TILE_W query pixels (TILE_H a multiple of
    the block for block_size <= 4, so a tile is whole block rows), num_warps 4; small enough for the
    (pixels, taps, channels) tiles to stay in registers. sm_90, 3 -> 64 channels, 4 heads, 4x4
    blocks (ptxas -v): fwd 4x16 96-140 registers, bwd 4x4 164-168 in bf16 and 248-252 in fp32
    (ieee dots; 4x8 would take 245-255), dx 4x8 40-48; no spills.

    Larger blocks (32 taps or more) take 2-row tiles, and the backward 2 x 8 (a tile's dots need
    16 pixels) on 8 warps: at 4 warps its fp32 tiles spilled 4-16 bytes at 5x5 blocks and 716 at
    7x7, at 8 warps 0 and 8-40 (bf16: 183-204 registers at 5x5, 248-255 at 7x7, no spill; sm_90,
    Triton 3.9, 2026-12-01)."""
    tile_h = 4 if block_size <= 4 else 2
    tile_w = {"fwd": 16, "bwd": 4 if block_size <= 4 else 8, "dx": 8}[kernel]
    num_warps = 8 if kernel == "bwd" and block_size > 4 else 4
    return dict(TILE_H=tile_h, TILE_W=tile_w, num_warps=num_warps, num_stages=1)


def _meta(x, block_size, window, config):
    """Constexprs shared by the three kernels; CPAD is widened so that the dots' depth TPAD * CPAD
    is at least 16 (tl.dot)."""
    tpad = triton.next_power_of_2(block_size * block_size)
    cpad = max(triton.next_power_of_2(x.shape[1]), 16 // min(tpad, 16))
    if config["TILE_H"] * config["TILE_W"] < 16:
        raise ValueError(f"TILE_H * TILE_W must be >= 16 (tl.dot), got config {config}")
    return dict(C_IN=x.shape[1], BS=block_size, WINDOW=int(window == "sliding"), TILE_H=config["TILE_H"],
                TILE_W=config["TILE_W"], TPAD=tpad, CPAD=cpad, num_warps=config["num_warps"],
                num_stages=config["num_stages"])


def _attention_meta(x, w_eff, heads, block_size, window, padding, config):
    """_meta plus the constexprs of the kernels that attend (fwd, bwd)."""
    D = w_eff.shape[2] // heads
    return dict(_meta(x, block_size, window, config), D=D, MASK_PADDING=int(padding == "mask"),
                DOT_PRECISION=dot_precision(x.dtype), BLOCK_D=max(16, triton.next_power_of_2(D)))


def _tiles(x, meta):
    B, _, H, W = x.shape
    n_tiles_h, n_tiles_w = triton.cdiv(H, meta["TILE_H"]), triton.cdiv(W, meta["TILE_W"])
    return n_tiles_h, n_tiles_w, B * n_tiles_h * n_tiles_w


def _fwd_launch(x, qk, w_eff, y, lse, heads, block_size, window, padding, config):
    meta = _attention_meta(x, w_eff, heads, block_size, window, padding, config)
    n_tiles_h, n_tiles_w, n_tiles = _tiles(x, meta)
    args = (x, qk, w_eff, y, lse, *x.stride(), *y.stride(), x.shape[2], x.shape[3], heads, n_tiles_h, n_tiles_w)
    return (n_tiles,), args, meta


def _bwd_programs(x, meta, config):
    n_tiles = _tiles(x, meta)[2]
    tiles_per_program = config.get("TILES_PER_PROGRAM") or max(MIN_TILES_PER_PROGRAM,
                                                               triton.cdiv(n_tiles, MAX_BWD_PROGRAMS))
    return tiles_per_program, triton.cdiv(n_tiles, tiles_per_program)


def _bwd_launch(x, qk, w_eff, lse, dy, gx, dqk_part, dw_part, heads, block_size, window, padding, config):
    meta = _attention_meta(x, w_eff, heads, block_size, window, padding, config)
    tiles_per_program, n_programs = _bwd_programs(x, meta, config)
    meta.update(TILES_PER_PROGRAM=tiles_per_program)
    n_tiles_h, n_tiles_w, n_tiles = _tiles(x, meta)
    args = (x, qk, w_eff, lse, dy, gx, dqk_part, dw_part, *x.stride(), *dy.stride(), x.shape[2], x.shape[3],
            heads, n_tiles_h, n_tiles_w, n_tiles)
    return (n_programs,), args, meta


def _partial_buffers(x, heads, D, block_size, config, fake=False):
    """Zeroed per-program partial sums: dQK (programs, heads, CPAD, CPAD), dW_eff (programs, heads,
    BLOCK_D, TPAD * CPAD), fp32."""
    meta = _meta(x, block_size, "block", config)
    n_programs = _bwd_programs(x, meta, config)[1]
    cpad, kpad = meta["CPAD"], meta["TPAD"] * meta["CPAD"]
    alloc = torch.empty if fake else torch.zeros
    return (alloc((n_programs, heads, cpad, cpad), device=x.device, dtype=torch.float32),
            alloc((n_programs, heads, max(16, triton.next_power_of_2(D)), kpad), device=x.device,
                  dtype=torch.float32))


def _dx_launch(x, gx, dx, block_size, window, config):
    meta = _meta(x, block_size, window, config)
    meta["CPAD"] = triton.next_power_of_2(x.shape[1])  # no dot here
    n_tiles_h, n_tiles_w, n_tiles = _tiles(x, meta)
    args = (gx, dx, *dx.stride(), x.shape[2], x.shape[3], n_tiles_h, n_tiles_w)
    return (n_tiles,), args, meta


def _outputs(x, heads, C_out):
    B, _, H, W = x.shape
    return (x.new_empty((B, H, W, heads, C_out // heads)),
            x.new_empty((B, heads, H, W), dtype=torch.float32))


def _fwd(x, qk, w_eff, heads, block_size, window, padding, y=None, lse=None, config=None):
    """Launch the forward. Returns y (B, H, W, heads, D) in x's dtype and lse (B, heads, H, W) fp32.
    `y`/`lse` may be passed in (the tests poison them to prove every element is written)."""
    _check_tables(qk, w_eff)
    if y is None or lse is None:
        y, lse = _outputs(x, heads, w_eff.shape[2])
    if y.numel() == 0:
        return y, lse
    grid, args, meta = _fwd_launch(x, qk, w_eff, y, lse, heads, block_size, window, padding,
                                   config or default_config("fwd", block_size))
    launch(_stem_fwd_kernel, grid, args, meta)
    return y, lse


def _bwd(x, qk, w_eff, lse, dy, heads, block_size, window, padding, dx=None, config=None, config_dx=None):
    """Launch the backward. Returns dx (x's dtype and strides), dqk (heads, C_in, C_in) and
    dw_eff (bs, bs, C_out, C_in), both fp32. `dx` may be passed in (the tests poison it)."""
    _check_tables(qk, w_eff)
    if dx is None:
        dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx.zero_(), torch.zeros_like(qk), torch.zeros_like(w_eff)
    B, C_in, H, W = x.shape
    C_out = w_eff.shape[2]
    D = C_out // heads
    T = block_size * block_size
    config = config or default_config("bwd", block_size)
    gx = torch.empty((B, H, W, T, C_in), device=x.device, dtype=torch.float32)
    dqk_part, dw_part = _partial_buffers(x, heads, D, block_size, config)
    grid, args, meta = _bwd_launch(x, qk, w_eff, lse, dy, gx, dqk_part, dw_part, heads, block_size, window,
                                   padding, config)
    launch(_stem_bwd_kernel, grid, args, meta)
    grid, args, meta = _dx_launch(x, gx, dx, block_size, window, config_dx or default_config("dx", block_size))
    launch(_stem_dx_kernel, grid, args, meta)
    # Deterministic sums of the per-program partials, back to the tables' shapes.
    cpad, tpad = dqk_part.shape[-1], triton.next_power_of_2(T)
    dqk = dqk_part.sum(0)[:, :C_in, :C_in]
    dw = dw_part.sum(0)[:, :D].unflatten(-1, (tpad, cpad))[:, :, :T, :C_in]   # (heads, D, T, C_in)
    dw_eff = dw.permute(2, 0, 1, 3).reshape(block_size, block_size, C_out, C_in)
    return dx, dqk.contiguous(), dw_eff


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.compile sees them whole) and their autograd
# ----------------------------------------------------------------------------------------------

@define_op("sasa_triton::attention_stem2d_fwd")
def _attention_stem2d_fwd(x: torch.Tensor, qk: torch.Tensor, w_eff: torch.Tensor, heads: int, block_size: int,
                          window: str, padding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, qk, w_eff, heads, block_size, window, padding)


@_attention_stem2d_fwd.register_fake
def _(x, qk, w_eff, heads, block_size, window, padding):
    return _outputs(x, heads, w_eff.shape[2])


@define_op("sasa_triton::attention_stem2d_bwd")
def _attention_stem2d_bwd(x: torch.Tensor, qk: torch.Tensor, w_eff: torch.Tensor, lse: torch.Tensor,
                          dy: torch.Tensor, heads: int, block_size: int, window: str, padding: str
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(x, qk, w_eff, lse, dy, heads, block_size, window, padding)


@_attention_stem2d_bwd.register_fake
def _(x, qk, w_eff, lse, dy, heads, block_size, window, padding):
    return torch.empty_like(x), torch.empty_like(qk), torch.empty_like(w_eff)


def _setup_context(ctx, inputs, output):
    x, qk, w_eff, heads, block_size, window, padding = inputs
    ctx.save_for_backward(x, qk, w_eff, output[1])  # x, the two tables and lse: y is not needed
    ctx.args = (heads, block_size, window, padding)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dlse):
    x, qk, w_eff, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True (eager; torch.compile refuses a double backward)
        from ..reference.attention_stem import attention_stem2d_from_tables
        grads = differentiable_backward(lambda *args: attention_stem2d_from_tables(*args, *ctx.args), (x, qk, w_eff),
                                        dy)
        return (*grads, None, None, None, None)
    dx, dqk, dw_eff = _attention_stem2d_bwd(x, qk, w_eff, lse, dy, *ctx.args)  # any strides
    return dx, dqk, dw_eff, None, None, None, None


_attention_stem2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def stem_tables(w_q, w_k, w_v, mix, heads, scale=1.0):
    """QK (heads, C_in, C_in) = scale * W_K^hT W_Q^h and W_eff (bs, bs, C_out, C_in) =
    sum_m mix[a, b, m] W_V^m, in fp32 (float64 stays float64), differentiable."""
    dtype = torch.float64 if torch.float64 in (w_q.dtype, w_k.dtype, w_v.dtype, mix.dtype) else torch.float32
    C_out, C_in = w_q.shape
    # Outside autocast: there einsum would round the tables to bf16/fp16, and the kernels take them
    # in fp32 (a bf16 W_eff met the fp32 attention weights in one tl.dot: a compile error on an H200).
    with torch.autocast(w_q.device.type, enabled=False):
        w_q, w_k = (w.to(dtype).reshape(heads, C_out // heads, C_in) for w in (w_q, w_k))
        qk = torch.einsum("hdc,hde->hce", w_k, w_q) * scale
        w_eff = torch.einsum("abm,moc->aboc", mix.to(dtype), w_v.to(dtype))
    return qk, w_eff


def _check_tables(qk, w_eff):
    if qk.dtype != torch.float32 or w_eff.dtype != torch.float32:
        raise TypeError(f"qk and w_eff must be float32 (stem_tables makes them so), got {qk.dtype} and {w_eff.dtype}")


def attention_stem2d(x, w_q, w_k, w_v, mix, heads, block_size=4, scale=1.0, window="block", padding="zeros",
                     backend="auto"):
    """The spatially-aware attention of the stem (SPEC section 2) straight from the image, fused in
    Triton: the 1x1 projections, the value mixture and the attention in one pass.

    For pixel (i, j), head h and the block_size x block_size keys (a, b) of its block or window:

        q = W_Q x_ij, k = W_K x_ab, v_ab = sum_m mix[a, b, m] W_V^m x_ab (per head: D rows each)
        y_ij = sum_ab softmax_ab(scale * q . k) v_ab

    Args:
        x: (B, C_in, H, W) image, C_in <= 8, any strides (contiguous or channels_last). float16,
            bfloat16 or float32 on the Triton path; float64 too on the reference path.
        w_q, w_k: (C_out, C_in) query and key projections (the 1x1 conv weights, bias-free).
        w_v: (M, C_out, C_in), the M value projections W_V^m.
        mix: (block_size, block_size, M), the mixture p(a, b, m) (normalised over M by the caller).
        heads: C_out = heads * D; D <= 128 on the Triton path.
        block_size, scale, window, padding, backend: as `spatial_attention2d`.

    Every input gets its gradient (the weights' and mix's in their own dtypes). A backward with
    create_graph=True runs through the PyTorch reference (differentiable). Under autocast x
    runs in the autocast dtype; the weights enter as fp32 tables QK and W_eff (`stem_tables`).

    Returns:
        y (B, H, W, heads, D) in x's dtype, contiguous: viewed as (B, H, W, C_out) and permuted to
        (B, C_out, H, W) it is a channels_last NCHW tensor.
    """
    check_attention_stem_args(x, w_q, w_k, w_v, mix, heads, block_size, scale, window, padding)
    if resolve_backend(backend, x.device) == "reference" or transforms_active():  # (forward-mode AD, torch.func)
        from ..reference import attention_stem2d as reference_op
        return reference_op(x, w_q, w_k, w_v, mix, heads, block_size, scale, window, padding)
    (x,) = autocast_inputs(x)
    check_kernel_dtype("x", x)
    if w_q.shape[0] // heads > 128:
        raise ValueError(f"the Triton kernels support a head dim D <= 128, got D={w_q.shape[0] // heads} "
                         f"(use backend='reference')")
    qk, w_eff = stem_tables(w_q, w_k, w_v, mix, heads, scale)
    if qk.dtype == torch.float64:
        raise TypeError("w_q, w_k, w_v and mix must not be float64 on the Triton path (use backend='reference')")
    out_dtype = x.dtype
    if out_dtype == torch.bfloat16 and interpreter_enabled():
        x = x.float()  # the interpreter mishandles bf16: compute in fp32, return bf16 (autograd through the casts)
    y, _ = _attention_stem2d_fwd(x, qk, w_eff, heads, block_size, window, padding)
    return y.to(out_dtype)


def static_specs(shape=(32, 3, 224, 224), dtype=torch.bfloat16, out_channels=64, heads=4, block_size=4,
                 window="block", padding="zeros", configs=None):
    """KernelSpecs of the forward, backward and dx kernels as a launch on a contiguous x of `shape`
    would compile them (meta tensors: nothing is allocated or run), for sm_90 register reports.
    configs: optional {"fwd": cfg, "bwd": cfg, "dx": cfg} overrides of default_config."""
    from .._compile import spec_from_launch

    configs = configs or {}
    B, C_in, H, W = shape
    config = {k: configs.get(k) or default_config(k, block_size) for k in ("fwd", "bwd", "dx")}
    x = torch.empty(shape, dtype=dtype, device="meta")
    qk = torch.empty((heads, C_in, C_in), device="meta")
    w_eff = torch.empty((block_size, block_size, out_channels, C_in), device="meta")
    y, lse = _outputs(x, heads, out_channels)
    gx = torch.empty((B, H, W, block_size * block_size, C_in), device="meta")
    dqk_part, dw_part = _partial_buffers(x, heads, out_channels // heads, block_size, config["bwd"], fake=True)
    common = dict(heads=heads, block_size=block_size, window=window, padding=padding)
    fwd = _fwd_launch(x, qk, w_eff, y, lse, config=config["fwd"], **common)
    bwd = _bwd_launch(x, qk, w_eff, lse, y, gx, dqk_part, dw_part, config=config["bwd"], **common)
    dx = _dx_launch(x, gx, torch.empty_like(x), block_size, window, config["dx"])
    name = f"attention_stem_{window}"
    return [spec_from_launch(f"{name}_fwd", _stem_fwd_kernel, *fwd[1:]),
            spec_from_launch(f"{name}_bwd", _stem_bwd_kernel, *bwd[1:]),
            spec_from_launch(f"{name}_dx", _stem_dx_kernel, *dx[1:])]
