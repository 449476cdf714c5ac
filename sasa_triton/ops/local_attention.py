"""Fused SASA local attention (SPEC section 1): Triton forward and backward kernels.

Algorithm: each program owns a BLOCK_H x BLOCK_W tile of query pixels of one (batch, head) and
walks the haloed key rows one at a time. Per key row it loads a BLOCK_W + 2r wide strip of K/V
(padded to a power of two), computes q.k with tl.dot, adds the relative logits
q[:Dr].rel_rows[a-i] + q[Dr:].rel_cols[b-j] (2k dot products per query, gathered from two small
tables), masks pairs outside each query's window, and runs an online fp32 softmax with p.v on
the tensor cores. It stores y and one log-sum-exp per (pixel, head), nothing of size k*k.
Trade-off: a tile's dots cover every (query, key) pair of the haloed strip, so about
k*k / ((BLOCK_H + 2r) * KEY_W / BLOCK_H) of the tensor-core work is useful; the op is
memory-bound, so that waste buys a single pass over K/V.

Backward (flash-attention style, no atomics, deterministic): a query-stationary kernel
recomputes the probabilities from the log-sum-exp and gives dq, delta = rowsum(dy * y) and
per-tile partial gradients of the relative tables (summed by torch); a key-stationary kernel
gives dk and dv.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tuning
from .._library import attention_outputs, autocast_inputs, define_op, is_fake, launchable
from .._utils import check_kernel_dtype, dot_precision, check_local_attention_args, resolve_backend

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _gather_columns(table, index, KSIZE: tl.constexpr, KPAD: tl.constexpr):
    """out[i, j] = table[i, index[i, j]] for index in [0, KSIZE) (0 elsewhere); table is (M, KPAD).

    A static where-chain over the k table columns: Triton has no register gather on every
    supported version, and k <= 15 keeps this cheap.
    """
    offs_t = tl.arange(0, KPAD)
    out = tl.zeros(index.shape, dtype=tl.float32)
    for t in tl.static_range(KSIZE):
        column = tl.sum(tl.where(offs_t[None, :] == t, table, 0.0), axis=1)
        out = tl.where(index == t, column[:, None], out)
    return out


@triton.jit
def _gather_columns_transposed(table, index, KSIZE: tl.constexpr, KPAD: tl.constexpr):
    """out[i, j] = table[j, index[i, j]] for index in [0, KSIZE) (0 elsewhere); table is (N, KPAD)."""
    offs_t = tl.arange(0, KPAD)
    out = tl.zeros(index.shape, dtype=tl.float32)
    for t in tl.static_range(KSIZE):
        column = tl.sum(tl.where(offs_t[None, :] == t, table, 0.0), axis=1)
        out = tl.where(index == t, column[None, :], out)
    return out


@triton.jit
def _load_rel_tables(REL_ROWS, REL_COLS, head, stride_rrn, stride_rrt, stride_rrd,
                     stride_rcn, stride_rct, stride_rcd,
                     D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr,
                     KPAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Both relative tables as (KPAD, BLOCK_D) fp32 tiles laid over q's channels: rel_rows in
    columns [0, Dr), rel_cols in [Dr, D), zeros elsewhere, so q @ table.T is the q.rel logit."""
    offs_t = tl.arange(0, KPAD)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t[:, None] < KSIZE
    rows_ok = t_ok & (offs_d[None, :] < D_ROWS)
    cols_ok = t_ok & (offs_d[None, :] >= D_ROWS) & (offs_d[None, :] < D)
    rel_rows = tl.load(REL_ROWS + head * stride_rrn + offs_t[:, None] * stride_rrt + offs_d[None, :] * stride_rrd,
                       mask=rows_ok, other=0.0).to(tl.float32)
    rel_cols = tl.load(REL_COLS + head * stride_rcn + offs_t[:, None] * stride_rct
                       + (offs_d[None, :] - D_ROWS) * stride_rcd, mask=cols_ok, other=0.0).to(tl.float32)
    return rel_rows, rel_cols


