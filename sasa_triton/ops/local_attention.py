"""Fused SASA local attention (SPEC section 1): Triton forward and backward kernels.

Algorithm: a program owns a BLOCK_H x BLOCK_W tile of query pixels of one (batch, head) (2 x 8, or
4 x 4 or 8 x 2 where its strip is narrower, on one warp by default: 16 queries, one row block)
and the haloed key strip those queries see: BLOCK_H + 2r rows of HALO_W = pow2(BLOCK_W + 2r)
columns, taken STEP_ROWS rows at a time (all of them in one step at k = 7). Per step, one tl.dot
gives every (query, key) logit of the step; the relative logits and every mask enter as two
additive bias tiles built once per tile (columns) or per step (rows) by gathering q.rel_rows and
q.rel_cols (2k dot products per query):
logit = (q.k) * scale + row_bias[query, key row] + col_bias[query, key column], where a bias is
-inf outside the window (and outside the image for padding="mask"). So each computed logit costs
about six instructions (scale and two adds, max, exp2, sum), and the online fp32 softmax rescales
once per step, not once per key row. It stores y and one log-sum-exp per (pixel, head).
Trade-off: at k = 7 a query computes 8 x 16 = 128 logits for its 49 useful ones (the strip is
shared by the tile), all on tensor cores; taller tiles waste fewer rows but need more registers.

Backward (flash-attention style, no atomics, deterministic): a query-stationary kernel recomputes
the probabilities from the log-sum-exp (folded into the row bias) and gives dq, delta =
rowsum(dy * y) and per-program partial gradients of the relative tables (summed by torch); a
key-stationary kernel walks the haloed query strip of a key tile with the same biases transposed
and gives dk and dv. There a step's row bias, where the row half of a head is small (Dr *
BLOCK_H <= 16), is a few FMAs per (key row, query) against the step's slice of rel_rows (each
query meets only BLOCK_H taps of it) instead of a dot against all k taps and a gather.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tuning
from .._library import KernelLaunch, attention_outputs, autocast_inputs, define_op, differentiable_backward
from .._utils import (KERNEL_DTYPES, check_kernel_dtype, check_local_attention_args, dot_precision,
                      interpreter_enabled, resolve_backend, transforms_active)

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Shared device functions
# ----------------------------------------------------------------------------------------------

@triton.jit
def _program_tile(H, W, heads, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's (batch, head) and BLOCK_H x BLOCK_W pixel tile, from a (B * heads, row tiles,
    column tiles) grid (no integer division but one), and its index in launch order."""
    batch_head = tl.program_id(0)
    tile_row = tl.program_id(1)
    tile_col = tl.program_id(2)
    pid = (batch_head * tl.num_programs(1) + tile_row) * tl.num_programs(2) + tile_col
    batch = batch_head // heads
    head = batch_head - batch * heads
    row0 = tile_row * BLOCK_H
    col0 = tile_col * BLOCK_W
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    tile_rows = offs // BLOCK_W  # the pixel's row and column inside the tile
    tile_cols = offs % BLOCK_W
    inside = (row0 + tile_rows < H) & (col0 + tile_cols < W)
    return pid, batch_head, batch.to(tl.int64), head, row0, col0, tile_rows, tile_cols, inside


