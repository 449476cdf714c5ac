"""Spatially-aware attention of the stem (SPEC section 2): Triton forward and backward kernels.

Algorithm: y_ij = sum_ab softmax_ab(scale * q_ij . k_ab) * sum_m mix[a, b, m] * V_m[ab], with (a, b)
the key's place in the query's block (window="block", the paper) or in its centred window
(window="sliding"). A program owns a tile of queries and streams tiles of keys: for the block
window, chunks of the pixels of GROUP whole blocks (GROUP * bs * bs pixels, so a 4x4 block is a
16-row tile and no query-key pair of the dots is wasted); for the sliding window, a
BLOCK_H x BLOCK_W query tile walks its haloed key rows as the local attention kernels do. The
block window's mixing weight depends on the key only, so each key's M value rows are read once and
mixed on chip into one value row (vmix) and p @ vmix is a single tensor-core dot; the sliding
window's weight depends on the (query, key) pair, so it takes M dots (p * mix_m) @ V_m.
Softmax is online, in fp32 with exp2; y and one log-sum-exp per (pixel, head) are all that is
stored: no mixed value tensor, nothing of size bs * bs per pixel.

Backward (flash-attention style, no atomics, deterministic): a query-stationary kernel recomputes
the probabilities from the log-sum-exp and gives dq and delta = rowsum(dy * y); a key-stationary
kernel gives dk, every dV_m and per-program partial sums of dmix (summed by torch). Trade-off of
the sliding window: its key-stationary kernel recomputes the probabilities once more per value map.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .. import tuning
from .._library import attention_outputs, autocast_inputs, define_op, differentiable_backward, launch
from .._utils import (check_kernel_dtype, check_spatial_attention_args, dot_precision, interpreter_enabled,
                      resolve_backend, transforms_active)

LOG2E = 1.4426950408889634


@triton.jit
def _block_pixels(f, block_row, group_col, BS: tl.constexpr, GROUP: tl.constexpr):
    """Pixels of flat indices f of a group of GROUP blocks (block row block_row, the GROUP blocks
    from block column group_col * GROUP): f = block * BS * BS + a * BS + b. Returns row, column,
    block of the group and (a, b), the place inside the block."""
    blk = f // (BS * BS)
    a = (f % (BS * BS)) // BS
    b = f % BS
    return block_row * BS + a, (group_col * GROUP + blk) * BS + b, blk, a, b


@triton.jit
def _block_steps(chunk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr, GROUP: tl.constexpr):
    """Range of the BLOCK_N-pixel chunks that cover the blocks touched by BLOCK_M-pixel chunk `chunk`."""
    first = (chunk * BLOCK_M) // (BS * BS)
    last = tl.minimum((chunk * BLOCK_M + BLOCK_M - 1) // (BS * BS), GROUP - 1)
    return (first * BS * BS) // BLOCK_N, ((last + 1) * BS * BS - 1) // BLOCK_N + 1


@triton.jit
def _mixed_values(v_ptrs, stride_vm, kv_mask, w_ptrs, stride_wm, w_mask, M: tl.constexpr):
    """vmix[key] = sum_m mix[a, b, m] * V_m[key] in fp32, for a weight that depends on the key only."""
    w = tl.load(w_ptrs, mask=w_mask, other=0.0).to(tl.float32)
    vmix = w[:, None] * tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)
    for m in range(1, M):
        w = tl.load(w_ptrs + m * stride_wm, mask=w_mask, other=0.0).to(tl.float32)
        vmix += w[:, None] * tl.load(v_ptrs + m * stride_vm, mask=kv_mask, other=0.0).to(tl.float32)
    return vmix


@triton.jit
def _scatter_rows(dmix, values, index, m, ABPAD: tl.constexpr, MPAD: tl.constexpr):
    """dmix[index[i], m] += values[i] for a (ABPAD, MPAD) table: a one-hot reduction, no atomics."""
    offs_ab = tl.arange(0, ABPAD)
    offs_mm = tl.arange(0, MPAD)
    binned = tl.sum(tl.where(index[:, None] == offs_ab[None, :], values[:, None], 0.0), axis=0)
    return dmix + tl.where(offs_mm[None, :] == m, binned[:, None], 0.0)


@triton.jit
def _spatial_fwd_kernel(
    Q, K, V, MIX, Y, LSE,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vm, stride_vn, stride_vd,
    stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
    stride_xa, stride_xb, stride_xm,
    H, W, heads, n_tiles_w, n_tiles, qk_scale,
    D: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, WINDOW: tl.constexpr,
    MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # WINDOW 0: block (queries = chunk of GROUP blocks, keys = chunks of the same blocks);
    # WINDOW 1: sliding (queries = BLOCK_M // TILE_W x TILE_W tile, keys = haloed rows of BLOCK_N).
    N_GROUP: tl.constexpr = GROUP * BS * BS
    LO: tl.constexpr = BS // 2
    pid = tl.program_id(0)
    batch_head = pid // n_tiles
    tile = pid % n_tiles
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    if WINDOW == 0:
        N_CHUNKS: tl.constexpr = (N_GROUP + BLOCK_M - 1) // BLOCK_M
        chunk = tile % N_CHUNKS
        block_row = (tile // N_CHUNKS) // n_tiles_w
        group_col = (tile // N_CHUNKS) % n_tiles_w
        fq = chunk * BLOCK_M + offs_m
        q_row, q_col, q_blk, q_a, q_b = _block_pixels(fq, block_row, group_col, BS, GROUP)
        q_in = (fq < N_GROUP) & (q_row < H) & (q_col < W)
        step_lo, step_hi = _block_steps(chunk, BLOCK_M, BLOCK_N, BS, GROUP)
    else:
        TILE_H: tl.constexpr = BLOCK_M // TILE_W
        row0 = (tile // n_tiles_w) * TILE_H
        col0 = (tile % n_tiles_w) * TILE_W
        q_row = row0 + offs_m // TILE_W
        q_col = col0 + offs_m % TILE_W
        q_in = (q_row < H) & (q_col < W)
        step_lo = 0
        step_hi = TILE_H + BS - 1
        # The key columns and the window column b of each (query, key) pair are the same for
        # every key row: computed once per tile.
        k_col = col0 - LO + offs_n
        k_col_in = (k_col >= 0) & (k_col < W)
        pair_b = k_col[None, :] - q_col[:, None] + LO
        col_ok = (pair_b >= 0) & (pair_b < BS)
        mix_cols = MIX + pair_b * stride_xb

    q_row64 = q_row.to(tl.int64)[:, None]
    q = tl.load(Q + batch * stride_qb + head * stride_qn + q_row64 * stride_qh + q_col[:, None] * stride_qw
                + offs_d[None, :] * stride_qd, mask=q_in[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for step in range(step_lo, step_hi):
        if WINDOW == 0:
            fk = step * BLOCK_N + offs_n
            k_row, k_col, k_blk, k_a, k_b = _block_pixels(fk, block_row, group_col, BS, GROUP)
            k_exists = fk < N_GROUP
            k_in = k_exists & (k_row < H) & (k_col < W)
            pair_ok = (q_blk[:, None] == k_blk[None, :]) & k_exists[None, :]
        else:
            # A vector of the row, not a scalar: the interpreter turns (tensor & scalar bool) into ints.
            k_row = (row0 - LO + step) + tl.zeros_like(k_col)
            k_in = k_col_in & (k_row >= 0) & (k_row < H)
            pair_a = (row0 - LO + step) - q_row + LO  # window row a of the pair, per query
            pair_ok = ((pair_a >= 0) & (pair_a < BS))[:, None] & col_ok
            mix_rows = mix_cols + (pair_a * stride_xa)[:, None]
        kv_mask = k_in[:, None] & d_ok[None, :]
        k_row64 = k_row.to(tl.int64)[:, None]
        kt = tl.load(K + batch * stride_kb + head * stride_kn + k_row64 * stride_kh + k_col[:, None] * stride_kw
                     + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v_ptrs = (V + batch * stride_vb + head * stride_vn + k_row64 * stride_vh + k_col[:, None] * stride_vw
                  + offs_d[None, :] * stride_vd)

        logits = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        valid = pair_ok
        if MASK_PADDING:
            valid = valid & k_in[None, :]
        logits = tl.where(valid, logits * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet stay at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(logits - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if WINDOW == 0:
            vmix = _mixed_values(v_ptrs, stride_vm, kv_mask, MIX + k_a * stride_xa + k_b * stride_xb,
                                 stride_xm, k_exists, M)
            pv = tl.dot(p.to(kt.dtype), vmix.to(kt.dtype), input_precision=DOT_PRECISION)
        else:
            pv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for m in range(M):
                w = tl.load(mix_rows + m * stride_xm, mask=pair_ok, other=0.0)
                vm = tl.load(v_ptrs + m * stride_vm, mask=kv_mask, other=0.0)
                pv += tl.dot((p * w.to(tl.float32)).to(vm.dtype), vm, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    y = acc / l_safe[:, None]
    tl.store(Y + batch * stride_yb + head * stride_yn + q_row64 * stride_yh + q_col[:, None] * stride_yw
             + offs_d[None, :] * stride_yd, y.to(Y.dtype.element_ty), mask=q_in[:, None] & d_ok[None, :])
    # Natural-log LSE of the scaled logits; m_i is in log2 units.
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + batch_head.to(tl.int64) * H * W + q_row * W + q_col, lse, mask=q_in)


@triton.jit
def _spatial_bwd_dq_kernel(
    Q, K, V, MIX, Y, DY, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vm, stride_vn, stride_vd,
    stride_yb, stride_yh, stride_yw, stride_yn, stride_yd,
    stride_dyb, stride_dyh, stride_dyw, stride_dyn, stride_dyd,
    stride_dqb, stride_dqh, stride_dqw, stride_dqn, stride_dqd,
    stride_xa, stride_xb, stride_xm,
    H, W, heads, n_tiles_w, n_tiles, scale,
    D: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, WINDOW: tl.constexpr,
    MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Query-stationary: the forward's tiling; dq = scale * sum_key dlogit * k, and delta.
    N_GROUP: tl.constexpr = GROUP * BS * BS
    LO: tl.constexpr = BS // 2
    pid = tl.program_id(0)
    batch_head = pid // n_tiles
    tile = pid % n_tiles
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    if WINDOW == 0:
        N_CHUNKS: tl.constexpr = (N_GROUP + BLOCK_M - 1) // BLOCK_M
        chunk = tile % N_CHUNKS
        block_row = (tile // N_CHUNKS) // n_tiles_w
        group_col = (tile // N_CHUNKS) % n_tiles_w
        fq = chunk * BLOCK_M + offs_m
        q_row, q_col, q_blk, q_a, q_b = _block_pixels(fq, block_row, group_col, BS, GROUP)
        q_in = (fq < N_GROUP) & (q_row < H) & (q_col < W)
        step_lo, step_hi = _block_steps(chunk, BLOCK_M, BLOCK_N, BS, GROUP)
    else:
        TILE_H: tl.constexpr = BLOCK_M // TILE_W
        row0 = (tile // n_tiles_w) * TILE_H
        col0 = (tile % n_tiles_w) * TILE_W
        q_row = row0 + offs_m // TILE_W
        q_col = col0 + offs_m % TILE_W
        q_in = (q_row < H) & (q_col < W)
        step_lo = 0
        step_hi = TILE_H + BS - 1
        # The key columns and the window column b of each (query, key) pair are the same for
        # every key row: computed once per tile.
        k_col = col0 - LO + offs_n
        k_col_in = (k_col >= 0) & (k_col < W)
        pair_b = k_col[None, :] - q_col[:, None] + LO
        col_ok = (pair_b >= 0) & (pair_b < BS)
        mix_cols = MIX + pair_b * stride_xb

    q_mask = q_in[:, None] & d_ok[None, :]
    q_row64 = q_row.to(tl.int64)[:, None]
    q = tl.load(Q + batch * stride_qb + head * stride_qn + q_row64 * stride_qh + q_col[:, None] * stride_qw
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    dy = tl.load(DY + batch * stride_dyb + head * stride_dyn + q_row64 * stride_dyh + q_col[:, None] * stride_dyw
                 + offs_d[None, :] * stride_dyd, mask=q_mask, other=0.0)
    y = tl.load(Y + batch * stride_yb + head * stride_yn + q_row64 * stride_yh + q_col[:, None] * stride_yw
                + offs_d[None, :] * stride_yd, mask=q_mask, other=0.0)
    delta = tl.sum(dy.to(tl.float32) * y.to(tl.float32), axis=1)
    stat_offsets = batch_head.to(tl.int64) * H * W + q_row * W + q_col
    tl.store(DELTA + stat_offsets, delta, mask=q_in)
    lse2 = tl.load(LSE + stat_offsets, mask=q_in, other=0.0) * 1.4426950408889634
    qk_scale = scale * 1.4426950408889634

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for step in range(step_lo, step_hi):
        if WINDOW == 0:
            fk = step * BLOCK_N + offs_n
            k_row, k_col, k_blk, k_a, k_b = _block_pixels(fk, block_row, group_col, BS, GROUP)
            k_exists = fk < N_GROUP
            k_in = k_exists & (k_row < H) & (k_col < W)
            pair_ok = (q_blk[:, None] == k_blk[None, :]) & k_exists[None, :]
        else:
            k_row = (row0 - LO + step) + tl.zeros_like(k_col)
            k_in = k_col_in & (k_row >= 0) & (k_row < H)
            pair_a = (row0 - LO + step) - q_row + LO
            pair_ok = ((pair_a >= 0) & (pair_a < BS))[:, None] & col_ok
            mix_rows = mix_cols + (pair_a * stride_xa)[:, None]
        kv_mask = k_in[:, None] & d_ok[None, :]
        k_row64 = k_row.to(tl.int64)[:, None]
        kt = tl.load(K + batch * stride_kb + head * stride_kn + k_row64 * stride_kh + k_col[:, None] * stride_kw
                     + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v_ptrs = (V + batch * stride_vb + head * stride_vn + k_row64 * stride_vh + k_col[:, None] * stride_vw
                  + offs_d[None, :] * stride_vd)

        logits = tl.dot(q, tl.trans(kt), input_precision=DOT_PRECISION)
        valid = pair_ok & q_in[:, None]
        if MASK_PADDING:
            valid = valid & k_in[None, :]
        p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[:, None]), 0.0)
        if WINDOW == 0:
            vmix = _mixed_values(v_ptrs, stride_vm, kv_mask, MIX + k_a * stride_xa + k_b * stride_xb,
                                 stride_xm, k_exists, M)
            dp = tl.dot(dy, tl.trans(vmix.to(dy.dtype)), input_precision=DOT_PRECISION)
        else:
            dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for m in range(M):
                w = tl.load(mix_rows + m * stride_xm, mask=pair_ok, other=0.0)
                vm = tl.load(v_ptrs + m * stride_vm, mask=kv_mask, other=0.0)
                dp += w.to(tl.float32) * tl.dot(dy, tl.trans(vm), input_precision=DOT_PRECISION)
        dlogits = p * (dp - delta[:, None])  # gradient of the scaled logit
        dq += tl.dot(dlogits.to(kt.dtype), kt, input_precision=DOT_PRECISION)

    dq = dq * scale
    tl.store(DQ + batch * stride_dqb + head * stride_dqn + q_row64 * stride_dqh + q_col[:, None] * stride_dqw
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _spatial_bwd_dkdv_kernel(
    Q, K, V, MIX, DY, LSE, DELTA, DK, DV, DMIX,
    stride_qb, stride_qh, stride_qw, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kw, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vw, stride_vm, stride_vn, stride_vd,
    stride_dyb, stride_dyh, stride_dyw, stride_dyn, stride_dyd,
    stride_dkb, stride_dkh, stride_dkw, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvw, stride_dvm, stride_dvn, stride_dvd,
    stride_xa, stride_xb, stride_xm,
    H, W, heads, n_tiles_w, n_tiles, n_programs, scale,
    D: tl.constexpr, BS: tl.constexpr, M: tl.constexpr, WINDOW: tl.constexpr,
    MASK_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_D: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr, ABPAD: tl.constexpr, MPAD: tl.constexpr,
):
    # Key-stationary: a program walks TILES_PER_PROGRAM key tiles (BLOCK_M keys each) and, per
    # tile, the query tiles (BLOCK_N queries) that can see them. Its partial dmix goes to row pid.
    N_GROUP: tl.constexpr = GROUP * BS * BS
    LO: tl.constexpr = BS // 2
    pid = tl.program_id(0)
    batch_head = pid // n_programs
    tile_lo = (pid % n_programs) * TILES_PER_PROGRAM
    tile_hi = tl.minimum(tile_lo + TILES_PER_PROGRAM, n_tiles)
    batch = (batch_head // heads).to(tl.int64)
    head = batch_head % heads
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qk_scale = scale * 1.4426950408889634
    q_base = Q + batch * stride_qb + head * stride_qn
    dy_base = DY + batch * stride_dyb + head * stride_dyn
    stat_base = batch_head.to(tl.int64) * H * W

    dmix = tl.zeros((ABPAD, MPAD), dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        if WINDOW == 0:
            N_CHUNKS: tl.constexpr = (N_GROUP + BLOCK_M - 1) // BLOCK_M
            chunk = tile % N_CHUNKS
            block_row = (tile // N_CHUNKS) // n_tiles_w
            group_col = (tile // N_CHUNKS) % n_tiles_w
            fk = chunk * BLOCK_M + offs_m
            k_row, k_col, k_blk, k_a, k_b = _block_pixels(fk, block_row, group_col, BS, GROUP)
            k_exists = fk < N_GROUP
            k_in = k_exists & (k_row < H) & (k_col < W)
        else:
            TILE_H: tl.constexpr = BLOCK_M // TILE_W
            row0 = (tile // n_tiles_w) * TILE_H
            col0 = (tile % n_tiles_w) * TILE_W
            k_row = row0 + offs_m // TILE_W
            k_col = col0 + offs_m % TILE_W
            k_in = (k_row < H) & (k_col < W)
        k_mask = k_in[:, None] & d_ok[None, :]
        k_row64 = k_row.to(tl.int64)[:, None]
        kt = tl.load(K + batch * stride_kb + head * stride_kn + k_row64 * stride_kh + k_col[:, None] * stride_kw
                     + offs_d[None, :] * stride_kd, mask=k_mask, other=0.0)
        v_ptrs = (V + batch * stride_vb + head * stride_vn + k_row64 * stride_vh + k_col[:, None] * stride_vw
                  + offs_d[None, :] * stride_vd)
        dv_ptrs = (DV + batch * stride_dvb + head * stride_dvn + k_row64 * stride_dvh + k_col[:, None] * stride_dvw
                   + offs_d[None, :] * stride_dvd)
        dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

        if WINDOW == 0:
            # The weight of a key depends on the key only: dV_m = mix[a, b, m] * dvmix and
            # dmix[a, b, m] = sum over keys at (a, b) of dvmix . V_m, with dvmix = p^T @ dy.
            w_ptrs = MIX + k_a * stride_xa + k_b * stride_xb
            vmix = _mixed_values(v_ptrs, stride_vm, k_mask, w_ptrs, stride_xm, k_exists, M).to(kt.dtype)
            dvmix = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            step_lo, step_hi = _block_steps(chunk, BLOCK_M, BLOCK_N, BS, GROUP)
            for step in range(step_lo, step_hi):
                fq = step * BLOCK_N + offs_n
                q_row, q_col, q_blk, q_a, q_b = _block_pixels(fq, block_row, group_col, BS, GROUP)
                q_in = (fq < N_GROUP) & (q_row < H) & (q_col < W)
                q_mask = q_in[:, None] & d_ok[None, :]
                q_offsets = q_row.to(tl.int64)[:, None] * stride_qh + q_col[:, None] * stride_qw
                q = tl.load(q_base + q_offsets + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
                dy = tl.load(dy_base + q_row.to(tl.int64)[:, None] * stride_dyh + q_col[:, None] * stride_dyw
                             + offs_d[None, :] * stride_dyd, mask=q_mask, other=0.0)
                stat_offsets = stat_base + q_row * W + q_col
                lse2 = tl.load(LSE + stat_offsets, mask=q_in, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + stat_offsets, mask=q_in, other=0.0)

                logits = tl.dot(kt, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_M keys, BLOCK_N queries)
                valid = (k_blk[:, None] == q_blk[None, :]) & q_in[None, :]
                if MASK_PADDING:
                    valid = valid & k_in[:, None]
                p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[None, :]), 0.0)
                dvmix += tl.dot(p.to(dy.dtype), dy, input_precision=DOT_PRECISION)
                dp = tl.dot(vmix, tl.trans(dy), input_precision=DOT_PRECISION)
                dlogits = p * (dp - delta[None, :])
                dk += tl.dot(dlogits.to(q.dtype), q, input_precision=DOT_PRECISION)
            for m in range(M):
                w = tl.load(w_ptrs + m * stride_xm, mask=k_exists, other=0.0).to(tl.float32)
                tl.store(dv_ptrs + m * stride_dvm, (w[:, None] * dvmix).to(DV.dtype.element_ty), mask=k_mask)
                vm = tl.load(v_ptrs + m * stride_vm, mask=k_mask, other=0.0).to(tl.float32)
                dmix = _scatter_rows(dmix, tl.sum(dvmix * vm, axis=1), k_a * BS + k_b, m, ABPAD, MPAD)
        else:
            # Pass 1: dk and dmix; the weight depends on the (query, key) pair, so dp sums M dots.
            QUERY_STEPS: tl.constexpr = TILE_H + BS - 1
            q_col = col0 + LO - BS + 1 + offs_n
            q_col_in = (q_col >= 0) & (q_col < W)
            pair_b = k_col[:, None] - q_col[None, :] + LO  # window column b of each (key, query) pair
            col_ok = (pair_b >= 0) & (pair_b < BS)
            mix_cols = MIX + pair_b * stride_xb
            offs_ab = tl.arange(0, ABPAD)
            offs_mm = tl.arange(0, MPAD)
            for step in range(0, QUERY_STEPS):
                q_row = (row0 + LO - BS + 1 + step) + tl.zeros_like(q_col)
                q_in = q_col_in & (q_row >= 0) & (q_row < H)
                q_mask = q_in[:, None] & d_ok[None, :]
                q = tl.load(q_base + q_row.to(tl.int64)[:, None] * stride_qh + q_col[:, None] * stride_qw
                            + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
                dy = tl.load(dy_base + q_row.to(tl.int64)[:, None] * stride_dyh + q_col[:, None] * stride_dyw
                             + offs_d[None, :] * stride_dyd, mask=q_mask, other=0.0)
                stat_offsets = stat_base + q_row * W + q_col
                lse2 = tl.load(LSE + stat_offsets, mask=q_in, other=0.0) * 1.4426950408889634
                delta = tl.load(DELTA + stat_offsets, mask=q_in, other=0.0)

                pair_a = k_row - (row0 + LO - BS + 1 + step) + LO  # window row a of each key, this query row
                pair_ok = ((pair_a >= 0) & (pair_a < BS))[:, None] & col_ok
                mix_rows = mix_cols + (pair_a * stride_xa)[:, None]
                logits = tl.dot(kt, tl.trans(q), input_precision=DOT_PRECISION)
                valid = pair_ok & q_in[None, :]
                if MASK_PADDING:
                    valid = valid & k_in[:, None]
                p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[None, :]), 0.0)
                dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for m in range(M):
                    w = tl.load(mix_rows + m * stride_xm, mask=pair_ok, other=0.0)
                    vm = tl.load(v_ptrs + m * stride_vm, mask=k_mask, other=0.0)
                    g = tl.dot(vm, tl.trans(dy), input_precision=DOT_PRECISION)  # V_m[key] . dy[query]
                    dp += w.to(tl.float32) * g
                    contrib = p * g
                    # dmix[a * BS + b, m] += contrib summed over the pairs at (a, b); inline rather
                    # than _scatter_rows: the interpreter pays a lot per nested jit call.
                    for b in tl.static_range(BS):
                        per_key = tl.sum(tl.where(pair_b == b, contrib, 0.0), axis=1)
                        onehot = (pair_a * BS + b)[:, None] == offs_ab[None, :]
                        binned = tl.sum(tl.where(onehot, per_key[:, None], 0.0), axis=0)
                        dmix += tl.where(offs_mm[None, :] == m, binned[:, None], 0.0)
                dlogits = p * (dp - delta[None, :])
                dk += tl.dot(dlogits.to(q.dtype), q, input_precision=DOT_PRECISION)
            # Passes 2..M+1: dV_m = sum_query p * mix[a, b, m] * dy, recomputing p (one accumulator live).
            for m in range(M):
                dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
                for step in range(0, QUERY_STEPS):
                    q_row = (row0 + LO - BS + 1 + step) + tl.zeros_like(q_col)
                    q_in = q_col_in & (q_row >= 0) & (q_row < H)
                    q_mask = q_in[:, None] & d_ok[None, :]
                    q = tl.load(q_base + q_row.to(tl.int64)[:, None] * stride_qh + q_col[:, None] * stride_qw
                                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
                    dy = tl.load(dy_base + q_row.to(tl.int64)[:, None] * stride_dyh + q_col[:, None] * stride_dyw
                                 + offs_d[None, :] * stride_dyd, mask=q_mask, other=0.0)
                    lse2 = tl.load(LSE + stat_base + q_row * W + q_col, mask=q_in, other=0.0) * 1.4426950408889634
                    pair_a = k_row - (row0 + LO - BS + 1 + step) + LO
                    pair_ok = ((pair_a >= 0) & (pair_a < BS))[:, None] & col_ok
                    logits = tl.dot(kt, tl.trans(q), input_precision=DOT_PRECISION)
                    valid = pair_ok & q_in[None, :]
                    if MASK_PADDING:
                        valid = valid & k_in[:, None]
                    p = tl.where(valid, tl.exp2(logits * qk_scale - lse2[None, :]), 0.0)
                    w = tl.load(mix_cols + (pair_a * stride_xa)[:, None] + m * stride_xm, mask=pair_ok, other=0.0)
                    dv += tl.dot((p * w.to(tl.float32)).to(dy.dtype), dy, input_precision=DOT_PRECISION)
                tl.store(dv_ptrs + m * stride_dvm, dv.to(DV.dtype.element_ty), mask=k_mask)

        dk = dk * scale
        tl.store(DK + batch * stride_dkb + head * stride_dkn + k_row64 * stride_dkh + k_col[:, None] * stride_dkw
                 + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=k_mask)

    offs_ab = tl.arange(0, ABPAD)
    offs_mm = tl.arange(0, MPAD)
    tl.store(DMIX + pid.to(tl.int64) * (BS * BS * M) + offs_ab[:, None] * M + offs_mm[None, :], dmix,
             mask=(offs_ab[:, None] < BS * BS) & (offs_mm[None, :] < M))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _config(kernel, q, block_size, window, run=None):
    """The launch config of `kernel` ("fwd", "bwd_dq", "bwd_dkdv") under the tuning name
    f"spatial_{window}_{kernel}" (kernel_size = block_size, dilation = 1): a lookup (nothing is
    tuned in the user's process; `run` is accepted for the tuner's callers and ignored)."""
    B, H, W, heads, D = q.shape
    return tuning.get_config(f"spatial_{window}_{kernel}", block_size, 1, D, q.dtype, H, W)


def _meta(q, M, block_size, window, padding, config):
    """Kernel constexprs for a config: block window {GROUP, BLOCK_M, BLOCK_N}, sliding {BLOCK_H, BLOCK_W}."""
    if window == "block":
        tile = dict(BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], TILE_W=1, GROUP=config["GROUP"])
    else:
        tile = dict(BLOCK_M=config["BLOCK_H"] * config["BLOCK_W"], TILE_W=config["BLOCK_W"], GROUP=1,
                    BLOCK_N=max(16, tuning.next_power_of_2(config["BLOCK_W"] + block_size - 1)))
    for name in ("BLOCK_M", "BLOCK_N"):
        size = tile[name]
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} = {size} must be a power of two >= 16 (tl.dot); config {config}")
    D = q.shape[-1]
    return dict(D=D, BS=block_size, M=M, WINDOW=int(window == "sliding"), MASK_PADDING=int(padding == "mask"),
                DOT_PRECISION=dot_precision(q.dtype), BLOCK_D=max(16, tuning.next_power_of_2(D)),
                num_warps=config["num_warps"], num_stages=config["num_stages"], **tile)


def _tiles(q, block_size, window, meta):
    """(H, W, heads, n_tiles_w, n_tiles): n_tiles tiles per (batch, head), n_tiles_w per tile row
    (block window: groups of GROUP blocks per block row, each cut in BLOCK_M-pixel chunks)."""
    B, H, W, heads, _ = q.shape
    if window == "block":
        n_tiles_w = triton.cdiv(triton.cdiv(W, block_size), meta["GROUP"])
        n_chunks = triton.cdiv(meta["GROUP"] * block_size * block_size, meta["BLOCK_M"])
        return H, W, heads, n_tiles_w, triton.cdiv(H, block_size) * n_tiles_w * n_chunks
    n_tiles_w = triton.cdiv(W, meta["TILE_W"])
    return H, W, heads, n_tiles_w, triton.cdiv(H, meta["BLOCK_M"] // meta["TILE_W"]) * n_tiles_w


# Each *_launch returns (grid, positional args, meta-parameters) for one kernel, so the launchers
# and a static compilation (for a GPU that is not present) share them.

def _fwd_launch(q, k, values, mix, y, lse, block_size, scale, window, padding, config):
    meta = _meta(q, values.shape[3], block_size, window, padding, config)
    sizes = _tiles(q, block_size, window, meta)
    args = (q, k, values, mix, y, lse, *q.stride(), *k.stride(), *values.stride(), *y.stride(), *mix.stride(),
            *sizes, scale * LOG2E)
    return (q.shape[0] * q.shape[3] * sizes[-1],), args, meta


def _dq_launch(q, k, values, mix, y, dy, lse, delta, dq, block_size, scale, window, padding, config):
    meta = _meta(q, values.shape[3], block_size, window, padding, config)
    sizes = _tiles(q, block_size, window, meta)
    args = (q, k, values, mix, y, dy, lse, delta, dq, *q.stride(), *k.stride(), *values.stride(), *y.stride(),
            *dy.stride(), *dq.stride(), *mix.stride(), *sizes, scale)
    return (q.shape[0] * q.shape[3] * sizes[-1],), args, meta


def _dkdv_programs(q, block_size, window, config):
    """Programs per (batch, head) of the dk/dv kernel: its tiles, TILES_PER_PROGRAM at a time."""
    meta = _meta(q, 1, block_size, window, "zeros", config)
    return triton.cdiv(_tiles(q, block_size, window, meta)[-1], config["TILES_PER_PROGRAM"])


def _dmix_buffer(q, M, block_size, window, config):
    """Per-program partial sums of dmix, (B * heads * programs, block_size**2, M) fp32."""
    n_programs = q.shape[0] * q.shape[3] * _dkdv_programs(q, block_size, window, config)
    return torch.empty((n_programs, block_size * block_size, M), device=q.device, dtype=torch.float32)


def _dkdv_launch(q, k, values, mix, dy, lse, delta, dk, dvalues, dmix_partial, block_size, scale, window,
                 padding, config):
    M = values.shape[3]
    meta = _meta(q, M, block_size, window, padding, config)
    meta.update(TILES_PER_PROGRAM=config["TILES_PER_PROGRAM"], ABPAD=tuning.next_power_of_2(block_size ** 2),
                MPAD=tuning.next_power_of_2(M))
    n_programs = _dkdv_programs(q, block_size, window, config)
    args = (q, k, values, mix, dy, lse, delta, dk, dvalues, dmix_partial,
            *q.stride(), *k.stride(), *values.stride(), *dy.stride(), *dk.stride(), *dvalues.stride(),
            *mix.stride(), *_tiles(q, block_size, window, meta), n_programs, scale)
    return (q.shape[0] * q.shape[3] * n_programs,), args, meta


def _fwd(q, k, values, mix, block_size, scale, window, padding, y=None, lse=None, config=None):
    """Launch the forward kernel. Returns y (B, H, W, heads, D) and lse (B, heads, H, W) fp32.

    `y`/`lse` may be passed in (the tests poison them to prove every element is written).
    """
    y, lse = attention_outputs(q, y, lse)
    if y.numel() == 0:
        return y, lse

    def run(cfg):
        grid, args, meta = _fwd_launch(q, k, values, mix, y, lse, block_size, scale, window, padding, cfg)
        launch(_spatial_fwd_kernel, grid, args, meta)

    run(config or _config("fwd", q, block_size, window, run))
    return y, lse


def _bwd(q, k, values, mix, y, lse, dy, block_size, scale, window, padding,
         grads=None, config_dq=None, config_dkdv=None):
    """Launch the backward kernels. Returns dq, dk, dvalues and dmix (in mix's dtype).

    `grads` may hold preallocated (dq, dk, dvalues) buffers (the tests poison them).
    """
    M = values.shape[3]
    if grads is None:
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, values))
    dq, dk, dvalues = grads
    if q.numel() == 0:
        return dq, dk, dvalues, torch.zeros_like(mix)
    delta = torch.empty_like(lse)

    def run_dq(cfg):
        grid, args, meta = _dq_launch(q, k, values, mix, y, dy, lse, delta, dq, block_size, scale, window,
                                      padding, cfg)
        launch(_spatial_bwd_dq_kernel, grid, args, meta)

    def run_dkdv(cfg):  # the partial-sum buffer has one row per program, so one per config
        dmix_partial = _dmix_buffer(q, M, block_size, window, cfg)
        grid, args, meta = _dkdv_launch(q, k, values, mix, dy, lse, delta, dk, dvalues, dmix_partial,
                                        block_size, scale, window, padding, cfg)
        launch(_spatial_bwd_dkdv_kernel, grid, args, meta)
        return dmix_partial

    run_dq(config_dq or _config("bwd_dq", q, block_size, window, run_dq))
    dmix_partial = run_dkdv(config_dkdv or _config("bwd_dkdv", q, block_size, window, run_dkdv))  # reads delta
    # A deterministic sum of the per-program partials.
    dmix = dmix_partial.sum(0).view(block_size, block_size, M).to(mix.dtype)
    return dq, dk, dvalues, dmix


# ----------------------------------------------------------------------------------------------
# Registered ops (torch.compile sees them whole: no graph break) and their autograd
# ----------------------------------------------------------------------------------------------

@define_op("sasa_triton::spatial_attention2d_fwd")
def _spatial_attention2d_fwd(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, mix: torch.Tensor,
                             block_size: int, scale: float, window: str,
                             padding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, values, mix, block_size, scale, window, padding)


@_spatial_attention2d_fwd.register_fake
def _(q, k, values, mix, block_size, scale, window, padding):
    return attention_outputs(q)


@define_op("sasa_triton::spatial_attention2d_bwd")
def _spatial_attention2d_bwd(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, mix: torch.Tensor,
                             y: torch.Tensor, lse: torch.Tensor, dy: torch.Tensor, block_size: int, scale: float,
                             window: str, padding: str
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(q, k, values, mix, y, lse, dy, block_size, scale, window, padding)


@_spatial_attention2d_bwd.register_fake
def _(q, k, values, mix, y, lse, dy, block_size, scale, window, padding):
    grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, values))
    return (*grads, torch.empty_like(mix))


def _setup_context(ctx, inputs, output):
    q, k, values, mix, block_size, scale, window, padding = inputs
    y, lse = output
    ctx.save_for_backward(q, k, values, mix, y, lse)
    ctx.args = (block_size, scale, window, padding)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dy, _dlse):
    q, k, values, mix, y, lse = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True (eager; torch.compile refuses a double backward)
        from ..reference import spatial_attention2d as reference_op
        grads = differentiable_backward(lambda *args: reference_op(*args, *ctx.args), (q, k, values, mix), dy)
        return (*grads, None, None, None, None)
    dq, dk, dvalues, dmix = _spatial_attention2d_bwd(q, k, values, mix, y, lse, dy, *ctx.args)
    return dq, dk, dvalues, dmix, None, None, None, None


_spatial_attention2d_fwd.register_autograd(_backward, setup_context=_setup_context)


def spatial_attention2d(q, k, values, mix, block_size=4, scale=1.0, window="block", padding="zeros",
                        backend="auto"):
    """Spatially-aware attention of the paper's stem (SPEC section 2), fused in Triton.

    For query pixel (i, j), head h and the block_size x block_size key positions (a, b):

        logit = scale * q_ij . k_ab
        y_ij  = sum_ab softmax_ab(logit) * sum_m mix[a, b, m] * values[ab, m]

    Args:
        q, k: (B, H, W, heads, D) queries and keys, any strides (a channels_last 1x1-conv output
            viewed as (B, H, W, heads, D) is free). float16, bfloat16 or float32 on the Triton
            path; float64 too on the reference path. D: any value up to 128 on the Triton path.
        values: (B, H, W, M, heads, D), the M value maps W_V^m x, same dtype as q.
        mix: (block_size, block_size, M), the mixture weights p(a, b, m) (normalised over M by the
            caller); any float dtype, its gradient comes back in that dtype.
        block_size: side of the block (paper: 4).
        scale: multiplies the logits (the paper uses 1.0).
        window: "block": each pixel attends to the pixels of its own non-overlapping block, (a, b)
            the key's row/column inside the block (the paper). "sliding": a block_size x
            block_size window around each pixel, row/column offsets -(block_size // 2) ..
            block_size - 1 - block_size // 2 (centred for odd sizes, one more after than before
            for even sizes), (a, b) the place inside the window.
        padding: where a block or window leaves the image: "zeros" (k = 0 and v = 0 there, still
            in the softmax) or "mask" (left out).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else the reference),
            "triton" or "reference".

    Returns:
        (B, H, W, heads, D) in q's dtype.

    A backward with create_graph=True runs through the PyTorch reference (differentiable).
    """
    check_spatial_attention_args(q, k, values, mix, block_size, scale, window, padding)
    if resolve_backend(backend, q.device) == "reference" or transforms_active():  # (forward-mode AD, torch.func)
        from ..reference import spatial_attention2d as reference_op
        return reference_op(q, k, values, mix, block_size, scale, window, padding)
    q, k, values = autocast_inputs(q, k, values)
    check_kernel_dtype("q", q)
    check_kernel_dtype("mix", mix)
    if q.shape[-1] > 128:
        raise ValueError(f"the Triton kernels support a head dim D <= 128, got D={q.shape[-1]} "
                         f"(use backend='reference')")
    out_dtype = q.dtype
    if interpreter_enabled():
        # The interpreter mishandles bf16 (garbage values): compute in fp32, return bf16 (autograd
        # through the casts).
        q, k, values = (t.float() if t.dtype == torch.bfloat16 else t for t in (q, k, values))
        mix = mix.float() if mix.dtype == torch.bfloat16 else mix
    y, _ = _spatial_attention2d_fwd(q, k, values, mix, block_size, float(scale), window, padding)
    return y.to(out_dtype)


def static_specs(shape=(32, 224, 224, 4, 16), dtype=torch.bfloat16, block_size=4, mixtures=4, window="block",
                 padding="zeros", configs=None):
    """KernelSpecs of the forward, dq and dk/dv kernels exactly as a launch on contiguous tensors of
    `shape` (B, H, W, heads, D) with `mixtures` value maps would compile them (meta tensors: nothing
    is allocated or run); for `python -m sasa_triton.inspect` and the sm_90 compilation tests.

    configs: optional {"spatial_<window>_fwd": cfg, "spatial_<window>_bwd_dq": cfg,
    "spatial_<window>_bwd_dkdv": cfg} overrides of the looked-up configs.
    """
    from .._compile import spec_from_launch

    configs = configs or {}
    B, H, W, heads, D = shape
    q = torch.empty(shape, dtype=dtype, device="meta")
    k, y, dy, dq, dk = (torch.empty_like(q) for _ in range(5))
    values = torch.empty((B, H, W, mixtures, heads, D), dtype=dtype, device="meta")
    dvalues = torch.empty_like(values)
    mix = torch.empty((block_size, block_size, mixtures), device="meta")  # fp32, as the stem module's
    lse = torch.empty((B, heads, H, W), device="meta")
    delta = torch.empty_like(lse)
    name = f"spatial_{window}"

    def config(kernel):  # the lookup on meta tensors times nothing: a tuned entry or the default
        return configs.get(f"{name}_{kernel}") or _config(kernel, q, block_size, window)

    common = dict(block_size=block_size, scale=1.0, window=window, padding=padding)
    fwd = _fwd_launch(q, k, values, mix, y, lse, config=config("fwd"), **common)
    dq_launch = _dq_launch(q, k, values, mix, y, dy, lse, delta, dq, config=config("bwd_dq"), **common)
    config_dkdv = config("bwd_dkdv")
    dmix_partial = _dmix_buffer(q, mixtures, block_size, window, config_dkdv)
    dkdv = _dkdv_launch(q, k, values, mix, dy, lse, delta, dk, dvalues, dmix_partial, config=config_dkdv, **common)
    return [
        spec_from_launch(f"{name}_fwd", _spatial_fwd_kernel, *fwd[1:]),
        spec_from_launch(f"{name}_bwd_dq", _spatial_bwd_dq_kernel, *dq_launch[1:]),
        spec_from_launch(f"{name}_bwd_dkdv", _spatial_bwd_dkdv_kernel, *dkdv[1:]),
    ]