@triton.jit
def _program_tile(n_tiles, n_tiles_w, heads, H, W, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """This program's (batch, head) and BLOCK_H x BLOCK_W pixel tile: neighbouring programs take
    neighbouring tiles of one image and head, so their haloes meet in L2."""
    pid = tl.program_id(0)
    batch_head = pid // n_tiles
    tile = pid % n_tiles
    row0 = (tile // n_tiles_w) * BLOCK_H
    col0 = (tile % n_tiles_w) * BLOCK_W
    offs = tl.arange(0, BLOCK_H * BLOCK_W)
    rows = row0 + offs // BLOCK_W
    cols = col0 + offs % BLOCK_W
    inside = (rows < H) & (cols < W)
    return pid, batch_head, (batch_head // heads).to(tl.int64), batch_head % heads, row0, col0, rows, cols, inside


@triton.jit
def _tile_ptrs(BASE, batch, head, rows, cols, stride_b, stride_h, stride_w, stride_n, stride_d,
               BLOCK_D: tl.constexpr):
    """Pointers to the (pixels, channels) block of a (B, H, W, heads, D) tensor; int64 offsets
    for the batch and row terms (a batch of large images passes 2**31 elements)."""
    offs_d = tl.arange(0, BLOCK_D)
    return (BASE + batch * stride_b + head * stride_n + rows.to(tl.int64)[:, None] * stride_h
            + cols[:, None] * stride_w + offs_d[None, :] * stride_d)


@triton.jit
def _query_tile_window(q, q_col, col0, head, W, REL_ROWS, REL_COLS, stride_rrn, stride_rrt, stride_rrd,
                       stride_rcn, stride_rct, stride_rcd,
                       D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
                       HAS_REL: tl.constexpr, DOT_PRECISION: tl.constexpr, KEY_W: tl.constexpr,
                       KPAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a query tile needs for every key row: the haloed key columns, each query's window
    column per key column, and the relative logits q.rel (rows per window row; columns already
    gathered per key column, since they do not change from one key row to the next)."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    key_col = col0 - RADIUS + tl.arange(0, KEY_W)
    key_col_in = (key_col >= 0) & (key_col < W)
    col_offset = key_col[None, :] - q_col[:, None] + RADIUS  # (BLOCK_Q, KEY_W)
    col_ok = (col_offset >= 0) & (col_offset <= 2 * RADIUS) & (col_offset % DILATION == 0)
    col_index = tl.where(col_ok, col_offset // DILATION, -1)
    rel_rows = tl.zeros((KPAD, BLOCK_D), dtype=tl.float32)
    rel_cols = tl.zeros((KPAD, BLOCK_D), dtype=tl.float32)
    row_logits = tl.zeros((q.shape[0], KPAD), dtype=tl.float32)
    col_term = tl.zeros((q.shape[0], KEY_W), dtype=tl.float32)
    if HAS_REL:
        rel_rows, rel_cols = _load_rel_tables(REL_ROWS, REL_COLS, head, stride_rrn, stride_rrt, stride_rrd,
                                              stride_rcn, stride_rct, stride_rcd, D, D_ROWS, KSIZE, KPAD, BLOCK_D)
        q32 = q.to(tl.float32)
        row_logits = tl.dot(q32, tl.trans(rel_rows), input_precision=DOT_PRECISION)  # (BLOCK_Q, KPAD)
        col_logits = tl.dot(q32, tl.trans(rel_cols), input_precision=DOT_PRECISION)
        col_term = _gather_columns(col_logits, col_index, KSIZE, KPAD)
    return key_col, key_col_in, col_ok, col_index, rel_rows, rel_cols, row_logits, col_term


@triton.jit
def _key_row_logits(q, q_row, key_row, key_col, key_col_in, col_ok, row_logits, col_term, k_base, v_base,
                    stride_kh, stride_kw, stride_kd, stride_vh, stride_vw, stride_vd, H,
                    D: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr, HAS_REL: tl.constexpr,
                    MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr, KPAD: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """One haloed key row for a query tile: its K and V strips, the unscaled logits
    q.k + q.rel (BLOCK_Q, KEY_W), which (query, key) pairs are in the window (and in the image
    for padding="mask"), and each query's window row index for this key row."""
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    offs_d = tl.arange(0, BLOCK_D)
    # A vector of the row, not a scalar: the interpreter turns (tensor & scalar bool) into ints.
    key_rows = key_row + tl.zeros_like(key_col)
    key_in = key_col_in & (key_rows >= 0) & (key_rows < H)
    kv_mask = key_in[:, None] & (offs_d[None, :] < D)
    kt = tl.load(k_base + key_row.to(tl.int64) * stride_kh + key_col[:, None] * stride_kw
                 + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    vt = tl.load(v_base + key_row.to(tl.int64) * stride_vh + key_col[:, None] * stride_vw
                 + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    logits = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)  # (BLOCK_Q, KEY_W)
    row_offset = key_row - q_row + RADIUS
    row_ok = (row_offset >= 0) & (row_offset <= 2 * RADIUS) & (row_offset % DILATION == 0)
    row_index = row_offset // DILATION
    if HAS_REL:
        offs_t = tl.arange(0, KPAD)
        row_term = tl.sum(tl.where(offs_t[None, :] == row_index[:, None], row_logits, 0.0), axis=1)
        logits = logits + row_term[:, None] + col_term
    valid = row_ok[:, None] & col_ok
    if MASK_PADDING:
        valid = valid & key_in[None, :]
    return logits, valid, kt, vt, row_index


@triton.jit
def _local_attn_fwd_kernel(
    Q, K, V, REL_ROWS, REL_COLS, Y, LSE,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vn, stride_vd,
    stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
    stride_rrn, stride_rrt, stride_rrd, stride_rcn, stride_rct, stride_rcd,
    H, W, heads, n_tiles_w, n_tiles, qk_scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, KEY_W: tl.constexpr,
    KPAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    BLOCK_Q: tl.constexpr = BLOCK_H * BLOCK_W
    pid, batch_head, batch, head, row0, col0, q_row, q_col, q_in = _program_tile(
        n_tiles, n_tiles_w, heads, H, W, BLOCK_H, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_mask = q_in[:, None] & d_ok[None, :]
    q = tl.load(_tile_ptrs(Q, batch, head, q_row, q_col, stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
                           BLOCK_D), mask=q_mask, other=0.0)

    key_col, key_col_in, col_ok, col_index, rel_rows, rel_cols, row_logits, col_term = _query_tile_window(
        q, q_col, col0, head, W, REL_ROWS, REL_COLS, stride_rrn, stride_rrt, stride_rrd, stride_rcn, stride_rct,
        stride_rcd, D, D_ROWS, KSIZE, DILATION, HAS_REL, DOT_PRECISION, KEY_W, KPAD, BLOCK_D)

    k_base = K + batch * stride_kb + head * stride_kn
    v_base = V + batch * stride_vb + head * stride_vn
    m_i = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for key_step in range(0, BLOCK_H + 2 * RADIUS):
        logits, valid, kt, vt, row_index = _key_row_logits(
            q, q_row, row0 - RADIUS + key_step, key_col, key_col_in, col_ok, row_logits, col_term, k_base, v_base,
            stride_kh, stride_kw, stride_kd, stride_vh, stride_vw, stride_vd, H,
            D, KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION, KPAD, BLOCK_D)
        logits = tl.where(valid, logits * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    y = acc / l_safe[:, None]
    tl.store(_tile_ptrs(Y, batch, head, q_row, q_col, stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
                        BLOCK_D), y.to(Y.dtype.element_ty), mask=q_mask)
    # Natural-log LSE of the scaled logits; m_i is in log2 units.
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    lse_ptrs = LSE + batch_head.to(tl.int64) * H * W + q_row * W + q_col
    tl.store(lse_ptrs, lse, mask=q_in)


@triton.jit
def _local_attn_bwd_dq_kernel(
    Q, K, V, REL_ROWS, REL_COLS, Y, DY, LSE, DELTA, DQ, DREL,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vn, stride_vd,
    stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
    stride_dyb, stride_dyh, stride_dyw, stride_dyn, stride_dyd,
    stride_dqb, stride_dqh, stride_dqw, stride_dqn, stride_dqd,
    stride_rrn, stride_rrt, stride_rrd, stride_rcn, stride_rct, stride_rcd,
    H, W, heads, n_tiles_w, n_tiles, scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, KEY_W: tl.constexpr,
    KPAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    BLOCK_Q: tl.constexpr = BLOCK_H * BLOCK_W
    pid, batch_head, batch, head, row0, col0, q_row, q_col, q_in = _program_tile(
        n_tiles, n_tiles_w, heads, H, W, BLOCK_H, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = q_in[:, None] & d_ok[None, :]
    q = tl.load(_tile_ptrs(Q, batch, head, q_row, q_col, stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
                           BLOCK_D), mask=q_mask, other=0.0)
    dy = tl.load(_tile_ptrs(DY, batch, head, q_row, q_col, stride_dyb, stride_dyh, stride_dyw, stride_dyn,
                            stride_dyd, BLOCK_D), mask=q_mask, other=0.0)
    y = tl.load(_tile_ptrs(Y, batch, head, q_row, q_col, stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
                           BLOCK_D), mask=q_mask, other=0.0)
    delta = tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=1)
    stat_offsets = batch_head.to(tl.int64) * H * W + q_row * W + q_col
    tl.store(DELTA + stat_offsets, delta, mask=q_in)
    lse2 = tl.load(LSE + stat_offsets, mask=q_in, other=0.0) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634

    key_col, key_col_in, col_ok, col_index, rel_rows, rel_cols, row_logits, col_term = _query_tile_window(
        q, q_col, col0, head, W, REL_ROWS, REL_COLS, stride_rrn, stride_rrt, stride_rrd, stride_rcn, stride_rct,
        stride_rcd, D, D_ROWS, KSIZE, DILATION, HAS_REL, DOT_PRECISION, KEY_W, KPAD, BLOCK_D)
    offs_t = tl.arange(0, KPAD)

    k_base = K + batch * stride_kb + head * stride_kn
    v_base = V + batch * stride_vb + head * stride_vn
    dq = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    row_coef = tl.zeros((BLOCK_Q, KPAD), dtype=tl.float32)  # sum of dlogit per window row
    col_dlogits = tl.zeros((BLOCK_Q, KEY_W), dtype=tl.float32)  # dlogit summed over key rows
    for key_step in range(0, BLOCK_H + 2 * RADIUS):
        logits, valid, kt, vt, row_index = _key_row_logits(
            q, q_row, row0 - RADIUS + key_step, key_col, key_col_in, col_ok, row_logits, col_term, k_base, v_base,
            stride_kh, stride_kw, stride_kd, stride_vh, stride_vw, stride_vd, H,
            D, KSIZE, DILATION, HAS_REL, MASK_PADDING, DOT_PRECISION, KPAD, BLOCK_D)
        valid = valid & q_in[:, None]
        p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(dy, tl.trans(vt), input_precision=DOT_PRECISION)
        dlogits = p * (dp - delta[:, None])  # gradient of the scaled logit
        dq += tl.dot(dlogits.to(kt.dtype), kt, input_precision=DOT_PRECISION)
        if HAS_REL:
            row_sum = tl.sum(dlogits, axis=1)
            row_coef += tl.where(offs_t[None, :] == row_index[:, None], row_sum[:, None], 0.0)
            col_dlogits += dlogits

    if HAS_REL:
        # Scatter the per-key-column dlogits to window columns once per tile (mirror of the gather).
        col_coef = tl.zeros((BLOCK_Q, KPAD), dtype=tl.float32)
        for t in tl.static_range(KSIZE):
            col_sum = tl.sum(tl.where(col_index == t, col_dlogits, 0.0), axis=1)
            col_coef += tl.where(offs_t[None, :] == t, col_sum[:, None], 0.0)
        dq += tl.dot(row_coef, rel_rows, input_precision=DOT_PRECISION)
        dq += tl.dot(col_coef, rel_cols, input_precision=DOT_PRECISION)
        # Partial gradients of the tables for this tile: drel[t, :Dr] = sum_q row_coef[q, t] q[q, :Dr]
        # (and the column half likewise); torch sums the tiles, so no atomics are needed.
        drel_rows = tl.dot(tl.trans(row_coef), q.to(tl.float32), input_precision=DOT_PRECISION)
        drel_cols = tl.dot(tl.trans(col_coef), q.to(tl.float32), input_precision=DOT_PRECISION)
        drel = tl.where(offs_d[None, :] < D_ROWS, drel_rows, drel_cols) * scale
        drel_ptrs = DREL + pid.to(tl.int64) * KSIZE * D + offs_t[:, None] * D + offs_d[None, :]
        tl.store(drel_ptrs, drel, mask=(offs_t[:, None] < KSIZE) & d_ok[None, :])

    dq = dq * scale
    tl.store(_tile_ptrs(DQ, batch, head, q_row, q_col, stride_dqb, stride_dqh, stride_dqw, stride_dqn,
                        stride_dqd, BLOCK_D), dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _local_attn_bwd_dkdv_kernel(
    Q, K, V, REL_ROWS, REL_COLS, DY, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vn, stride_vd,
    stride_dyb, stride_dyh, stride_dyw, stride_dyn, stride_dyd,
    stride_dkb, stride_dkh, stride_dkw, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvw, stride_dvn, stride_dvd,
    stride_rrn, stride_rrt, stride_rrd, stride_rcn, stride_rct, stride_rcd,
    H, W, heads, n_tiles_w, n_tiles, scale,
    D: tl.constexpr, D_ROWS: tl.constexpr, KSIZE: tl.constexpr, DILATION: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, QUERY_W: tl.constexpr,
    KPAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Key-stationary: a tile of keys walks the haloed query rows that can see it.
    RADIUS: tl.constexpr = DILATION * (KSIZE // 2)
    BLOCK_K: tl.constexpr = BLOCK_H * BLOCK_W
    pid, batch_head, batch, head, row0, col0, k_row, k_col, k_in = _program_tile(
        n_tiles, n_tiles_w, heads, H, W, BLOCK_H, BLOCK_W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    k_mask = k_in[:, None] & d_ok[None, :]
    kt = tl.load(_tile_ptrs(K, batch, head, k_row, k_col, stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
                            BLOCK_D), mask=k_mask, other=0.0)
    vt = tl.load(_tile_ptrs(V, batch, head, k_row, k_col, stride_vb, stride_vh, stride_vw, stride_vn, stride_vd,
                            BLOCK_D), mask=k_mask, other=0.0)

    query_col = col0 - RADIUS + tl.arange(0, QUERY_W)
    query_col_in = (query_col >= 0) & (query_col < W)
    # Window column of key (row of this tile) as seen from each query column: (BLOCK_K, QUERY_W).
    col_offset = k_col[:, None] - query_col[None, :] + RADIUS
    col_ok = (col_offset >= 0) & (col_offset <= 2 * RADIUS) & (col_offset % DILATION == 0)
    col_index = tl.where(col_ok, col_offset // DILATION, -1)
    if HAS_REL:
        rel_rows, rel_cols = _load_rel_tables(REL_ROWS, REL_COLS, head, stride_rrn, stride_rrt, stride_rrd,
                                              stride_rcn, stride_rct, stride_rcd, D, D_ROWS, KSIZE, KPAD, BLOCK_D)
    qk_scale = scale * 1.4426950408889634

    q_base = Q + batch * stride_qb + head * stride_qn
    dy_base = DY + batch * stride_dyb + head * stride_dyn
    dk = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    for query_step in range(0, BLOCK_H + 2 * RADIUS):
        query_row = row0 - RADIUS + query_step
        query_rows = query_row + tl.zeros_like(query_col)
        query_in = query_col_in & (query_rows >= 0) & (query_rows < H)
        query_mask = query_in[:, None] & d_ok[None, :]
        q = tl.load(q_base + query_row.to(tl.int64) * stride_qh + query_col[:, None] * stride_qw
                    + offs_d[None, :] * stride_qd, mask=query_mask, other=0.0)
        dy = tl.load(dy_base + query_row.to(tl.int64) * stride_dyh + query_col[:, None] * stride_dyw
                     + offs_d[None, :] * stride_dyd, mask=query_mask, other=0.0)
        stat_offsets = batch_head.to(tl.int64) * H * W + query_row * W + query_col
        lse2 = tl.load(LSE + stat_offsets, mask=query_in, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + stat_offsets, mask=query_in, other=0.0)

        logits = tl.dot(kt, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_K, QUERY_W)
        row_offset = k_row - query_row + RADIUS
        row_ok = (row_offset >= 0) & (row_offset <= 2 * RADIUS) & (row_offset % DILATION == 0)
        if HAS_REL:
            q32 = q.to(tl.float32)
            row_logits = tl.dot(q32, tl.trans(rel_rows), input_precision=DOT_PRECISION)  # (QUERY_W, KPAD)
            col_logits = tl.dot(q32, tl.trans(rel_cols), input_precision=DOT_PRECISION)
            row_index = tl.where(row_ok, row_offset // DILATION, -1)
            logits += _gather_columns_transposed(row_logits, row_index[:, None] + 0 * col_index, KSIZE, KPAD)
            logits += _gather_columns_transposed(col_logits, col_index, KSIZE, KPAD)
        valid = row_ok[:, None] & col_ok & query_in[None, :]
        if MASK_PADDING:
            valid = valid & k_in[:, None]
        p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[None, :]), 0.0)
        dv += tl.dot(p.to(dy.dtype), dy, input_precision=DOT_PRECISION)
        dp = tl.dot(vt, tl.trans(dy), input_precision=DOT_PRECISION)
        dlogits = p * (dp - delta[None, :])
        dk += tl.dot(dlogits.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk = dk * scale
    tl.store(_tile_ptrs(DK, batch, head, k_row, k_col, stride_dkb, stride_dkh, stride_dkw, stride_dkn,
                        stride_dkd, BLOCK_D), dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(_tile_ptrs(DV, batch, head, k_row, k_col, stride_dvb, stride_dvh, stride_dvw, stride_dvn,
                        stride_dvd, BLOCK_D), dv.to(DV.dtype.element_ty), mask=k_mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _rel_args(rel_rows, rel_cols, q):
    """Tables and their (head, tap, channel) strides; stride 0 over heads when shared."""
    if rel_rows is None:
        dummy = q.new_empty(1)
        return (dummy, dummy), (0, 0, 0, 0, 0, 0)

    def strides(rel):
        return (0, *rel.stride()) if rel.dim() == 2 else tuple(rel.stride())
    return (rel_rows, rel_cols), strides(rel_rows) + strides(rel_cols)


def _meta(q, kernel_size, dilation, padding, has_rel, config, halo_name):
    head_dim = q.shape[-1]
    return dict(
        D=head_dim, D_ROWS=head_dim // 2, KSIZE=kernel_size, DILATION=dilation, HAS_REL=int(has_rel),
        MASK_PADDING=int(padding == "mask"), DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_H=config["BLOCK_H"], BLOCK_W=config["BLOCK_W"],
        KPAD=max(16, tuning.next_power_of_2(kernel_size)),
        BLOCK_D=max(16, tuning.next_power_of_2(head_dim)),
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        **{halo_name: tuning.halo_width(config["BLOCK_W"], kernel_size, dilation)},
    )


def _tiles(q, config):
    B, H, W, heads, _ = q.shape
    n_tiles_w = triton.cdiv(W, config["BLOCK_W"])
    n_tiles = triton.cdiv(H, config["BLOCK_H"]) * n_tiles_w
    return (H, W, heads, n_tiles_w, n_tiles), (B * heads * n_tiles,)


# Each *_launch returns (grid, positional args, meta-parameters) for one kernel; the launchers
# and static_specs (compilation for a GPU that is not present) share them.

def _fwd_launch(q, k, v, rel_rows, rel_cols, y, lse, kernel_size, dilation, scale, padding, config):
    rel, rel_strides = _rel_args(rel_rows, rel_cols, q)
    sizes, grid = _tiles(q, config)
    args = (q, k, v, *rel, y, lse, *q.stride(), *k.stride(), *v.stride(), *y.stride(), *rel_strides,
            *sizes, scale * LOG2E)
    return grid, args, _meta(q, kernel_size, dilation, padding, rel_rows is not None, config, "KEY_W")


def _dq_launch(q, k, v, rel_rows, rel_cols, y, dy, lse, delta, dq, drel, kernel_size, dilation, scale,
               padding, config):
    rel, rel_strides = _rel_args(rel_rows, rel_cols, q)
    sizes, grid = _tiles(q, config)
    args = (q, k, v, *rel, y, dy, lse, delta, dq, drel, *q.stride(), *k.stride(), *v.stride(), *y.stride(),
            *dy.stride(), *dq.stride(), *rel_strides, *sizes, scale)
    return grid, args, _meta(q, kernel_size, dilation, padding, rel_rows is not None, config, "KEY_W")


def _dkdv_launch(q, k, v, rel_rows, rel_cols, dy, lse, delta, dk, dv, kernel_size, dilation, scale, padding,
                 config):
    rel, rel_strides = _rel_args(rel_rows, rel_cols, q)
    sizes, grid = _tiles(q, config)
    args = (q, k, v, *rel, dy, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(), *dy.stride(),
            *dk.stride(), *dv.stride(), *rel_strides, *sizes, scale)
    return grid, args, _meta(q, kernel_size, dilation, padding, rel_rows is not None, config, "QUERY_W")


def _config(kernel, q, kernel_size, dilation, run=None):
    """The launch config for `kernel` on q's shape; `run(config)` launches the kernel once on the
    real arguments, for the autotuner to time candidates with when nothing is cached."""
    B, H, W, heads, D = q.shape
    if is_fake(q):  # tracing under torch.compile: nothing to time, the config is fixed at trace time
        run = None
    return tuning.get_config(kernel, kernel_size, dilation, D, q.dtype, H, W, run=run)


def _fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, y=None, lse=None, config=None):
    """Launch the forward kernel. Returns y (B, H, W, heads, D) and lse (B, heads, H, W) fp32.

    `y`/`lse` may be passed in (the tests poison them to prove every element is written).
    """
    y, lse = attention_outputs(q, y, lse)
    if y.numel() == 0:
        return y, lse

    def run(cfg):
        grid, args, meta = _fwd_launch(q, k, v, rel_rows, rel_cols, y, lse, kernel_size, dilation, scale,
                                       padding, cfg)
        launchable(_local_attn_fwd_kernel)[grid](*args, **meta)

    run(config or _config("local_fwd", q, kernel_size, dilation, run))
    return y, lse


def _drel_buffer(q, kernel_size, has_rel, config):
    """Per-program partial gradients of the relative tables, (programs, k, D) fp32."""
    n_programs = _tiles(q, config)[1][0]
    shape = (n_programs, kernel_size, q.shape[-1]) if has_rel else (1,)
    return torch.empty(shape, device=q.device, dtype=torch.float32)


def _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation, scale, padding,
         grads=None, config_dq=None, config_dkdv=None):
    """Launch the backward kernels. Returns dq, dk, dv, d rel_rows, d rel_cols (None without rel).

    `grads` may hold preallocated (dq, dk, dv) buffers (the tests poison them).
    """
    B, H, W, heads, D = q.shape
    if grads is None:
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    dq, dk, dv = grads
    has_rel = rel_rows is not None
    if q.numel() == 0:
        zero = lambda t: None if t is None else torch.zeros_like(t)
        return dq, dk, dv, zero(rel_rows), zero(rel_cols)
    delta = torch.empty_like(lse)

    def run_dq(cfg):  # the partial-gradient buffer has one slice per program, so per config
        drel = _drel_buffer(q, kernel_size, has_rel, cfg)
        grid, args, meta = _dq_launch(q, k, v, rel_rows, rel_cols, y, dy, lse, delta, dq, drel, kernel_size,
                                      dilation, scale, padding, cfg)
        launchable(_local_attn_bwd_dq_kernel)[grid](*args, **meta)
        return drel

    def run_dkdv(cfg):
        grid, args, meta = _dkdv_launch(q, k, v, rel_rows, rel_cols, dy, lse, delta, dk, dv, kernel_size,
                                        dilation, scale, padding, cfg)
        launchable(_local_attn_bwd_dkdv_kernel)[grid](*args, **meta)

    drel = run_dq(config_dq or _config("local_bwd_dq", q, kernel_size, dilation, run_dq))
    run_dkdv(config_dkdv or _config("local_bwd_dkdv", q, kernel_size, dilation, run_dkdv))  # reads delta
    drel_rows = drel_cols = None
    if has_rel:
        # (B, heads, tiles, k, D) -> (heads, k, D): a deterministic sum over batch and tiles.
        per_head = drel.view(B, heads, -1, kernel_size, D).sum(dim=(0, 2))
        d_rows = D // 2
        drel_rows, drel_cols = per_head[..., :d_rows], per_head[..., d_rows:]
        # Shared tables sum over heads; per-head ones are copied out of `per_head` (an op's
        # outputs may not alias each other).
        drel_rows = drel_rows.sum(0) if rel_rows.dim() == 2 else drel_rows.clone()
        drel_cols = drel_cols.sum(0) if rel_cols.dim() == 2 else drel_cols.clone()
        drel_rows = drel_rows.to(rel_rows.dtype)
        drel_cols = drel_cols.to(rel_cols.dtype)
    return dq, dk, dv, drel_rows, drel_cols


def static_specs(shape=(32, 56, 56, 8, 64), dtype=torch.bfloat16, kernel_size=7, dilation=1, padding="zeros",
                 has_rel=True, configs=None):
    """KernelSpecs of the forward, dq and dk/dv kernels exactly as a launch on contiguous tensors of
    `shape` (B, H, W, heads, D) would compile them (meta tensors: nothing is allocated or run).

    configs: optional {"local_fwd": cfg, "local_bwd_dq": cfg, "local_bwd_dkdv": cfg} overrides.
    """
    from .._compile import spec_from_launch

    configs = configs or {}
    q = torch.empty(shape, dtype=dtype, device="meta")
    k, v, y, dy, dq, dk, dv = (torch.empty_like(q) for _ in range(7))
    B, H, W, heads, D = shape
    rel_rows = torch.empty(kernel_size, D // 2, device="meta") if has_rel else None
    rel_cols = torch.empty(kernel_size, D - D // 2, device="meta") if has_rel else None
    lse = torch.empty((B, heads, H, W), device="meta")
    delta = torch.empty_like(lse)

    def config(name):
        return configs.get(name) or _config(name, q, kernel_size, dilation)

    common = dict(kernel_size=kernel_size, dilation=dilation, scale=1.0, padding=padding)
    fwd = _fwd_launch(q, k, v, rel_rows, rel_cols, y, lse, config=config("local_fwd"), **common)
    drel = _drel_buffer(q, kernel_size, has_rel, config("local_bwd_dq"))
    dq_launch = _dq_launch(q, k, v, rel_rows, rel_cols, y, dy, lse, delta, dq, drel,
                           config=config("local_bwd_dq"), **common)
    dkdv = _dkdv_launch(q, k, v, rel_rows, rel_cols, dy, lse, delta, dk, dv, config=config("local_bwd_dkdv"),
                        **common)
    return [
        spec_from_launch("local_fwd", _local_attn_fwd_kernel, *fwd[1:]),
        spec_from_launch("local_bwd_dq", _local_attn_bwd_dq_kernel, *dq_launch[1:]),
        spec_from_launch("local_bwd_dkdv", _local_attn_bwd_dkdv_kernel, *dkdv[1:]),
    ]


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.compile sees them whole: no graph break) and their autograd
# ----------------------------------------------------------------------------------------------

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
    dq, dk, dv, drel_rows, drel_cols = _bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation,
                                            scale, padding)
    if rel_rows is None:  # ops return tensors only: empty stand-ins, mapped back to None below
        drel_rows, drel_cols = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, drel_rows, drel_cols


@_local_attention2d_bwd.register_fake
def _(q, k, v, rel_rows, rel_cols, y, lse, dy, kernel_size, dilation, scale, padding):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
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
    dq, dk, dv, drel_rows, drel_cols = _local_attention2d_bwd(q, k, v, rel_rows, rel_cols, y, lse, dy, *ctx.args)
    if rel_rows is None:
        drel_rows = drel_cols = None
    return dq, dk, dv, drel_rows, drel_cols, None, None, None, None


_local_attention2d_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    """
    check_local_attention_args(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)
    if resolve_backend(backend, q.device) == "reference":
        from ..reference import local_attention2d as reference_op
        return reference_op(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding)
    q, k, v = autocast_inputs(q, k, v)
    check_kernel_dtype("q", q)
    for name, rel in (("rel_rows", rel_rows), ("rel_cols", rel_cols)):
        if rel is not None:
            check_kernel_dtype(name, rel)
    y, _ = _local_attention2d_fwd(q, k, v, rel_rows, rel_cols, kernel_size, dilation, float(scale), padding)
    return y