@triton.jit
def _pixel_ptrs(BASE, batch, head, row0, col0, tile_rows, tile_cols, stride_b, stride_h, stride_w,
                D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pointers to the (pixels, channels) block of a (B, H, W, heads, D) tensor whose heads and
    channels are packed (strides D and 1: the compiler then knows how rows align and vectorises
    the loads). The tile's origin is an int64 scalar (a batch of large images passes 2**31
    elements); the offsets inside the tile are int32."""
    origin = BASE + (batch * stride_b + row0.to(tl.int64) * stride_h + col0 * stride_w + head * D)
    return origin + (tile_rows[:, None] * stride_h + tile_cols[:, None] * stride_w + tl.arange(0, BLOCK_D)[None, :])


@triton.jit
def _strip_offsets(halo_col, step_row, stride_h, stride_w, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """int32 offsets of a step's haloed strip from its first row's origin. Channels past D repeat
    channels 0..D-1 instead of being masked, so the loads stay vectorised; the other operand of
    every product with them (q, k, v, dy or a table) is zero there, and only [:, :D] is stored."""
    return (step_row[:, None] * stride_h + halo_col[:, None] * stride_w
            + (tl.arange(0, BLOCK_D) % D)[None, :])


@triton.jit
def _rel_logits(x, REL_ROWS, REL_COLS, head, D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr,
                REL_PER_HEAD: tl.constexpr, DOT_PRECISION: tl.constexpr, KPAD: tl.constexpr,
                BLOCK_D: tl.constexpr, CH0: tl.constexpr, ROWS: tl.constexpr = True):
    """The relative tables as (KPAD, BLOCK_D) fp32 tiles laid over the channels of a head that
    starts at channel CH0 of x (rel_rows in [CH0, CH0 + Dr), rel_cols in [CH0 + Dr, CH0 + D),
    zeros elsewhere) and x's logits against them: x.rel_rows[t] and x.rel_cols[t] as (pixels, KPAD)
    (without ROWS, the column half only: rel_rows and its logits are zeros)."""
    D_COLS: tl.constexpr = D - D_ROWS
    offs_t = tl.arange(0, KPAD)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t[:, None] < KSIZE
    rows_ptrs = (REL_ROWS + head * (KSIZE * D_ROWS * REL_PER_HEAD) + offs_t[:, None] * D_ROWS
                 + (offs_d[None, :] - CH0))
    cols_ptrs = (REL_COLS + head * (KSIZE * D_COLS * REL_PER_HEAD) + offs_t[:, None] * D_COLS
                 + (offs_d[None, :] - (CH0 + D_ROWS)))
    rows_ok = t_ok & (offs_d[None, :] < CH0 + D_ROWS)
    if CH0 > 0:
        rows_ok = rows_ok & (offs_d[None, :] >= CH0)
    rel_rows = tl.zeros((KPAD, BLOCK_D), dtype=tl.float32)
    if ROWS:
        rel_rows = tl.load(rows_ptrs, mask=rows_ok, other=0.0).to(tl.float32)
    rel_cols = tl.load(cols_ptrs, mask=t_ok & (offs_d[None, :] >= CH0 + D_ROWS) & (offs_d[None, :] < CH0 + D),
                       other=0.0).to(tl.float32)
    x32 = x.to(tl.float32)
    row_logits = tl.zeros((x.shape[0], KPAD), dtype=tl.float32)
    if ROWS:
        row_logits = tl.dot(x32, tl.trans(rel_rows), input_precision=DOT_PRECISION)
    col_logits = tl.dot(x32, tl.trans(rel_cols), input_precision=DOT_PRECISION)
    return rel_rows, rel_cols, row_logits, col_logits


@triton.jit
def _take(table, index, WIDTH: tl.constexpr, SELECT_GATHER: tl.constexpr):
    """out[p, j] = table[p, index[p, j]] for index in [0, WIDTH). tl.gather, or with SELECT_GATHER
    a static where-chain over the WIDTH columns: Triton 3.3-3.6 abort compiling tl.gather on a
    layout spread over several warps (TritonGPUOptimizeThreadLocality, seen at num_warps 2-4)."""
    if SELECT_GATHER:
        offs = tl.arange(0, table.shape[1])
        out = tl.zeros(index.shape, dtype=tl.float32)
        for t in tl.static_range(WIDTH):
            column = tl.sum(tl.where(offs[None, :] == t, table, 0.0), axis=1)
            out = tl.where(index == t, column[:, None], out)
        return out
    return tl.gather(table, index, axis=1)


@triton.jit
def _window_bias(table, offset, allowed, HAS_REL: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
                 SELECT_GATHER: tl.constexpr):
    """bias[p, j] = table[p, offset[p, j] / DILATION] where the offset (key position - query
    position + radius, along one axis) is a window tap and `allowed`, else -inf."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    ok = allowed & (offset >= 0) & (offset <= 2 * RADIUS)
    if DILATION > 1:
        ok = ok & (offset % DILATION == 0)
    if HAS_REL:
        index = tl.where(ok, offset // DILATION, 0)
        return tl.where(ok, _take(table, index, KSIZE, SELECT_GATHER), float("-inf"))
    return tl.where(ok, 0.0, float("-inf"))


@triton.jit
def _window_taps(values, first, position, STEP: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
                 KPAD: tl.constexpr, SELECT_GATHER: tl.constexpr):
    """out[p, t] = values[p, t * DILATION + position[p] - first] (0 where that is outside [0, STEP)
    or t >= KSIZE): the per-tap sums of one step's dlogits, the mirror of _window_bias."""
    offs_t = tl.arange(0, KPAD)
    index = offs_t[None, :] * DILATION + position[:, None] - first
    ok = (offs_t[None, :] < KSIZE) & (index >= 0) & (index < STEP)
    return tl.where(ok, _take(values, tl.where(ok, index, 0), STEP, SELECT_GATHER), 0.0)


@triton.jit
def _query_tile_setup(q, REL_ROWS, REL_COLS, head, col0, q_step_col, W, qk_scale,
                      D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
                      HAS_REL: tl.constexpr, REL_PER_HEAD: tl.constexpr, MASK_PADDING: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, HALO_W: tl.constexpr, KPAD: tl.constexpr,
                      BLOCK_D: tl.constexpr, SELECT_GATHER: tl.constexpr, CH0: tl.constexpr):
    """What a query tile needs for every step (fwd and dq): the tables, the scaled row logits
    (each step gathers its row bias from them) and the column bias (BLOCK_Q, HALO_W), the same for
    every key row. q holds the head's channels from CH0 on (zeros in the other channels)."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    rel_rows = tl.zeros((KPAD, BLOCK_D), dtype=tl.float32)
    rel_cols = tl.zeros((KPAD, BLOCK_D), dtype=tl.float32)
    row_logits = tl.zeros((q.shape[0], KPAD), dtype=tl.float32)
    col_logits = tl.zeros((q.shape[0], KPAD), dtype=tl.float32)
    if HAS_REL:
        rel_rows, rel_cols, row_logits, col_logits = _rel_logits(q, REL_ROWS, REL_COLS, head, D, D_ROWS, KSIZE,
                                                                 REL_PER_HEAD, DOT_PRECISION, KPAD, BLOCK_D, CH0)
    halo_col = tl.arange(0, HALO_W)
    key_col = col0 - RADIUS + halo_col
    col_allowed = ((key_col >= 0) & (key_col < W))[None, :] if MASK_PADDING else (halo_col < HALO_W)[None, :]
    col_bias = _window_bias(col_logits * qk_scale, halo_col[None, :] - q_step_col[:, None], col_allowed,
                            HAS_REL, KSIZE, DILATION, SELECT_GATHER)
    return rel_rows, rel_cols, row_logits * qk_scale, col_bias


@triton.jit
def _key_strip(batch, head, row0, col0, W, stride_b, stride_h, stride_w, D: tl.constexpr, KSIZE: tl.constexpr,
               DILATION: tl.constexpr, HALO_W: tl.constexpr, STEP_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A query tile's key strip, one step's worth (strip position n = row in step * HALO_W +
    column): each position's row in the step, whether its column is in the image, the int64
    origin of the strip's first row and the int32 offsets from it."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    offs_n = tl.arange(0, STEP_ROWS * HALO_W)
    n_halo_col = offs_n % HALO_W
    n_step_row = offs_n // HALO_W
    n_col_in = (col0 - RADIUS + n_halo_col >= 0) & (col0 - RADIUS + n_halo_col < W)
    origin = batch * stride_b + (row0 - RADIUS).to(tl.int64) * stride_h + (col0 - RADIUS) * stride_w + head * D
    return n_step_row, n_col_in, origin, _strip_offsets(n_halo_col, n_step_row, stride_h, stride_w, D, BLOCK_D)


@triton.jit
def _step_strips(K, V, strip_origin, strip_offsets, first, stride_h, n_col_in, n_step_row, row0, H,
                 KSIZE: tl.constexpr, DILATION: tl.constexpr, HALO_ROWS: tl.constexpr):
    """One step's K and V strips (fwd and dq), zeros outside the image and past the halo."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    key_row = row0 - RADIUS + first + n_step_row
    kv_mask = (n_col_in & (key_row >= 0) & (key_row < H) & (first + n_step_row < HALO_ROWS))[:, None]
    kt = tl.load(K + (strip_origin + first * stride_h) + strip_offsets, mask=kv_mask, other=0.0)
    vt = tl.load(V + (strip_origin + first * stride_h) + strip_offsets, mask=kv_mask, other=0.0)
    return kt, vt


@triton.jit
def _step_scores(q, kt, first, row0, q_step_row, query_ok, row_shift, row_logits, col_bias, H, qk_scale,
                 KSIZE: tl.constexpr, DILATION: tl.constexpr, HAS_REL: tl.constexpr, MASK_PADDING: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, HALO_ROWS: tl.constexpr, HALO_W: tl.constexpr,
                 STEP_ROWS: tl.constexpr, SELECT_GATHER: tl.constexpr, SHIFTED: tl.constexpr):
    """One step's scaled logits (BLOCK_Q, STEP_ROWS, HALO_W) of a query tile against its key
    strip kt, in log2 units, -inf outside each query's window. SHIFTED (dq): minus row_shift (the
    log-sum-exp), and -inf for queries not query_ok."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    # Row bias of this step: (BLOCK_Q, STEP_ROWS).
    halo_row = first + tl.arange(0, STEP_ROWS)
    row_allowed = (halo_row < HALO_ROWS)[None, :]
    if SHIFTED:
        row_allowed = row_allowed & query_ok[:, None]
    if MASK_PADDING:
        strip_row = row0 - RADIUS + halo_row
        row_allowed = row_allowed & ((strip_row >= 0) & (strip_row < H))[None, :]
    row_bias = _window_bias(row_logits, halo_row[None, :] - q_step_row[:, None], row_allowed, HAS_REL,
                            KSIZE, DILATION, SELECT_GATHER)
    if SHIFTED:
        row_bias = row_bias - row_shift[:, None]
    logits = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)  # (BLOCK_Q, STEP_ROWS * HALO_W)
    return (tl.reshape(logits, (q.shape[0], STEP_ROWS, HALO_W)) * qk_scale
            + row_bias[:, :, None] + col_bias[:, None, :])


@triton.jit
def _step_logits(q, K, V, strip_origin, strip_offsets, first, stride_h, n_col_in, n_step_row, row0, q_step_row,
                 query_ok, row_shift, row_logits, col_bias, H, qk_scale,
                 KSIZE: tl.constexpr, DILATION: tl.constexpr, HAS_REL: tl.constexpr, MASK_PADDING: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, HALO_ROWS: tl.constexpr, HALO_W: tl.constexpr,
                 STEP_ROWS: tl.constexpr, SELECT_GATHER: tl.constexpr, SHIFTED: tl.constexpr):
    """One step of a query tile (fwd and dq): its K and V strips and its scaled logits."""
    kt, vt = _step_strips(K, V, strip_origin, strip_offsets, first, stride_h, n_col_in, n_step_row, row0, H,
                          KSIZE, DILATION, HALO_ROWS)
    logits = _step_scores(q, kt, first, row0, q_step_row, query_ok, row_shift, row_logits, col_bias, H, qk_scale,
                          KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION, HALO_ROWS, HALO_W, STEP_ROWS,
                          SELECT_GATHER, SHIFTED)
    return kt, vt, logits


@triton.jit
def _softmax_step(logits, vt, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, ONE_STEP: tl.constexpr):
    """The forward's online softmax over one step: the running max, sum and p.v accumulator.
    ONE_STEP: the only step (the whole strip at once), which has nothing to rescale."""
    # (BLOCK_Q, keys) again, the dot's own layout: each reduction sums a thread's values before
    # the lanes', where over the step's rows and then its columns every row took its own shuffles.
    logits = tl.reshape(logits, (logits.shape[0], logits.shape[1] * logits.shape[2]))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a query with no key yet stays at zero
    if ONE_STEP:
        p = tl.exp2(logits - m_safe[:, None])
        return m_new, tl.sum(p, axis=1), tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(logits - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _local_attn_fwd_kernel(
    Q, K, V, REL_ROWS, REL_COLS, Y, LSE,
    stride_b, stride_h, stride_w,
    H, W, heads, qk_scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, REL_PER_HEAD: tl.constexpr, MASK_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_W: tl.constexpr,
    STEP_ROWS: tl.constexpr, KPAD: tl.constexpr, BLOCK_D: tl.constexpr, SELECT_GATHER: tl.constexpr,
    HEADS_PER_PROGRAM: tl.constexpr,
):
    # HEADS_PER_PROGRAM 2 (D <= BLOCK_D / 2, an even number of heads): a program takes two
    # neighbouring heads, whose packed channels it loads together (at D = 8, 16 channels where a
    # single head loads 8 and repeats them), so one K/V strip load and one conversion to the
    # tensor-core layout serve both heads; each head's logits come from its own channels (the
    # other head's zeroed in its copy of q), and of each head's p.v only its own channels are kept.
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    HALO_ROWS: tl.constexpr = BLOCK_H + 2 * RADIUS
    BLOCK_Q: tl.constexpr = BLOCK_H * BLOCK_W
    HPP: tl.constexpr = HEADS_PER_PROGRAM
    D_LOAD: tl.constexpr = HPP * D  # the channels a program loads: its heads', packed
    if HPP == 1:
        groups = heads
    else:
        groups = heads // HPP
    pid, batch_head, batch, group, row0, col0, q_step_row, q_step_col, q_in = _program_tile(
        H, W, groups, BLOCK_H, BLOCK_W)
    head0 = group * HPP
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = q_in[:, None] & (offs_d[None, :] < D_LOAD)
    q = tl.load(_pixel_ptrs(Q, batch, group, row0, col0, q_step_row, q_step_col, stride_b, stride_h, stride_w,
                            D_LOAD, BLOCK_D), mask=q_mask, other=0.0)
    q0 = q
    if HPP == 2:
        q0 = tl.where(offs_d[None, :] < D, q, tl.zeros_like(q))
    _, _, row_logits0, col_bias0 = _query_tile_setup(
        q0, REL_ROWS, REL_COLS, head0, col0, q_step_col, W, qk_scale, D, D_ROWS, KSIZE, DILATION, HAS_REL,
        REL_PER_HEAD, MASK_PADDING, DOT_PRECISION, HALO_W, KPAD, BLOCK_D, SELECT_GATHER, 0)
    q1, row_logits1, col_bias1 = q0, row_logits0, col_bias0
    if HPP == 2:
        q1 = tl.where(offs_d[None, :] >= D, q, tl.zeros_like(q))
        _, _, row_logits1, col_bias1 = _query_tile_setup(
            q1, REL_ROWS, REL_COLS, head0 + 1, col0, q_step_col, W, qk_scale, D, D_ROWS, KSIZE, DILATION, HAS_REL,
            REL_PER_HEAD, MASK_PADDING, DOT_PRECISION, HALO_W, KPAD, BLOCK_D, SELECT_GATHER, D)

    n_step_row, n_col_in, strip_origin, strip_offsets = _key_strip(
        batch, group, row0, col0, W, stride_b, stride_h, stride_w, D_LOAD, KSIZE, DILATION, HALO_W, STEP_ROWS,
        BLOCK_D)

    m0 = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l0 = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc0 = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    m1, l1, acc1 = m0, l0, acc0
    for first in range(0, HALO_ROWS, STEP_ROWS):
        kt, vt = _step_strips(K, V, strip_origin, strip_offsets, first, stride_h, n_col_in, n_step_row, row0, H,
                              KSIZE, DILATION, HALO_ROWS)
        logits = _step_scores(q0, kt, first, row0, q_step_row, q_in, q_in, row_logits0, col_bias0, H, qk_scale,
                              KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION, HALO_ROWS, HALO_W, STEP_ROWS,
                              SELECT_GATHER, SHIFTED=False)
        m0, l0, acc0 = _softmax_step(logits, vt, m0, l0, acc0, DOT_PRECISION, STEP_ROWS >= HALO_ROWS)
        if HPP == 2:
            logits = _step_scores(q1, kt, first, row0, q_step_row, q_in, q_in, row_logits1, col_bias1, H,
                                  qk_scale, KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION, HALO_ROWS,
                                  HALO_W, STEP_ROWS, SELECT_GATHER, SHIFTED=False)
            m1, l1, acc1 = _softmax_step(logits, vt, m1, l1, acc1, DOT_PRECISION, STEP_ROWS >= HALO_ROWS)

    l_safe = tl.where(l0 == 0.0, 1.0, l0)
    y = acc0 * (1.0 / l_safe)[:, None]
    if HPP == 2:
        l_safe1 = tl.where(l1 == 0.0, 1.0, l1)
        y = tl.where(offs_d[None, :] < D, y, acc1 * (1.0 / l_safe1)[:, None])
    # y and lse are ours, contiguous: (B, H, W, heads, D) and (B, heads, H, W).
    tl.store(_pixel_ptrs(Y, batch, group, row0, col0, q_step_row, q_step_col, H * W * heads * D, W * heads * D,
                         heads * D, D_LOAD, BLOCK_D), y.to(Y.dtype.element_ty), mask=q_mask)
    lse = (m0 + tl.log2(l_safe)) * 0.6931471805599453  # natural log; m is in log2 units
    if HPP == 1:
        tl.store(LSE + batch_head.to(tl.int64) * H * W + ((row0 + q_step_row) * W + col0 + q_step_col), lse,
                 mask=q_in)
    else:
        stat_ptrs = LSE + (batch * heads + head0) * H * W + ((row0 + q_step_row) * W + col0 + q_step_col)
        tl.store(stat_ptrs, lse, mask=q_in)
        tl.store(stat_ptrs + H * W, (m1 + tl.log2(l_safe1)) * 0.6931471805599453, mask=q_in)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _local_attn_bwd_dq_kernel(
    Q, K, V, REL_ROWS, REL_COLS, Y, DY, LSE, DELTA, DQ, DREL,
    stride_b, stride_h, stride_w,
    stride_dyb, stride_dyh, stride_dyw,
    H, W, heads, scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, REL_PER_HEAD: tl.constexpr, MASK_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_W: tl.constexpr,
    STEP_ROWS: tl.constexpr, KPAD: tl.constexpr, BLOCK_D: tl.constexpr, SELECT_GATHER: tl.constexpr,
    GRAD_PACK: tl.constexpr,
):
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    HALO_ROWS: tl.constexpr = BLOCK_H + 2 * RADIUS
    BLOCK_Q: tl.constexpr = BLOCK_H * BLOCK_W
    BLOCK_N: tl.constexpr = STEP_ROWS * HALO_W
    pid, batch_head, batch, head, row0, col0, q_step_row, q_step_col, q_in = _program_tile(
        H, W, heads, BLOCK_H, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    q_mask = q_in[:, None] & d_ok
    out_b, out_h, out_w = H * W * heads * D, W * heads * D, heads * D  # y: ours, contiguous
    q = tl.load(_pixel_ptrs(Q, batch, head, row0, col0, q_step_row, q_step_col, stride_b, stride_h, stride_w,
                            D, BLOCK_D), mask=q_mask, other=0.0)
    dy = tl.load(_pixel_ptrs(DY, batch, head, row0, col0, q_step_row, q_step_col, stride_dyb, stride_dyh,
                             stride_dyw, D, BLOCK_D), mask=q_mask, other=0.0)
    y = tl.load(_pixel_ptrs(Y, batch, head, row0, col0, q_step_row, q_step_col, out_b, out_h, out_w, D, BLOCK_D),
                mask=q_mask, other=0.0)
    delta = tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=1)
    stat_origin = batch_head.to(tl.int64) * H * W
    stat_offsets = (row0 + q_step_row) * W + col0 + q_step_col
    tl.store(DELTA + stat_origin + stat_offsets, delta, mask=q_in)
    lse2 = tl.load(LSE + stat_origin + stat_offsets, mask=q_in, other=0.0) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634

    rel_rows, rel_cols, row_logits, col_bias = _query_tile_setup(
        q, REL_ROWS, REL_COLS, head, col0, q_step_col, W, qk_scale, D, D_ROWS, KSIZE, DILATION, HAS_REL,
        REL_PER_HEAD, MASK_PADDING, DOT_PRECISION, HALO_W, KPAD, BLOCK_D, SELECT_GATHER, 0)

    n_step_row, n_col_in, strip_origin, strip_offsets = _key_strip(
        batch, head, row0, col0, W, stride_b, stride_h, stride_w, D, KSIZE, DILATION, HALO_W, STEP_ROWS, BLOCK_D)

    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    row_coef = tl.zeros((BLOCK_Q, KPAD), dtype=tl.float32)  # dlogit summed per window row
    col_dlogits = tl.zeros((BLOCK_Q, HALO_W), dtype=tl.float32)  # dlogit summed over key rows
    for first in range(0, HALO_ROWS, STEP_ROWS):
        # The log-sum-exp enters with the row bias: p = exp2(logit - lse) in one add. Queries
        # outside the image get p = 0 (they add nothing to the table gradients).
        kt, vt, logits = _step_logits(
            q, K, V, strip_origin, strip_offsets, first, stride_h, n_col_in, n_step_row, row0, q_step_row, q_in,
            lse2, row_logits, col_bias, H, qk_scale, KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION,
            HALO_ROWS, HALO_W, STEP_ROWS, SELECT_GATHER, SHIFTED=True)
        p = tl.reshape(tl.exp2(logits), (BLOCK_Q, BLOCK_N))
        dp = tl.dot(dy, tl.trans(vt), input_precision=DOT_PRECISION)
        dlogits = p * (dp - delta[:, None])  # gradient of the scaled logit
        dq += tl.dot(dlogits.to(kt.dtype), kt, input_precision=DOT_PRECISION)
        if HAS_REL:
            dlogits = tl.reshape(dlogits, (BLOCK_Q, STEP_ROWS, HALO_W))
            row_coef += _window_taps(tl.sum(dlogits, axis=2), first, q_step_row, STEP_ROWS, KSIZE, DILATION, KPAD,
                                     SELECT_GATHER)
            col_dlogits += tl.sum(dlogits, axis=1)

    if HAS_REL:
        col_coef = _window_taps(col_dlogits, 0, q_step_col, HALO_W, KSIZE, DILATION, KPAD, SELECT_GATHER)
        dq += tl.dot(row_coef, rel_rows, input_precision=DOT_PRECISION)
        dq += tl.dot(col_coef, rel_cols, input_precision=DOT_PRECISION)
        # This tile's partial table gradients, drel_rows[t] = sum_q row_coef[q, t] q[q, :Dr] (the
        # column half likewise); torch sums the tiles, so no atomics are needed. Stored as the
        # (k, Dr) rel_rows gradient, then the (k, D - Dr) rel_cols one, each row-major: the sum
        # then holds both contiguous, as autograd keeps a parameter's .grad without a copy.
        D_COLS: tl.constexpr = D - D_ROWS
        q32 = q.to(tl.float32)
        drel_rows = tl.dot(tl.trans(row_coef), q32, input_precision=DOT_PRECISION)
        drel_cols = tl.dot(tl.trans(col_coef), q32, input_precision=DOT_PRECISION)
        in_rows = offs_d[None, :] < D_ROWS
        drel = tl.where(in_rows, drel_rows, drel_cols) * scale
        offs_t = tl.arange(0, KPAD)[:, None]
        drel_offsets = tl.where(in_rows, offs_t * D_ROWS + offs_d[None, :],
                                KSIZE * D_ROWS + offs_t * D_COLS + (offs_d[None, :] - D_ROWS))
        tl.store(DREL + pid.to(tl.int64) * KSIZE * D + drel_offsets, drel, mask=(offs_t < KSIZE) & d_ok)

    dq = dq * scale
    # dq: ours, contiguous, or with GRAD_PACK 3 the q part of a contiguous (B, H, W, 3, heads, D) dqkv
    tl.store(_pixel_ptrs(DQ, batch, head, row0, col0, q_step_row, q_step_col, out_b * GRAD_PACK, out_h * GRAD_PACK,
                         out_w * GRAD_PACK, D, BLOCK_D),
             dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _local_attn_bwd_dkdv_kernel(
    Q, K, V, REL_ROWS, REL_COLS, DY, LSE, DELTA, DK, DV,
    stride_b, stride_h, stride_w,
    stride_dyb, stride_dyh, stride_dyw,
    H, W, heads, scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, REL_PER_HEAD: tl.constexpr, MASK_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, HALO_W: tl.constexpr,
    STEP_ROWS: tl.constexpr, KPAD: tl.constexpr, BLOCK_D: tl.constexpr, SELECT_GATHER: tl.constexpr,
    ROW_BIAS_FMA: tl.constexpr, DR_PAD: tl.constexpr, GRAD_PACK: tl.constexpr,
):
    # Key-stationary: a BLOCK_H x BLOCK_W tile of keys walks the haloed strip of queries that can
    # see it, STEP_ROWS query rows at a time. Keys outside the image are never stored, so the
    # "mask" padding needs no key mask here; queries outside the image get a -inf bias.
    # ROW_BIAS_FMA (with tables, where D_ROWS * BLOCK_H is small: ROW_BIAS_FMA_MAX): the row bias
    # of a step is rel_rows[tap] . q[:Dr] by FMAs, each query against the BLOCK_H taps of its own
    # strip row (a (Dr, BLOCK_H, STEP_ROWS) slice of the table), instead of a dot against all k
    # taps and a gather of BLOCK_H of them; the column bias keeps its dot and gather (a query's
    # column taps depend on its column, so the same trick would hold a table per strip column).
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    HALO_ROWS: tl.constexpr = BLOCK_H + 2 * RADIUS
    BLOCK_K: tl.constexpr = BLOCK_H * BLOCK_W
    BLOCK_N: tl.constexpr = STEP_ROWS * HALO_W
    pid, batch_head, batch, head, row0, col0, k_step_row, k_step_col, k_in = _program_tile(
        H, W, heads, BLOCK_H, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    k_mask = k_in[:, None] & d_ok
    kt = tl.load(_pixel_ptrs(K, batch, head, row0, col0, k_step_row, k_step_col, stride_b, stride_h, stride_w,
                             D, BLOCK_D), mask=k_mask, other=0.0)
    vt = tl.load(_pixel_ptrs(V, batch, head, row0, col0, k_step_row, k_step_col, stride_b, stride_h, stride_w,
                             D, BLOCK_D), mask=k_mask, other=0.0)
    qk_scale = scale * 1.4426950408889634

    # Strip position n = (query row in step) * HALO_W + column; the key tile's row kh and
    # column kw sit at window offset (kh - strip row + 2r, kw - strip column + 2r) of query n.
    offs_n = tl.arange(0, BLOCK_N)
    n_halo_col = offs_n % HALO_W
    n_col = col0 - RADIUS + n_halo_col
    n_step_row = offs_n // HALO_W
    n_col_in = (n_col >= 0) & (n_col < W)
    key_tile_row = tl.arange(0, BLOCK_H)
    key_tile_col = tl.arange(0, BLOCK_W)
    q_origin = batch * stride_b + (row0 - RADIUS).to(tl.int64) * stride_h + (col0 - RADIUS) * stride_w + head * D
    dy_origin = (batch * stride_dyb + (row0 - RADIUS).to(tl.int64) * stride_dyh + (col0 - RADIUS) * stride_dyw
                 + head * D)
    q_offsets = _strip_offsets(n_halo_col, n_step_row, stride_h, stride_w, D, BLOCK_D)
    dy_offsets = _strip_offsets(n_halo_col, n_step_row, stride_dyh, stride_dyw, D, BLOCK_D)
    stat_origin = batch_head.to(tl.int64) * H * W
    step_row = tl.arange(0, STEP_ROWS)
    if ROW_BIAS_FMA:
        # A step's q[:Dr] as (DR_PAD, 1, STEP_ROWS, HALO_W): the channels outermost, so that each
        # thread holds all of a query's and its sums stay in the thread. Read at clamped pixels
        # and channels (no mask: a query outside the image gets a -inf bias anyway; channels past
        # Dr meet zeros in the table).
        offs_dr = tl.arange(0, DR_PAD)
        q_head = Q + (batch * stride_b + head * D)
        strip_col = tl.minimum(tl.maximum(col0 - RADIUS + tl.arange(0, HALO_W), 0), W - 1)
        q_row_cols = tl.minimum(offs_dr, D_ROWS - 1)[:, None, None, None] + (strip_col * stride_w)[None, None, None, :]

    dk = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for first in range(0, HALO_ROWS, STEP_ROWS):
        halo_row = first + n_step_row
        query_row = row0 - RADIUS + halo_row
        query_in = n_col_in & (query_row >= 0) & (query_row < H) & (halo_row < HALO_ROWS)
        qc = tl.load(Q + (q_origin + first * stride_h) + q_offsets, mask=query_in[:, None], other=0.0)
        dyc = tl.load(DY + (dy_origin + first * stride_dyh) + dy_offsets, mask=query_in[:, None], other=0.0)
        stat_offsets = query_row * W + n_col
        lse2 = tl.load(LSE + stat_origin + stat_offsets, mask=query_in, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_origin + stat_offsets, mask=query_in, other=0.0)
        row_logits = tl.zeros((BLOCK_N, KPAD), dtype=tl.float32)
        col_logits = tl.zeros((BLOCK_N, KPAD), dtype=tl.float32)
        if HAS_REL:
            _, _, row_logits, col_logits = _rel_logits(qc, REL_ROWS, REL_COLS, head, D, D_ROWS, KSIZE,
                                                       REL_PER_HEAD, DOT_PRECISION, KPAD, BLOCK_D, 0,
                                                       ROWS=not ROW_BIAS_FMA)
        # (queries, key tile rows) and (queries, key tile columns), then transposed.
        if not ROW_BIAS_FMA:
            row_bias = _window_bias(row_logits * qk_scale, key_tile_row[None, :] - halo_row[:, None] + 2 * RADIUS,
                                    query_in[:, None], HAS_REL, KSIZE, DILATION, SELECT_GATHER) - lse2[:, None]
        col_bias = _window_bias(col_logits * qk_scale, key_tile_col[None, :] - n_halo_col[:, None] + 2 * RADIUS,
                                (n_halo_col >= 0)[:, None], HAS_REL, KSIZE, DILATION, SELECT_GATHER)
        logits = tl.dot(kt, tl.trans(qc), input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_N)
        if ROW_BIAS_FMA:
            # (key tile rows, step rows, strip columns): each query against the BLOCK_H taps
            # of its strip row, -inf outside the window; the table is zero past Dr.
            row_tap = key_tile_row[:, None] - (first + step_row)[None, :] + 2 * RADIUS  # (BLOCK_H, STEP_ROWS)
            row_ok = (row_tap >= 0) & (row_tap <= 2 * RADIUS)
            if DILATION > 1:
                row_ok = row_ok & (row_tap % DILATION == 0)
            table = tl.load(REL_ROWS + head * (KSIZE * D_ROWS * REL_PER_HEAD)
                            + tl.where(row_ok, row_tap // DILATION, 0)[None, :, :, None] * D_ROWS
                            + offs_dr[:, None, None, None],
                            mask=row_ok[None, :, :, None] & (offs_dr < D_ROWS)[:, None, None, None], other=0.0)
            strip_row = tl.minimum(tl.maximum(row0 - RADIUS + first + step_row, 0), H - 1)
            q_rows = tl.load(q_head + (strip_row.to(tl.int64) * stride_h)[None, None, :, None] + q_row_cols)
            row_bias = (tl.sum(q_rows.to(tl.float32) * table.to(tl.float32), axis=0) * qk_scale
                        + tl.where(row_ok, 0.0, float("-inf"))[:, :, None])
            row_bias = tl.reshape(row_bias, (BLOCK_H, BLOCK_N))
            row_bias = tl.where(query_in[None, :], row_bias, float("-inf")) - lse2[None, :]
            logits = (tl.reshape(logits, (BLOCK_H, BLOCK_W, BLOCK_N)) * qk_scale
                      + row_bias[:, None, :] + tl.trans(col_bias)[None, :, :])
        else:
            logits = (tl.reshape(logits, (BLOCK_H, BLOCK_W, BLOCK_N)) * qk_scale
                      + tl.trans(row_bias)[:, None, :] + tl.trans(col_bias)[None, :, :])
        p = tl.reshape(tl.exp2(logits), (BLOCK_K, BLOCK_N))
        dv += tl.dot(p.to(dyc.dtype), dyc, input_precision=DOT_PRECISION)
        dp = tl.dot(vt, tl.trans(dyc), input_precision=DOT_PRECISION)
        dlogits = p * (dp - delta[None, :])
        dk += tl.dot(dlogits.to(qc.dtype), qc, input_precision=DOT_PRECISION)

    dk = dk * scale
    # dk, dv: ours, contiguous, or with GRAD_PACK 3 the k and v parts of a contiguous (B, H, W, 3, heads, D) dqkv
    out_w = heads * D * GRAD_PACK
    out_b, out_h = H * W * out_w, W * out_w
    tl.store(_pixel_ptrs(DK, batch, head, row0, col0, k_step_row, k_step_col, out_b, out_h, out_w, D, BLOCK_D),
             dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(_pixel_ptrs(DV, batch, head, row0, col0, k_step_row, k_step_col, out_b, out_h, out_w, D, BLOCK_D),
             dv.to(DV.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# Launch configs and launchers
# ----------------------------------------------------------------------------------------------

KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")
_KERNEL_FNS = dict(zip(KERNELS, (_local_attn_fwd_kernel, _local_attn_bwd_dq_kernel, _local_attn_bwd_dkdv_kernel)))


def channel_tile(head_dim: int) -> int:
    """BLOCK_D: the channels a tile holds, D padded to a power of two of at least 16 (a
    tensor-core dot's depth)."""
    return max(16, tuning.next_power_of_2(head_dim))


def halo_width(block_w: int, kernel_size: int, dilation: int) -> int:
    """Power-of-two width of the haloed strip (keys for fwd/dq, queries for dk/dv) of a tile."""
    return tuning.next_power_of_2(block_w + 2 * dilation * (kernel_size // 2))


# Strip pixels per step (STEP_ROWS * HALO_W) of the default configs, per kernel and BLOCK_D: the
# most that ptxas (sm_90, bf16, k = 7, one warp) kept without spilling on Triton 3.6 and 3.9 (3.6
# needs the smaller backward steps at D = 32). A step's (16, pixels) fp32 logit tile costs
# pixels / 2 registers a thread, its strips pixels * BLOCK_D / 64.
STEP_PIXELS = {
    "local_fwd": {16: 128, 32: 64, 64: 32, 128: 16},
    "local_bwd_dq": {16: 64, 32: 32, 64: 16, 128: 16},
    "local_bwd_dkdv": {16: 32, 32: 16, 64: 16, 128: 16},
}
# The forward and dq take their whole haloed strip in one step where that strip (rows padded to
# a power of two) is at most this many pixels: ({BLOCK_D: pixels} for 16-bit inputs, for fp32);
# k = 3-7 undilated. sm_90 warp-instructions per (pixel, head) against the steps above (bench/
# RESULTS.md, 2026-11-30), k = 7: dq bf16 D 8 112.1 -> 102.9 on Triton 3.9, 109.8 -> 100.7 on
# 3.6, 133.9 -> 122.5 on 3.3; dq bf16 D 32 159.6 -> 131.8, 151.8 -> 128.1, 180.9 -> 157.1; the
# forward bf16 D 32 108.9 -> 97.7, 108.8 -> 97.8, 120.4 -> 110.2; fewer registers or about as
# many. Wider windows spill that way, and so would dq in fp32 at D 32.
WHOLE_STRIP_PIXELS = {
    "local_fwd": ({16: 128, 32: 128}, {16: 128, 32: 128}),
    "local_bwd_dq": ({16: 128, 32: 128}, {16: 128}),
}


def default_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype) -> dict:
    """The default launch config of a local-attention kernel (the same on the GPU and under the
    interpreter, so CI runs what the GPU runs).

    A tile of 16 query (or key) pixels is one tensor-core row block: one warp (dk/dv in 16 bits:
    32 keys, two row blocks, at D <= 16, measured faster on a card, and at D 32 for r <= 3, by the
    instruction count). Its shape, 8 or 4 (at r >= 7 also 2) pixels wide, is the one whose steps
    compute the fewest logits per query (computed_keys; ties to the wider): 4 x 4 (dk/dv's 32 keys
    8 x 4) at r = 2, 5, 6, where its strip is half as wide (at r = 5, 14 x 16 keys a query against
    12 x 32), and at r = 1 where steps of one 16-wide row leave padding (D 64, dk/dv at D 32);
    8 x 2 (16 x 2) at r = 7 (22 x 16 against 16 x 32); else 2 x 8. On sm_90 that cut the
    instructions per (pixel, head) there by up to 45 % on Triton 3.3, 3.6 and 3.9 (one kernel on
    3.9 lost 13 %: bench/RESULTS.md, 2026-11-30). A step walks STEP_ROWS haloed rows, as many as
    STEP_PIXELS allows (at k <= 7 and D <= 32 the forward and dq take their whole strip in one
    step: WHOLE_STRIP_PIXELS). Several steps pipeline their loads (num_stages 2).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    block_d = channel_tile(head_dim)
    # dk/dv at D <= 16 (16-bit): a 32-key tile (two row blocks) shares each query strip between
    # 32 keys; on an H200 (Triton 3.6, 2026-11-29, k = 7, B 32) the backward took 0.534 ms instead
    # of 0.649 at 56x56x64 and 0.222 instead of 0.234 at 28x28x128. At D 32 for k <= 7 undilated
    # too (static, sm_90, bf16, k = 7, 2026-11-30: 215.8 -> 159.4 warp-instructions per (pixel,
    # head) on Triton 3.9, 272.3 -> 203.2 on 3.6, 307.4 -> 216.7 on 3.3, no spill; wider windows
    # spill that way, and so does D 64).
    wide = kernel == "local_bwd_dkdv" and dtype != torch.float32 and (
        block_d == 16 or block_d == 32 and dilation * (kernel_size // 2) <= 3)
    pixels = 32 if wide else 16
    widths = (8, 4)
    if halo_width(4, kernel_size, dilation) >= 32:
        # 2 wide where the wider tiles' strips are 32 or more (r >= 7): at r = 7 a query computes 22 x
        # 16 logits instead of 16 x 32. Not at r = 3 (D 64), where 8 x 2 saves an eighth of them
        # but not the instructions (sm_90, Triton 3.9: dq +7 %, dk/dv -7 %).
        widths = (8, 4, 2)
    tiles = [_tile_config(kernel, kernel_size, dilation, block_d, dtype, pixels // width, width) for width in widths]
    return min(tiles, key=lambda config: computed_keys(config, kernel_size, dilation))


def computed_keys(config: dict, kernel_size: int, dilation: int) -> int:
    """Logits a query (or key, for dk/dv) of a config's tile computes: its steps times their
    STEP_ROWS x HALO_W strip pixels (the useful ones are k * k)."""
    halo_rows = config["BLOCK_H"] + 2 * dilation * (kernel_size // 2)
    step_rows = config["STEP_ROWS"]
    return -(-halo_rows // step_rows) * step_rows * halo_width(config["BLOCK_W"], kernel_size, dilation)


def _tile_config(kernel, kernel_size, dilation, block_d, dtype, block_h, block_w) -> dict:
    """The default config of a BLOCK_H x BLOCK_W tile: its step, warps and stages."""
    halo_w = halo_width(block_w, kernel_size, dilation)
    halo_rows = block_h + 2 * dilation * (kernel_size // 2)
    pixels = STEP_PIXELS[kernel][min(block_d, 128)]
    strip = tuning.next_power_of_2(halo_rows) * halo_w
    if strip <= WHOLE_STRIP_PIXELS.get(kernel, ({}, {}))[dtype == torch.float32].get(block_d, 0):
        pixels = max(pixels, strip)
    step_rows = max(1, min(pixels // halo_w, tuning.next_power_of_2(halo_rows)))
    step_rows = max(step_rows, 16 // halo_w)  # a step's dot needs at least 16 strip pixels
    # fp32 inputs run their dots on the FMA units (ieee), operands in registers: more warps (the
    # backward kernels at D >= 64 spilled at 4 warps on Triton 3.6).
    num_warps = 1
    if dtype == torch.float32:
        num_warps = 8 if kernel != "local_fwd" and block_d >= 64 else 4
    # Pipelined loads (cp.async) for several steps of tensor-core dots; fp32's FMA dots hold their
    # operands in registers, where a second stage only adds pressure (dk/dv spilled at D = 64).
    num_stages = 2 if step_rows < halo_rows and dtype != torch.float32 else 1
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "STEP_ROWS": step_rows, "num_warps": num_warps,
            "num_stages": num_stages}


def config_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """The autotuner's candidates, the default among them (about 10-30 per key, so tuning a key
    takes seconds): tiles of 16-32 pixels (2 x 8, 4 x 8, 2 x 16, and 4 x 4, 8 x 4 where a 4-wide
    tile's strip is narrower than an 8-wide one's, 8 x 2 and 16 x 2 where a 2-wide tile is the
    default; no wider or taller than the image needs),
    steps of the default's strip pixels and twice that (half of it and that where the default
    takes a whole strip by WHOLE_STRIP_PIXELS; dk/dv in 16 bits half of it too: see below), 1-2
    warps for 16-bit inputs (4-8 for fp32's FMA dots), 1-2 pipeline stages where a
    16-bit kernel takes several steps.

    dk/dv's half steps in 16 bits: at its default steps it holds 212-254 registers a thread (D 8
    and 16, k = 3-15, sm_90), so 8-9 one-warp programs fit an SM; half a step holds 128-194 (10-16
    programs), at -4 % to +0.7 % warp-instructions per (pixel, head) on Triton 3.9 where one
    16-wide row is a step and the row bias takes the dot and gather (k >= 11; D 16 at k = 3, 7, 9)
    and +10 % to +19 % elsewhere (D 8 at k = 3-9, whose row bias takes FMAs; k = 5), but +11 % to
    +29 % everywhere on Triton 3.6 (bench/RESULTS.md, 2026-12-01). Which is faster is the card's
    to say.

    The forward at D <= BLOCK_D / 2 in 16 bits (D = 8: ResNet-50's first stage) also tries its
    2 x 8 tiles with HEADS_PER_PROGRAM 2 (two heads share one K/V strip load; taken only where
    the heads are even, see heads_per_program): the 56x56 forward is bound by L1 traffic on an
    H200, which this halves per head, at 206 registers instead of 126 (sm_90, bf16, k = 7,
    Triton 3.9). Only where the strip is 16 wide (k <= 9 undilated): wider ones spill (so does
    k = 9 on Triton 3.3; the tuner drops spilling candidates).

    No 16-bit candidate has 4 warps: on an H200 with Triton 3.6 (2026-11-29) the backward kernels
    at num_warps 4 on 64-128-pixel tiles (the shapes Triton lowers to Hopper's warpgroup MMA)
    returned non-finite dq, dk off by up to 3e-2 relative RMS, or faulted (illegal memory
    access), as the previous kernels' 4- and 8-warp tiles did on an H100 (issue 11).
    """
    radius = dilation * (kernel_size // 2)
    default = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    tiles = [(2, 8), (4, 8), (2, 16)]
    if halo_width(4, kernel_size, dilation) < halo_width(8, kernel_size, dilation):
        tiles += [(4, 4), (8, 4)]  # r = 1, 2, 5, 6: a 4-wide tile's strip is half as wide
    if default["BLOCK_W"] == 2:
        tiles += [(8, 2), (16, 2)]  # r = 7 (k = 15)
    seen = set()
    for block_h, block_w in tiles:
        too_tall = block_h > 2 and block_h >= 2 * height_bucket
        if block_w > 8 and width_bucket <= 8 or too_tall:
            continue
        halo_w = halo_width(block_w, kernel_size, dilation)
        halo_rows = block_h + 2 * radius
        default_pixels = default["STEP_ROWS"] * halo_width(default["BLOCK_W"], kernel_size, dilation)
        options = (default_pixels, default_pixels * 2)
        if default_pixels > STEP_PIXELS[kernel][min(channel_tile(head_dim), 128)]:
            options = (default_pixels // 2, default_pixels)  # a whole strip (WHOLE_STRIP_PIXELS), and half
        elif kernel == "local_bwd_dkdv" and dtype != torch.float32:
            options = (default_pixels // 2,) + options  # fewer registers a thread, more warps an SM
        for pixels in options:
            step_rows = min(max(1, pixels // halo_w), tuning.next_power_of_2(halo_rows))
            if step_rows * halo_w < 16:
                continue
            warps = (4, 8) if dtype == torch.float32 else ((1, 2) if block_h * block_w >= 32 else (1,))
            for num_warps in warps:
                for num_stages in ((1, 2) if step_rows < halo_rows and dtype != torch.float32 else (1,)):
                    config = {"BLOCK_H": block_h, "BLOCK_W": block_w, "STEP_ROWS": step_rows,
                              "num_warps": num_warps, "num_stages": num_stages}
                    key = tuple(config.values())
                    if key in seen:
                        continue
                    seen.add(key)
                    yield config
                    if (kernel == "local_fwd" and dtype != torch.float32 and (block_h, block_w) == (2, 8)
                            and halo_w <= 16 and num_warps == 1
                            and heads_per_program({"HEADS_PER_PROGRAM": 2}, 2, head_dim) == 2):
                        yield {**config, "HEADS_PER_PROGRAM": 2}


# dk/dv computes a step's row bias by FMAs (ROW_BIAS_FMA) where Dr * BLOCK_H, the table values
# each query's thread multiplies, is at most this. sm_90 warp-instructions per (pixel, head), k = 7,
# dot-and-gather -> FMAs (bench/RESULTS.md, 2026-11-30): bf16 D 8 (4 x 8 tile: 16) 129.7 -> 102.8
# on Triton 3.9, 127.7 -> 122.3 on 3.6, 139.3 -> 136.4 on 3.3; fp32 D 16 (2 x 8: 16) 1008 -> 820
# (3.9). At 32 (bf16 D 16 on 4 x 8, D 32 on 2 x 8) 3.9 still gains (127.6 -> 110.2, 215.6 ->
# 212.0) but 3.3 and 3.6 lose 26-35 % (they sum over the channels across lanes); at 64 (D 64)
# 3.9 loses too.
ROW_BIAS_FMA_MAX = 16


def _meta(q, kernel_size, dilation, padding, rel_rows, config):
    head_dim = q.shape[-1]
    return dict(
        D=head_dim, D_ROWS=head_dim // 2, KSIZE=kernel_size, DILATION=dilation, HAS_REL=int(rel_rows is not None),
        REL_PER_HEAD=int(rel_rows is not None and rel_rows.dim() == 3), MASK_PADDING=int(padding == "mask"),
        DOT_PRECISION=dot_precision(q.dtype), BLOCK_H=config["BLOCK_H"], BLOCK_W=config["BLOCK_W"],
        HALO_W=halo_width(config["BLOCK_W"], kernel_size, dilation), STEP_ROWS=config["STEP_ROWS"],
        KPAD=max(16, tuning.next_power_of_2(kernel_size)), BLOCK_D=channel_tile(head_dim),
        SELECT_GATHER=int(config["num_warps"] > 1), num_warps=config["num_warps"], num_stages=config["num_stages"],
    )


def heads_per_program(config: dict, heads: int, head_dim: int) -> int:
    """How many heads a forward program takes: the config's HEADS_PER_PROGRAM (default 1) where
    their packed channels fit one BLOCK_D tile and divide the heads, else 1."""
    count = config.get("HEADS_PER_PROGRAM", 1)
    return count if heads % count == 0 and count * head_dim <= channel_tile(head_dim) else 1


class _Plan:
    """What a launch of one kernel needs besides the tensors, fixed per (kernel, shape, options,
    config), and its launcher (which keeps the compiled kernel)."""
    __slots__ = ("config", "meta", "grid", "programs", "launch", "packed")

    def __init__(self, kernel, q, kernel_size, dilation, padding, rel_rows, config):
        B, H, W, heads, D = q.shape
        self.config, self.packed = config, None
        self.meta = _meta(q, kernel_size, dilation, padding, rel_rows, config)
        groups = B * heads
        if kernel != "local_fwd":
            self.meta["GRAD_PACK"] = 1
        if kernel == "local_bwd_dkdv":
            row_fma = rel_rows is not None and (D // 2) * config["BLOCK_H"] <= ROW_BIAS_FMA_MAX
            self.meta.update(ROW_BIAS_FMA=int(row_fma), DR_PAD=tuning.next_power_of_2(max(1, D // 2)))
        if kernel == "local_fwd":
            self.meta["HEADS_PER_PROGRAM"] = heads_per_program(config, heads, D)
            groups //= self.meta["HEADS_PER_PROGRAM"]
        self.grid = (groups, triton.cdiv(H, config["BLOCK_H"]), triton.cdiv(W, config["BLOCK_W"]))
        self.programs = self.grid[0] * self.grid[1] * self.grid[2]
        self.launch = KernelLaunch(_KERNEL_FNS[kernel], self.grid, self.meta, q.get_device())

    def with_packed_grads(self) -> "_Plan":
        """This backward kernel's plan writing its gradients into the parts of a (B, H, W, 3,
        heads, D) dqkv tensor (GRAD_PACK 3; made once)."""
        if self.packed is None:
            self.packed = copy.copy(self)
            self.packed.meta = {**self.meta, "GRAD_PACK": 3}
            self.packed.launch = KernelLaunch(self.launch.kernel, self.grid, self.packed.meta, self.launch.device)
        return self.packed


# CUDA launches at most 65535 programs along a grid's second and third axes (the row and column
# tiles; the first, B * heads, takes 2**31 - 1).
MAX_GRID_TILES = 65535


def _check_grid(plan: _Plan, H: int, W: int) -> None:
    """A launch's row and column tiles must fit CUDA's grid (the interpreter is held to it too, so
    that a shape fails alike everywhere, with this message rather than a driver error)."""
    for size, name, tile, tiles in ((H, "height", plan.meta["BLOCK_H"], plan.grid[1]),
                                    (W, "width", plan.meta["BLOCK_W"], plan.grid[2])):
        if tiles > MAX_GRID_TILES:
            raise ValueError(f"q's image {name} {size} is too large for the kernels' launch grid: at most "
                             f"{MAX_GRID_TILES} tiles of {tile} pixels ({MAX_GRID_TILES * tile}) along it")


def _check_offsets(stride_h: int, plan: _Plan) -> None:
    """The kernels address a tile's haloed strip with int32 offsets from an int64 origin."""
    rows = plan.meta["BLOCK_H"] + 2 * plan.meta["DILATION"] * (plan.meta["KSIZE"] // 2) + plan.meta["STEP_ROWS"]
    if rows * abs(stride_h) >= 2 ** 31:
        raise ValueError(f"q, k, v rows are too far apart (row stride {stride_h}): a tile's {rows} haloed rows "
                         f"need int32 offsets; use images with fewer than 2**31 / {rows} elements per row")


class _OpPlan:
    """Everything an op call needs besides its tensors, fixed per (shapes, strides, dtype, options,
    configs): the three kernels' plans, whether q, k, v must be copied first (the kernels take
    one set of (b, h, w) strides with heads and channels packed, as views of one channels_last
    qkv tensor have; anything else is copied to contiguous tensors), the strides the kernels then
    read, and the shape of the tables' partial gradients. An op call then does no Python work
    that depends only on these. A plan holds no tensor: plans are cached across calls, and a tensor
    allocated while torch.compile's CUDA graphs record (one-element buffer templates did, until a
    test on an H200 saw it) would stay alive in their memory pool, which they refuse."""
    __slots__ = ("fwd", "dq", "dkdv", "copy_qkv", "strides", "sizes", "drel_shape", "lse_shape")

    def __init__(self, q, k, v, rel_rows, kernel_size, dilation, padding, configs):
        B, H, W, heads, D = q.shape
        strides = q.stride()
        self.copy_qkv = strides[3:] != (D, 1) or k.stride() != strides or v.stride() != strides
        self.strides = (H * W * heads * D, W * heads * D, heads * D) if self.copy_qkv else strides[:3]
        self.sizes = (H, W, heads)
        self.fwd, self.dq, self.dkdv = (
            _Plan(name, q, kernel_size, dilation, padding, rel_rows,
                  configs.get(name) or tuning.get_config(name, kernel_size, dilation, D, q.dtype, H, W))
            for name in KERNELS)
        for plan in (self.fwd, self.dq, self.dkdv):
            _check_offsets(self.strides[1], plan)
            _check_grid(plan, H, W)
        # (an even D: (programs, 2, k, D / 2), the same memory, whose sum unbinds into both tables)
        self.drel_shape = ((1,) if rel_rows is None else (self.dq.programs, 2, kernel_size, D // 2) if D % 2 == 0
                           else (self.dq.programs, kernel_size * D))
        self.lse_shape = (B, heads, H, W)


_PLANS: dict = {}  # key -> (the tuning state its configs came from, _OpPlan)


def _op_plan(q, k, v, rel_rows, kernel_size, dilation, padding, configs=None) -> _OpPlan:
    """The op's plan, cached per key (an op call then costs one dict lookup); rebuilt when the
    tuning state is reset (tuning.clear_cache). Explicit `configs` ({kernel: config or None}: the
    tests, and the tuner, which times each candidate's launches) are part of the key; the other
    kernels take the configs the tuning state resolves."""
    per_head = None if rel_rows is None else rel_rows.dim() == 3
    precision = dot_precision(q.dtype) if q.dtype == torch.float32 else None
    key = (q.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, kernel_size, dilation, padding, per_head,
           precision)
    if configs:
        configs = {name: config for name, config in configs.items() if config}
        key += tuple((name, *config.items()) for name, config in configs.items())
    else:
        configs = {}
    try:
        cached = _PLANS.get(key)
    except TypeError:  # a config value that cannot be hashed: plan without the cache
        return _OpPlan(q, k, v, rel_rows, kernel_size, dilation, padding, configs)
    if cached is not None and cached[0] is tuning._state:
        return cached[1]
    plan = _OpPlan(q, k, v, rel_rows, kernel_size, dilation, padding, configs)
    if len(_PLANS) >= 4096:
        _PLANS.clear()
    _PLANS[key] = (tuning._state, plan)
    return plan


def _tables(rel_rows, rel_cols, q):
    if rel_rows is None:
        return q, q  # never read (HAS_REL = 0)
    return rel_rows.contiguous(), rel_cols.contiguous()


def _launch(plan: _Plan, args) -> None:
    """Every launch goes through here (the host-path benchmark stubs it out)."""
    plan.launch(args)


def _fwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, scale):
    return (q, k, v, *_tables(rel_rows, rel_cols, q), y, lse, *plan.strides, *plan.sizes, scale * LOG2E)


def _bwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, dy, delta, dq, dk, dv, drel, scale):
    """The dq and dk/dv kernels' arguments; dy as given (heads and channels packed)."""
    dy_strides = dy.stride()[:3]
    if dy_strides[1] > plan.strides[1]:
        for kernel_plan in (plan.dq, plan.dkdv):
            _check_offsets(dy_strides[1], kernel_plan)
    inputs = (q, k, v, *_tables(rel_rows, rel_cols, q))
    sizes = (*plan.strides, *dy_strides, *plan.sizes, float(scale))
    return (*inputs, y, dy, lse, delta, dq, drel, *sizes), (*inputs, dy, lse, delta, dk, dv, *sizes)


def _grad_layout(grads) -> bool:
    """Whether the kernels can write (dq, dk, dv) as they are: (B, H, W, heads, D) tensors of one
    layout, contiguous or the parts of a contiguous (B, H, W, 3, heads, D) tensor."""
    B, H, W, heads, D = grads[0].shape
    strides = grads[0].stride()
    return (all(g.shape == grads[0].shape and g.stride() == strides for g in grads) and strides[4] == 1
            and strides[3] == D and strides[2] in (heads * D, 3 * heads * D) and strides[1] == W * strides[2]
            and strides[0] == H * strides[1])


def qkv_parts(q, k, v):
    """The tensor q, k, v are the three parts of, in this order, or None: views of one base
    tensor that requires grad, made with grad enabled, laid out as a contiguous (B, H, W, 3, heads,
    D) tensor (a channels_last qkv projection viewed and unbound), and covering all of it, none of
    them with retain_grad() or a hook of its own (which would want their gradients apart). Such q, k, v
    take their gradients as one tensor laid out like the base (the op's kernels write into its
    three parts), which autograd hands to the base directly: nothing is stacked or copied."""
    base = q._base
    if (base is None or k._base is not base or v._base is not base or not base.requires_grad
            or q.grad_fn is None or k.grad_fn is None or v.grad_fn is None):  # (views made without grad have none)
        return None
    if any(t.retains_grad or t._backward_hooks for t in (q, k, v)):  # their own gradients are asked for
        return None
    B, H, W, heads, D = q.shape
    step, strides, offset = heads * D, q.stride(), q.storage_offset()
    if (strides != (H * W * 3 * step, W * 3 * step, 3 * step, D, 1) or k.stride() != strides
            or v.stride() != strides or k.storage_offset() != offset + step or v.storage_offset() != offset + 2 * step
            or base.storage_offset() != offset or base.numel() != 3 * q.numel() or base.dtype != q.dtype
            or not (base.is_contiguous() or base.is_contiguous(memory_format=torch.channels_last) or _dense(base))):
        return None
    return base


def _dense(t) -> bool:
    """Whether t's elements fill its memory span exactly once (any order of dimensions)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, y=None, lse=None, config=None,
         plan=None):
    """Launch the forward kernel. Returns y (B, H, W, heads, D), contiguous, and lse (B, heads, H, W)
    fp32. `y`/`lse` may be passed in (the tests poison them to prove every element is written)."""
    if q.numel() == 0:
        return attention_outputs(q, y, lse)
    if plan is None:
        plan = _op_plan(q, k, v, rel_rows, kernel_size, dilation, padding, {"local_fwd": config})
    given = y is not None or lse is not None
    y = torch.empty_like(q, memory_format=torch.contiguous_format) if y is None else y
    lse = q.new_empty(plan.lse_shape, dtype=torch.float32) if lse is None else lse
    if given and not (y.is_contiguous() and lse.is_contiguous()):
        raise ValueError("y and lse must be contiguous (the kernel writes them as such)")
    if plan.copy_qkv:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _launch(plan.fwd, _fwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, scale))
    return y, lse


def _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation, scale, padding,
         grads=None, config_dq=None, config_dkdv=None, plan=None):
    """Launch the backward kernels. Returns dq, dk, dv and d rel_rows, d rel_cols (None without
    tables). dq, dk, dv are new contiguous tensors, or `grads`: preallocated (dq, dk, dv), contiguous
    or the three views of one (B, H, W, 3, heads, D) gradient (the tests poison them; the
    autograd Function passes the views of a packed qkv tensor's gradient)."""
    B, H, W, heads, D = q.shape
    if grads is not None and not _grad_layout(grads):
        raise ValueError("grads must be contiguous, or views of one contiguous (B, H, W, 3, heads, D) tensor "
                         "(the kernels write them as such)")
    has_rel = rel_rows is not None
    if q.numel() == 0:
        zero = lambda t: None if t is None else torch.zeros_like(t)
        return (*(grads or (torch.empty_like(q) for _ in range(3))), zero(rel_rows), zero(rel_cols))
    if plan is None:
        plan = _op_plan(q, k, v, rel_rows, kernel_size, dilation, padding,
                        {"local_bwd_dq": config_dq, "local_bwd_dkdv": config_dkdv})
    # (three allocations cost less host time than one unbound; empty_like less than new_empty)
    dq, dk, dv = grads or (torch.empty_like(q, memory_format=torch.contiguous_format),
                           torch.empty_like(q, memory_format=torch.contiguous_format),
                           torch.empty_like(q, memory_format=torch.contiguous_format))
    if plan.copy_qkv:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if not y.is_contiguous():
        y = y.contiguous()
    if dy.stride()[3:] != (D, 1):
        dy = dy.contiguous()
    delta = torch.empty_like(lse)
    # Per-program partial gradients of the tables, fp32, plan.drel_shape, summed below.
    drel = q.new_empty(plan.drel_shape, dtype=torch.float32)
    dq_args, dkdv_args = _bwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, dy, delta, dq, dk, dv, drel, scale)
    dq_plan, dkdv_plan = plan.dq, plan.dkdv
    if dq.stride(2) != heads * D:  # the parts of one dqkv
        dq_plan, dkdv_plan = dq_plan.with_packed_grads(), dkdv_plan.with_packed_grads()
    _launch(dq_plan, dq_args)
    _launch(dkdv_plan, dkdv_args)  # reads delta
    if not has_rel:
        return dq, dk, dv, None, None
    # (B * heads * tiles, ...) -> (...) or (heads, ...): a deterministic sum over batch and tiles;
    # the rel_rows gradient (k, D // 2), then the rel_cols one, contiguous for shared tables.
    per_head = rel_rows.dim() == 3
    total = drel.sum(0) if not per_head else drel.view(B, heads, -1, *drel.shape[1:]).sum(dim=(0, 2))
    if D % 2 == 0:  # (..., 2, k, D / 2): one unbind, 19,700 instructions of host time fewer than a split and two views
        drel_rows, drel_cols = total.unbind(-3)
    else:
        lead = total.shape[:-1]
        drel_rows, drel_cols = total.split_with_sizes((kernel_size * (D // 2), kernel_size * (D - D // 2)), dim=-1)
        drel_rows = drel_rows.view(*lead, kernel_size, D // 2)
        drel_cols = drel_cols.view(*lead, kernel_size, D - D // 2)
    if rel_rows.dtype != torch.float32:
        drel_rows, drel_cols = drel_rows.to(rel_rows.dtype), drel_cols.to(rel_cols.dtype)
    return dq, dk, dv, drel_rows, drel_cols


def static_specs(shape=(32, 56, 56, 8, 64), dtype=torch.bfloat16, kernel_size=7, dilation=1, padding="zeros",
                 has_rel=True, configs=None, packed_grads=False):
    """KernelSpecs of the forward, dq and dk/dv kernels exactly as a launch on contiguous tensors of
    `shape` (B, H, W, heads, D) would compile them (meta tensors: nothing is allocated or run).

    configs: optional {"local_fwd": cfg, "local_bwd_dq": cfg, "local_bwd_dkdv": cfg} overrides.
    packed_grads: the backward kernels' variant that writes the parts of one dqkv (GRAD_PACK 3:
    what SelfAttention2d's backward runs).
    """
    from .._compile import spec_from_launch

    configs = configs or {}
    B, H, W, heads, D = shape
    q = torch.empty(shape, dtype=dtype, device="meta")
    k, v, y, dy, dq, dk, dv = (torch.empty_like(q) for _ in range(7))
    rel_rows = torch.empty(kernel_size, D // 2, device="meta") if has_rel else None
    rel_cols = torch.empty(kernel_size, D - D // 2, device="meta") if has_rel else None
    lse = torch.empty((B, heads, H, W), device="meta")
    delta = torch.empty_like(lse)

    plan = _OpPlan(q, k, v, rel_rows, kernel_size, dilation, padding, configs)
    drel = torch.empty(plan.drel_shape, device="meta")
    dq_args, dkdv_args = _bwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, dy, delta, dq, dk, dv, drel, 1.0)
    return [
        spec_from_launch("local_fwd", _local_attn_fwd_kernel,
                         _fwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, 1.0), plan.fwd.meta),
        spec_from_launch("local_bwd_dq", _local_attn_bwd_dq_kernel, dq_args,
                         (plan.dq.with_packed_grads() if packed_grads else plan.dq).meta),
        spec_from_launch("local_bwd_dkdv", _local_attn_bwd_dkdv_kernel, dkdv_args,
                         (plan.dkdv.with_packed_grads() if packed_grads else plan.dkdv).meta),
    ]


# ----------------------------------------------------------------------------------------------
# Autograd. Eager calls take a torch.autograd.Function (a few microseconds of Python); tracing
# (torch.compile, fake or meta tensors) takes the registered ops, which torch.compile sees whole.
# ----------------------------------------------------------------------------------------------

class _LocalAttention(torch.autograd.Function):
    """The op with autograd. qkv (optional): the tensor whose three parts q, k, v are (they come
    detached, qkv_parts), which then takes their gradients as one tensor."""
    @staticmethod
    def forward(ctx, q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, qkv=None, plan=None):
        if plan is None and q.numel():
            plan = _op_plan(q, k, v, rel_rows, kernel_size, dilation, padding)
        # What a differentiable backward (create_graph) differentiates: the inputs themselves.
        inputs = (q, k, v) if qkv is None else (qkv,)
        if plan is not None and plan.copy_qkv:  # saved as the kernels read them: the backward copies nothing again
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        y, lse = _fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, plan=plan)
        ctx.save_for_backward(q, k, v, rel_rows, rel_cols, y, lse, *(inputs if inputs[0] is not q else ()))
        ctx.args = (kernel_size, dilation, scale, padding)
        ctx.plan = plan  # the backward's launches need no lookup
        ctx.qkv_layout = None if qkv is None else (qkv.shape, qkv.stride())  # q starts where qkv does
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, rel_rows, rel_cols, y, lse, *inputs = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            return _LocalAttention.differentiable_backward(ctx, q, k, v, rel_rows, rel_cols, inputs, dy)
        if ctx.qkv_layout is None:
            grads = _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, *ctx.args, plan=ctx.plan)
            return (*grads, None, None, None, None, None, None)
        # q, k, v are the three parts of qkv: their gradients are written into one tensor laid out
        # as qkv, which is qkv's gradient (no per-view gradients to stack or scatter back).
        dqkv = torch.empty_strided(*ctx.qkv_layout, dtype=q.dtype, device=q.device)
        step, shape, strides = k.storage_offset() - q.storage_offset(), q.shape, q.stride()
        grads = (dqkv.as_strided(shape, strides, 0), dqkv.as_strided(shape, strides, step),
                 dqkv.as_strided(shape, strides, 2 * step))
        _, _, _, drel_rows, drel_cols = _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, *ctx.args, grads=grads,
                                             plan=ctx.plan)
        return None, None, None, drel_rows, drel_cols, None, None, None, None, dqkv, None

    @staticmethod
    def differentiable_backward(ctx, q, k, v, rel_rows, rel_cols, inputs, dy):
        """The backward through the PyTorch reference, as a graph (differentiable_backward), of the
        inputs as given: q, k, v (the kernels' copies are not theirs), or qkv, whose parts they
        are rebuilt as views of."""
        from ..reference import local_attention2d as reference_op

        options = ctx.args
        if ctx.qkv_layout is None:
            q, k, v = inputs or (q, k, v)
            dq, dk, dv, drel_rows, drel_cols = differentiable_backward(
                lambda *args: reference_op(*args, *options), (q, k, v, rel_rows, rel_cols), dy)
            return dq, dk, dv, drel_rows, drel_cols, None, None, None, None, None, None
        (qkv,) = inputs
        parts = [(t.shape, t.stride(), t.storage_offset()) for t in (q, k, v)]
        dqkv, drel_rows, drel_cols = differentiable_backward(
            lambda qkv, *tables: reference_op(*(qkv.as_strided(*part) for part in parts), *tables, *options),
            (qkv, rel_rows, rel_cols), dy)
        return None, None, None, drel_rows, drel_cols, None, None, None, None, dqkv, None


_FUNCTION_APPLY = super(torch.autograd.Function, _LocalAttention).apply  # autograd's own (C++) apply
_is_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _apply(q, k, v, rel_rows, rel_cols, *options):
    """_LocalAttention.apply(...) without the Python around autograd's own apply where that Python
    does nothing: no functorch wrapper among the tensors (it would unwrap a dead one; under an
    active transform the op runs its reference, not this). The eager op call's forward then costs
    8 us less on a 2-core CPU (bench/RESULTS.md, 2026-11-30)."""
    if (_is_functorch_wrapped(q) or _is_functorch_wrapped(k)
            or _is_functorch_wrapped(v) or rel_rows is not None and (
                _is_functorch_wrapped(rel_rows) or _is_functorch_wrapped(rel_cols))):
        return _LocalAttention.apply(q, k, v, rel_rows, rel_cols, *options)
    return _FUNCTION_APPLY(q, k, v, rel_rows, rel_cols, *options)


@define_op("sasa_triton::local_attention2d_fwd")
def _local_attention2d_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_rows: Optional[torch.Tensor],
                           rel_cols: Optional[torch.Tensor], kernel_size: int, dilation: int, scale: float,
                           padding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)


@_local_attention2d_fwd.register_fake
def _(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding):
    return attention_outputs(q)


@define_op("sasa_triton::local_attention2d_bwd")
def _local_attention2d_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_rows: Optional[torch.Tensor],
                           rel_cols: Optional[torch.Tensor], y: torch.Tensor, lse: torch.Tensor, dy: torch.Tensor,
                           kernel_size: int, dilation: int, scale: float,
                           padding: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    dq, dk, dv, drel_rows, drel_cols = _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation,
                                            scale, padding, grads=grads)
    if rel_rows is None:  # ops return tensors only: empty stand-ins, mapped back to None below
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    # An op's outputs may not alias each other: the two halves of one sum are copied apart.
    return dq, dk, dv, drel_rows.clone(), drel_cols.clone()


@_local_attention2d_bwd.register_fake
def _(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation, scale, padding):
    grads = tuple(torch.empty(q.shape, device=q.device, dtype=q.dtype) for _ in range(3))
    if rel_rows is None:
        return (*grads, q.new_empty(0), q.new_empty(0))
    return (*grads, torch.empty_like(rel_rows), torch.empty_like(rel_cols))


def _setup_context(ctx, inputs, output):
    q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding = inputs
    y, lse = output
    ctx.save_for_backward(q, k, v, rel_rows, rel_cols, y, lse)
    ctx.args = (kernel_size, dilation, scale, padding)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dy, _dlse):
    q, k, v, rel_rows, rel_cols, y, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True (eager; torch.compile refuses a double backward)
        from ..reference import local_attention2d as reference_op
        grads = differentiable_backward(lambda *args: reference_op(*args, *ctx.args), (q, k, v, rel_rows, rel_cols), dy)
        return (*grads, None, None, None, None)
    dq, dk, dv, drel_rows, drel_cols = _local_attention2d_bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, *ctx.args)
    if rel_rows is None:
        drel_rows = drel_cols = None
    return dq, dk, dv, drel_rows, drel_cols, None, None, None, None


