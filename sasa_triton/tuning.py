"""Kernel launch configurations: defaults per window size, and the lookup the launchers use.

A config is a dict with the tile shape (BLOCK_H x BLOCK_W query pixels for the forward and dq
kernels, key pixels for the dk/dv kernel), num_warps and num_stages. Tile widths are powers of
two; the haloed key row is padded to the next power of two of BLOCK_W + 2 * radius, so the
defaults pick BLOCK_W to keep that padding small for each window size.
"""
from __future__ import annotations

import torch

from ._utils import interpreter_enabled


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def halo_width(block_w: int, kernel_size: int, dilation: int) -> int:
    """Power-of-two width of the haloed key (or query) row for a tile of width block_w."""
    return max(16, next_power_of_2(block_w + 2 * dilation * (kernel_size // 2)))


def default_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Default tile for `kernel` in {"local_fwd", "local_bwd_dq", "local_bwd_dkdv"}.

    Chosen so the haloed row BLOCK_W + 2r wastes little of its power-of-two padding and the
    fp32 accumulators stay in registers at D <= 64 (checked by tests/test_compile_sm90.py).
    """
    if kernel.startswith("spatial_"):
        # Stem kernels (ops/spatial_attention.py), kernel_size = block size. "spatial_block_*": GROUP
        # blocks of a block row per tile, walked in BLOCK_M (stationary) x BLOCK_N (streamed) pixel
        # chunks; "spatial_sliding_*": BLOCK_H x BLOCK_W tiles as the local kernels. The dk/dv kernels
        # loop over TILES_PER_PROGRAM tiles (fewer partial mix-gradient rows to sum).
        cap = 32 if head_dim > 64 else 64  # BLOCK_M * BLOCK_D <= 64 x 64 fp32 accumulators
        interp = interpreter_enabled()
        num_warps = 8 if dtype == torch.float32 or head_dim > 64 else 4  # fp32 dots run on the FMA units
        common = {"TILES_PER_PROGRAM": 2 if interp else 8, "num_warps": num_warps, "num_stages": 1}
        if "_block_" in kernel:
            group = max(1, 16 // (kernel_size * kernel_size))
            chunk = 16 if interp else min(cap, max(16, next_power_of_2(group * kernel_size ** 2)))
            return {"GROUP": group, "BLOCK_M": chunk, "BLOCK_N": chunk, **common}
        block_w = 8 if kernel_size + 7 <= 16 else 16
        block_h = cap // block_w
        if kernel.endswith("dkdv"):
            block_h = max(16 // block_w, block_h // 2)  # it keeps k, dk and the pair tables of M dots live
        if interp:
            block_h, block_w = 4, 4 if kernel_size + 3 <= 16 else 8
        return {"BLOCK_H": block_h, "BLOCK_W": block_w, **common}
    radius = dilation * (kernel_size // 2)
    # BLOCK_W = 8 keeps the haloed row within 16 columns up to r = 4 (k = 9 at dilation 1);
    # wider windows pad to 32 anyway, so use 16 query columns to fill it.
    block_w = 8 if 8 + 2 * radius <= 16 else 16
    block_h = 8 if block_w == 8 else 4
    if head_dim > 64 and kernel != "local_fwd":
        block_h = max(2, block_h // 2)  # the backward keeps two D-wide fp32 accumulators
    if interpreter_enabled():
        # The interpreter runs each program in numpy: smaller tiles mean less padding work.
        block_h, block_w = 4, 4 if 4 + 2 * radius <= 16 else 8
    # fp32 runs its dots on the FMA units (ieee): twice the warps keep its tiles in registers.
    num_warps = 8 if dtype == torch.float32 or head_dim > 64 else 4
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": 1}


def get_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype,
               height: int, width: int, run=None) -> dict:
    """The config a launcher uses: a tuned one when the autotune cache has it, else the default.

    run(config), when given, launches the kernel once with `config` on the real arguments (for
    timing candidates)."""
    return default_config(kernel, kernel_size, dilation, head_dim, dtype)