_local_attention2d_fwd.register_autograd(_backward, setup_context=_setup_context)

_INTERPRET = interpreter_enabled()


def local_attention2d(q, k, v, rel_rows=None, rel_cols=None, kernel_size=7, dilation=1, scale=1.0,
                      padding="zeros", backend="auto"):
    """Stand-alone self-attention over a k x k window (SPEC section 1), fused in Triton.

    Args:
        q, k, v: (B, H, W, heads, D) queries, keys and values, any strides (a channels_last
            1x1-conv output viewed as (B, H, W, heads, D) is free). float16, bfloat16 or float32
            on the Triton path; float64 too on the reference path.
        rel_rows: (kernel_size, D // 2) shared across heads, or (heads, kernel_size, D // 2);
            row-offset embeddings, index t holds offset (t - kernel_size // 2) * dilation.
        rel_cols: (kernel_size, D - D // 2) or (heads, kernel_size, D - D // 2). Pass both or
            neither (None: no relative term).
        kernel_size: odd window size k. dilation: step between window taps.
        scale: multiplies the logits (the paper uses 1.0, no 1/sqrt(D)).
        padding: "zeros" (outside the image k = v = 0, still in the softmax) or "mask" (left out).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference),
            "triton" or "reference".

    Returns:
        (B, H, W, heads, D) in q's dtype.

    q, k, v that are, in this order, the three parts of one tensor that requires grad, laid out
    as a contiguous (B, H, W, 3, heads, D) tensor (a channels_last qkv projection viewed and
    unbound, as SelfAttention2d does), take their gradient as one tensor that autograd hands that
    projection directly (nothing stacked or copied); see qkv_parts.

    A backward with create_graph=True (a gradient penalty, a double backward) runs through the
    PyTorch reference, whose gradients can be differentiated again (the kernels' cannot).
    """
    if torch.compiler.is_compiling():  # shapes may be symbolic: hashing them would specialize
        route = _check_and_route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend, True)
        kind = None
    else:
        route, kind = _route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend)
        if transforms_active():  # forward-mode AD, torch.func: only the reference has their rules
            route = "reference"
    if route == "reference":
        from ..reference import local_attention2d as reference_op
        return reference_op(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)
    given = q, k, v
    q, k, v = autocast_inputs(q, k, v)
    # The launch plan, kept with the route (one lookup per call), unless autocast cast q, k or v.
    plan = (_kind_plan(kind, q, k, v, rel_rows, kernel_size, dilation, padding)
            if route == "triton" and kind is not None and q is given[0] and k is given[1] and v is given[2]
            else None)
    if q.dtype not in KERNEL_DTYPES:  # float64 under autocast stays float64
        check_kernel_dtype("q", q)
    scale = float(scale)
    if _INTERPRET and q.dtype == torch.bfloat16:
        # Triton's CPU interpreter computes bfloat16 wrongly (values of order 1e8 where 3 is
        # right): compute in float32 there and round the result to bfloat16 (with autocast off,
        # which would otherwise cast the float32 copies back to bfloat16, and so on forever).
        q32, k32, v32 = q.float(), k.float(), v.float()
        with torch.autocast(q.device.type, enabled=False):
            y = local_attention2d(q32, k32, v32, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend)
        return y.to(torch.bfloat16)
    if route == "registered":
        return _local_attention2d_fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)[0]
    if not torch.is_grad_enabled() or not (q.requires_grad or k.requires_grad or v.requires_grad or (
            rel_rows is not None and (rel_rows.requires_grad or rel_cols.requires_grad))):
        return _fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, plan=plan)[0]  # nothing to save
    qkv = qkv_parts(q, k, v)
    if qkv is not None:  # the gradient goes to qkv in one piece
        return _apply(q.detach(), k.detach(), v.detach(), rel_rows, rel_cols, kernel_size, dilation, scale, padding,
                      qkv, plan)
    return _apply(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, None, plan)


def _check_and_route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend, compiling):
    """Check the arguments; return how the call runs: "reference", "registered" (the torch.library
    ops: while torch.compile traces, and for fake, meta or functional tensors, which only they
    handle) or "triton" (the launchers, through a torch.autograd.Function when grads are needed)."""
    check_local_attention_args(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)
    if resolve_backend(backend, q.device) == "reference":
        return "reference"
    if rel_rows is not None:
        check_kernel_dtype("rel_rows", rel_rows)
        check_kernel_dtype("rel_cols", rel_cols)
    return "registered" if compiling or type(q) is not torch.Tensor or q.device.type == "meta" else "triton"


_ROUTES: dict = {}  # kind of call -> [route, the tuning state its plan came from, its launch plan]


def _route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend) -> tuple:
    """(_check_and_route's route, the kind's cache entry or None): the checks once per kind of call
    (same types, shapes, strides, dtypes and devices, options, whether scale is finite, fp32 matmul
    precision and TRITON_INTERPRET setting), which then costs one dict lookup per call, and its launch plan
    kept with it (_kind_plan)."""
    try:
        rel = None if rel_rows is None else (type(rel_rows), rel_rows.shape, rel_rows.dtype, rel_rows.device,
                                             type(rel_cols), rel_cols.shape, rel_cols.dtype, rel_cols.device)
        dtype = q.dtype
        key = (type(q), type(k), type(v), q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), dtype,
               k.dtype, v.dtype, q.device, k.device, v.device, rel, kernel_size, type(kernel_size), dilation,
               type(dilation), type(scale), not isinstance(scale, float) or math.isfinite(scale), padding, backend,
               os.environ.get("TRITON_INTERPRET"), dot_precision(dtype) if dtype == torch.float32 else None)
        kind = _ROUTES.get(key)
    except (AttributeError, TypeError):  # not tensors, or unhashable arguments: the full checks say why
        return _check_and_route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend,
                                False), None
    if kind is None:
        kind = [_check_and_route(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, backend, False),
                None, None]
        if len(_ROUTES) >= 4096:
            _ROUTES.clear()
        _ROUTES[key] = kind
    return kind[0], kind


def _kind_plan(kind, q, k, v, rel_rows, kernel_size, dilation, padding):
    """The launch plan of a kind of call (None for empty tensors), kept in its entry: the same as
    _op_plan's, whose own key then needs no building; rebuilt when the tuning state is reset."""
    if kind[1] is not tuning._state:
        kind[2] = _op_plan(q, k, v, rel_rows, kernel_size, dilation, padding) if q.numel() else None
        kind[1] = tuning._state
    return kind[2]
