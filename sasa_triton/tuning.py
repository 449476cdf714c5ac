"""Kernel launch configurations: defaults per window size, the autotuner, and its per-GPU cache.

A config is a dict with the tile shape (BLOCK_H x BLOCK_W query pixels for the forward and dq
kernels, key pixels for the dk/dv kernel), num_warps and num_stages. Tile widths are powers of
two; the haloed key row is padded to the next power of two of BLOCK_W + 2 * radius, so the
defaults pick BLOCK_W to keep that padding small for each window size.

Lookup (`get_config`), in order:
  1. the in-memory cache of this process;
  2. a tuned JSON file for this GPU (`python -m sasa_triton.autotune` writes one), loaded at first
     use, used without timing anything;
  3. autotuning, when the launcher passes `run` (a closure that launches the kernel once with a
     config on the real arguments), CUDA is in use and SASA_TRITON_AUTOTUNE is not "0": every
     candidate of the kernel family's space that survives the resource estimate is timed with
     triton.testing.do_bench (two stages by default: tile shapes, then warps/stages of the best
     tiles), the fastest is kept in memory. Under TRITON_INTERPRET=1 the "tuning" is the default
     config with a dummy time of 0, nothing is timed;
  4. the default config.

Cache key: kernel name, kernel size, dilation, head dim, dtype and the image height and width
rounded up to a power of two (56 and 60 share the bucket 64), never the batch.

Resource estimate (prunes candidates before they are timed; fitted to ptxas -v on sm_90, and
tests/test_autotune.py compiles the riskiest survivors and checks for spills):
  registers per thread ~ 24 + BLOCK_Q / threads * (a * BLOCK_D + b * HALO + c * KPAD
                                                   + e * HALO^2 / 64) + d * BLOCK_D * HALO / threads,
                         times 1 + 0.05 * (num_stages - 1)
  with BLOCK_Q = BLOCK_H * BLOCK_W, threads = 32 * min(num_warps, BLOCK_Q / R) (the warps a
  dot can split the tile over: R = 16 rows each for 16-bit inputs, 8 for fp32), HALO the
  padded haloed row, KPAD the padded window, and (a, b, c, d, e) per kernel and input precision
  (LOCAL_REGISTER_MODEL); kept when <= 224 (ptxas gives a thread at most 255; the configs that
  spilled in the fit are estimated at 248 or more).
  shared memory ~ element bytes * (2 * BLOCK_Q * BLOCK_D + BLOCK_Q * HALO
                                   + 2 * num_stages * HALO * BLOCK_D) + small fp32 tables,
  (the dot operands staged in shared memory) kept when within the device's per-block limit.

Tuned files: JSON named after the GPU (`<gpu name>.json`, see `tuned_file`) in the user cache
directory (SASA_TRITON_CACHE_DIR, default ~/.cache/sasa_triton), then in sasa_triton/configs/
(files shipped with the package), plus any file named in SASA_TRITON_CONFIG_FILE. A file holds
the GPU name, the Triton version and a hash of the @triton.jit sources of each kernel family; a
file for another GPU or Triton version, or a family whose kernels changed since, is ignored
with a one-line warning. See sasa_triton/configs/README.md for the format.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import inspect
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import textwrap
import warnings
from typing import Callable, Iterable

import torch

from ._utils import interpreter_enabled

logger = logging.getLogger(__name__)

FILE_FORMAT = 1
PACKAGE_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
CONFIG_FIELDS = ("num_warps", "num_stages")

# do_bench budget per candidate, milliseconds (the CLI's --warmup/--rep change them).
BENCH_WARMUP_MS = 10
BENCH_REP_MS = 40
# Two-stage search: after timing every tile shape once, time every launch variant of this many.
TOP_TILES = 2


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
    if head_dim > 64:
        # Checked with ptxas for sm_90 at D = 128 (k = 3, 7, 11): the taller tiles spill.
        if dtype == torch.float32:
            block_h = 16 // block_w  # fp32 holds its FMA dot operands in registers: 16 queries
        elif kernel == "local_bwd_dq":
            block_h = max(2, block_h // 2)  # the backward keeps two D-wide fp32 accumulators
        elif kernel == "local_bwd_dkdv":
            block_h = max(16 // block_w, block_h // 2 if block_w == 8 else block_h // 4)
    if interpreter_enabled():
        # The interpreter runs each program in numpy: smaller tiles mean less padding work.
        block_h, block_w = 4, 4 if 4 + 2 * radius <= 16 else 8
    # fp32 runs its dots on the FMA units (ieee): twice the warps keep its tiles in registers.
    num_warps = 8 if dtype == torch.float32 or head_dim > 64 else 4
    return {"BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": 1}


# ----------------------------------------------------------------------------------------------
# Kernel families: each registers its candidate space and resource estimate
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class KernelFamily:
    """The kernels whose names start with `name + "_"`.

    space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket) yields
    every candidate config (before pruning); estimate(kernel, config, kernel_size, dilation,
    head_dim, dtype) returns {"registers": per thread, "shared_mem": bytes}, or None to keep the
    candidate unpruned. `module` holds the family's @triton.jit functions, whose source is hashed
    into the tuned files.
    """
    name: str
    module: str
    space: Callable[..., Iterable[dict]]
    estimate: Callable[..., dict | None] | None = None


FAMILIES: dict[str, KernelFamily] = {}


def register_family(name: str, *, module: str, space, estimate=None) -> KernelFamily:
    """Register (or replace) the autotuning space of the kernels named `name + "_*"`.

    An op module calls this at import time to give its kernels their own candidates; a family
    without a registration is tuned over num_warps/num_stages around its default config only.
    """
    family = KernelFamily(name, module, space, estimate)
    FAMILIES[name] = family
    return family


def family_name(kernel: str) -> str:
    return kernel.split("_", 1)[0]


def _family(kernel: str) -> KernelFamily:
    name = family_name(kernel)
    family = FAMILIES.get(name)
    if family is None:
        family = KernelFamily(name, f"{__package__}.ops.{name}_attention", _launch_space)
    return family


# Candidate space of the local-attention kernels (ops/local_attention.py).
QUERY_TILES = (16, 32, 64, 128, 256)   # BLOCK_H * BLOCK_W
BLOCK_WIDTHS = (4, 8, 16, 32)
NUM_WARPS = (4, 8)        # a warpgroup (4 warps) is what Hopper's wgmma needs
NUM_STAGES = (1, 2, 3)
MAX_HALO = 128
MIN_LOGITS_PER_THREAD = 2  # fewer: the warps have nothing to do (the logit tile is the big one)


def _rows_per_warp(dtype) -> int:
    """The fewest tile rows a dot gives a warp: 16 for the tensor-core dots of 16-bit inputs,
    8 for the FMA dots of fp32 ones."""
    return 8 if dtype == torch.float32 else 16


def _local_widths(kernel_size: int, dilation: int, width_bucket: int) -> list[int]:
    """Tile widths worth trying for a window: no wider than the image (bucket), and for each
    padded haloed width only the widest tile that pads to it (it loads the same key strip for
    more queries, so it has fewer halo rows per query)."""
    widths = [w for w in BLOCK_WIDTHS if w <= max(width_bucket, BLOCK_WIDTHS[0])]
    by_halo = {}
    for w in widths:  # ascending: the widest tile wins its halo
        by_halo[halo_width(w, kernel_size, dilation)] = w
    kept = [w for halo, w in sorted(by_halo.items()) if halo <= MAX_HALO]
    return kept or [widths[0]]


def _local_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Tiles per window size: the widths of `_local_widths`, query tiles of 16..256 pixels no taller
    than the image (beyond the minimum tile of 16), 4 warps, or 8 on tiles with at least half a
    dot's rows per warp (_rows_per_warp), each thread with at least MIN_LOGITS_PER_THREAD logits,
    1-3 pipeline stages."""
    for block_w in _local_widths(kernel_size, dilation, width_bucket):
        halo = halo_width(block_w, kernel_size, dilation)
        for tile in QUERY_TILES:
            block_h = tile // block_w
            if block_h < 1 or (block_h > height_bucket and tile > 16):
                continue
            for num_warps, num_stages in itertools.product(NUM_WARPS, NUM_STAGES):
                if tile * halo < MIN_LOGITS_PER_THREAD * 32 * num_warps:
                    continue
                if num_warps > 4 and tile < _rows_per_warp(dtype) * num_warps // 2:
                    continue  # 8 warps on a small tile replicate it: no faster, and ptxas caps them
                yield {"BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps, "num_stages": num_stages}


# Resource model per kernel, fitted to ptxas -v on sm_90 (Triton 3.9; 530 compiled configs of
# k 3-15, D 8-128, 4/8 warps, 1-3 stages, fp16/bf16/fp32, 40% of them the riskiest survivors of
# earlier fits) so that every config that spilled is estimated at least 24 registers over the
# budget (fp32's dk/dv kernel: over the budget), at the cost of pruning some that did not spill. Registers per thread:
#   24 + BLOCK_Q / threads * (a * BLOCK_D + b * HALO + c * KPAD + e * HALO * HALO / 64)
#      + d * BLOCK_D * HALO / threads
# with threads = 32 * min(num_warps, BLOCK_Q / R): a dot gives each warp at least R rows (16 for
# the tensor-core dots of 16-bit inputs, 8 for the FMA dots of fp32 ones), so more warps than
# BLOCK_Q / R replicate rather than split the tiles. a: the fp32 accumulators and the Q-sized
# operands; b, e: the logit-sized tiles (logits, p, dp, the column term and index), which cost
# more than linearly in the haloed width (the k-way gathers over them); c: the relative-logit
# tiles; d: the K/V strip in registers. Separate (a, b, c, d, e) for 16-bit inputs (tensor-core
# dots) and fp32 inputs (ieee: FMA dots, operands in registers).
# Shared memory (bytes, an upper bound on the data): element bytes * (2 * BLOCK_Q * BLOCK_D
# + BLOCK_Q * HALO + 2 * num_stages * HALO * BLOCK_D) + r * KPAD * BLOCK_D * 4 + s * BLOCK_Q * KPAD * 4.
LOCAL_REGISTER_MODEL = {  # kernel: {fp32 inputs?: (a, b, c, d, e)}
    "local_fwd": {False: (1.75, 1.75, 2.0, 0.0, 0.0), True: (8.0, 2.25, 2.0, 8.0, 0.0)},
    "local_bwd_dq": {False: (1.5, 4.75, 2.0, 2.0, 1.0), True: (4.75, 6.25, 0.0, 8.0, 2.0)},
    "local_bwd_dkdv": {False: (3.25, 0.75, 0.0, 2.0, 4.0), True: (8.0, 8.0, 2.0, 8.0, 4.0)},
}
LOCAL_SHARED_MODEL = {"local_fwd": (0, 0), "local_bwd_dq": (4, 1), "local_bwd_dkdv": (4, 1)}  # (r, s)
REGISTER_BASE = 24
REGISTER_BUDGET = 224        # of the 255 ptxas may give a thread
STAGE_REGISTER_FACTOR = 0.05  # extra registers per pipeline stage beyond the first (prefetched rows)


def _element_bytes(dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def _local_estimate(kernel, config, kernel_size, dilation, head_dim, dtype) -> dict:
    """Registers per thread and shared memory of a local-attention kernel (model above)."""
    tile = config["BLOCK_H"] * config["BLOCK_W"]
    halo = halo_width(config["BLOCK_W"], kernel_size, dilation)
    block_d = max(16, next_power_of_2(head_dim))
    kpad = max(16, next_power_of_2(kernel_size))
    threads = 32 * min(config["num_warps"], max(1, tile // _rows_per_warp(dtype)))
    stages = config.get("num_stages", 1)
    model = LOCAL_REGISTER_MODEL.get(kernel, LOCAL_REGISTER_MODEL["local_bwd_dq"])
    a, b, c, d, e = model[dtype == torch.float32]
    registers = (REGISTER_BASE + tile / threads * (a * block_d + b * halo + c * kpad + e * halo * halo / 64)
                 + d * block_d * halo / threads)
    registers *= 1 + STAGE_REGISTER_FACTOR * (stages - 1)
    r, s = LOCAL_SHARED_MODEL.get(kernel, (4, 1))
    shared = (_element_bytes(dtype) * (2 * tile * block_d + tile * halo + 2 * stages * halo * block_d)
              + r * kpad * block_d * 4 + s * tile * kpad * 4)
    return {"registers": int(registers), "shared_mem": int(shared)}


def _launch_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Fallback space of an unregistered family: its default tile with 2/4/8 warps and 1-2 stages
    (the tile's meaning is the op's business, so only the launch parameters vary)."""
    base = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    for num_warps, num_stages in itertools.product((2, 4, 8), (1, 2)):
        yield {**base, "num_warps": num_warps, "num_stages": num_stages}


register_family("local", module=f"{__package__}.ops.local_attention", space=_local_space,
                estimate=_local_estimate)


# Candidate space of the stem's kernels (ops/spatial_attention.py, "spatial_{block|sliding}_*";
# kernel_size = the block size bs). Block window: a tile is GROUP whole bs x bs blocks of a block
# row (GROUP * bs^2 pixels), walked in BLOCK_M (stationary) x BLOCK_N (streamed) pixel chunks.
# Sliding window: BLOCK_H x BLOCK_W tiles, keys streamed as haloed rows of
# BLOCK_N = next_power_of_2(BLOCK_W + bs - 1) (>= 16) pixels. The dk/dv kernels also take
# TILES_PER_PROGRAM (tiles walked per program: fewer partial dmix rows against fewer programs).
STEM_CHUNKS = (16, 32, 64, 128)        # BLOCK_M, BLOCK_N (powers of two >= 16: tl.dot)
STEM_QUERY_TILES = (16, 32, 64, 128)   # sliding: BLOCK_H * BLOCK_W
STEM_WIDTHS = (4, 8, 16, 32)
STEM_TILES_PER_PROGRAM = (2, 8, 32)
STEM_NUM_WARPS = (4, 8)
STEM_MAX_PAIRS = 64 * 128                # BLOCK_M * BLOCK_N: the logit tile
STEM_NUM_STAGES = (1, 2)  # the block window's key loop is 1-2 chunks long: deeper pipelines idle


def _stem_groups(block_size: int, width_bucket: int) -> list[int]:
    """Blocks per tile: the most whole blocks that fill each chunk size (GROUP * bs^2 <= chunk),
    no more blocks side by side than the image holds (beyond one)."""
    groups = {max(1, chunk // (block_size * block_size)) for chunk in STEM_CHUNKS}
    fitting = [g for g in sorted(groups) if g == 1 or g * block_size <= max(width_bucket, block_size)]
    return fitting


def _stem_sliding_widths(block_size: int, width_bucket: int) -> list[int]:
    """As _local_widths for a bs-wide window (haloed row BLOCK_W + bs - 1): the widest tile per
    padded key-row width, no wider than the image (bucket)."""
    widths = [w for w in STEM_WIDTHS if w <= max(width_bucket, STEM_WIDTHS[0])]
    by_halo = {}
    for w in widths:
        by_halo[max(16, next_power_of_2(w + block_size - 1))] = w
    return [w for _, w in sorted(by_halo.items())]


def _stem_launches(kernel, dtype, tile_pixels):
    """(num_warps, num_stages) pairs for a tile of tile_pixels stationary pixels: 8 warps only where
    a dot gives each of them at least half its rows (as _local_space)."""
    for num_warps, num_stages in itertools.product(STEM_NUM_WARPS, STEM_NUM_STAGES):
        if num_warps > 4 and tile_pixels < _rows_per_warp(dtype) * num_warps // 2:
            continue
        # Every small spill seen in ~850 sm_90 compiles of stem candidates came with
        # num_stages = 2 in the dk/dv kernels or in fp32: keep those single-stage.
        if num_stages > 1 and (kernel.endswith("dkdv") or dtype == torch.float32):
            continue
        yield num_warps, num_stages


# In the stem's dk/dv kernels ptxas trades a few spilled words for occupancy once a thread needs
# much more than 128 registers (seen: 36 B of spills at 128 registers for an estimate of 188), so
# their candidates stay under a lower budget than REGISTER_BUDGET.
STEM_DKDV_REGISTER_BUDGET = 160


def _spatial_space(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Tiles per block size and window, dk/dv candidates under STEM_DKDV_REGISTER_BUDGET."""
    for config in _spatial_tiles(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
        if kernel.endswith("dkdv") and _spatial_estimate(kernel, config, kernel_size, dilation, head_dim,
                                                         dtype)["registers"] > STEM_DKDV_REGISTER_BUDGET:
            continue
        yield config


def _spatial_tiles(kernel, kernel_size, dilation, head_dim, dtype, height_bucket, width_bucket):
    """Tiles per block size and window: see STEM_* above. The forward and dq kernels keep the
    default's TILES_PER_PROGRAM (they ignore it)."""
    bs = kernel_size
    default = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    dkdv = kernel.endswith("dkdv")
    per_program = STEM_TILES_PER_PROGRAM if dkdv else (default["TILES_PER_PROGRAM"],)
    if "_block_" in kernel:
        for group in _stem_groups(bs, width_bucket):
            pixels = group * bs * bs
            chunks = [c for c in STEM_CHUNKS if c <= max(16, next_power_of_2(pixels))]
            for block_m, block_n in itertools.product(chunks, chunks):
                if max(block_m, block_n) > 2 * min(block_m, block_n) or block_m * block_n > STEM_MAX_PAIRS:
                    continue  # lopsided chunks: one side's dot is mostly padding or the loop runs long
                for num_warps, num_stages in _stem_launches(kernel, dtype, block_m):
                    for tiles in per_program:
                        yield {"GROUP": group, "BLOCK_M": block_m, "BLOCK_N": block_n, "TILES_PER_PROGRAM": tiles,
                               "num_warps": num_warps, "num_stages": num_stages}
        return
    for block_w in _stem_sliding_widths(bs, width_bucket):
        for tile in STEM_QUERY_TILES:
            block_h = tile // block_w
            if block_h < 1 or (block_h > height_bucket and tile > 16):
                continue
            for num_warps, num_stages in _stem_launches(kernel, dtype, tile):
                for tiles in per_program:
                    yield {"BLOCK_H": block_h, "BLOCK_W": block_w, "TILES_PER_PROGRAM": tiles,
                           "num_warps": num_warps, "num_stages": num_stages}


# Resource model of the stem's kernels, fitted to ptxas -v on sm_90 (Triton 3.9; ~700 compiled
# configs: a random sample of the unpruned spaces at bs 2/3/4/5/8, D 16/64, bf16/fp32, and the
# defaults; the sliding dk/dv kernel, the slowest to compile, from ~45) in the local model's form:
#   registers ~ (24 + (a * BQ * BLOCK_D + b * BQ * BLOCK_N + e * BQ * ABPAD) / threads)
#               * (1 + 0.05 * (num_stages - 1))
# with BQ the stationary pixels (BLOCK_M, or BLOCK_H * BLOCK_W), BLOCK_N the streamed ones (the
# haloed key row for the sliding window), ABPAD = next_power_of_2(bs^2) (the dk/dv kernel's
# one-hot dmix reduction) and threads = 32 * min(num_warps, BQ / R) as for the local kernels.
# (a, b, e) is the non-negative least-squares fit to the configs that did not spill, scaled up
# until every config that spilled under register pressure (at the 255 cap, or more than 64
# bytes) is estimated at 248 or more, i.e. 24 over REGISTER_BUDGET. Not modelled: ptxas's own
# occupancy trade, where it stops at 72-168 registers and spills a few words (<= 128 bytes) of a
# kernel that would fit in more; the defaults do it too (tests/test_autotune_stem.py allows it).
# Shared memory (bytes, an upper bound of every compiled config, within 0.9 of it at most):
#   element bytes * (2 * BQ * BLOCK_D + 2 * num_stages * BLOCK_N * BLOCK_D + 2 * BQ * BLOCK_N)
#   + 4 * BLOCK_N * BLOCK_D
SPATIAL_REGISTER_MODEL = {  # kernel: {fp32 inputs?: (a, b, e)}
    "spatial_block_fwd": {False: (2.0, 1.75, 0.0), True: (11.25, 3.0, 0.0)},
    "spatial_block_bwd_dq": {False: (1.5, 2.0, 0.0), True: (12.75, 5.0, 0.0)},
    "spatial_block_bwd_dkdv": {False: (2.75, 4.25, 0.75), True: (9.75, 16.0, 0.75)},
    "spatial_sliding_fwd": {False: (2.25, 6.0, 0.0), True: (5.75, 8.25, 0.0)},
    "spatial_sliding_bwd_dq": {False: (2.0, 6.0, 0.0), True: (10.25, 12.0, 0.0)},
    "spatial_sliding_bwd_dkdv": {False: (2.75, 11.0, 2.0), True: (2.5, 24.75, 0.0)},
}


def _spatial_tile(kernel, config, kernel_size) -> tuple[int, int]:
    """(stationary pixels, streamed pixels) of a stem kernel's tile, as its launcher's _meta."""
    if "_block_" in kernel:
        return config["BLOCK_M"], config["BLOCK_N"]
    return config["BLOCK_H"] * config["BLOCK_W"], max(16, next_power_of_2(config["BLOCK_W"] + kernel_size - 1))


def _spatial_estimate(kernel, config, kernel_size, dilation, head_dim, dtype) -> dict:
    """Registers per thread and shared memory of a stem kernel (model above)."""
    tile, streamed = _spatial_tile(kernel, config, kernel_size)
    block_d = max(16, next_power_of_2(head_dim))
    abpad = next_power_of_2(kernel_size * kernel_size)
    threads = 32 * min(config["num_warps"], max(1, tile // _rows_per_warp(dtype)))
    stages = config.get("num_stages", 1)
    model = SPATIAL_REGISTER_MODEL.get(kernel, SPATIAL_REGISTER_MODEL["spatial_block_bwd_dkdv"])
    a, b, e = model[dtype == torch.float32]
    registers = (REGISTER_BASE + tile / threads * (a * block_d + b * streamed + e * abpad))
    registers *= 1 + STAGE_REGISTER_FACTOR * (stages - 1)
    shared = (_element_bytes(dtype) * (2 * tile * block_d + 2 * stages * streamed * block_d + 2 * tile * streamed)
              + 4 * streamed * block_d)
    return {"registers": int(registers), "shared_mem": int(shared)}


register_family("spatial", module=f"{__package__}.ops.spatial_attention", space=_spatial_space,
                estimate=_spatial_estimate)


# ----------------------------------------------------------------------------------------------
# Candidates: the space, pruned by the resource estimate
# ----------------------------------------------------------------------------------------------

SM90_SHARED_MEM = 232448  # bytes per block on H100 (227 KiB)


def device_limits() -> dict:
    """{"max_shared_mem": bytes per block, "max_registers": per thread} of the current GPU
    (an H100's when there is none, as for the static sm_90 compilation)."""
    shared = SM90_SHARED_MEM
    if torch.cuda.is_available() and not interpreter_enabled():
        try:
            from triton.runtime import driver
            props = driver.active.utils.get_device_properties(torch.cuda.current_device())
            shared = int(props.get("max_shared_mem", shared))
        except Exception:  # pragma: no cover - older Triton, no driver
            pass
    return {"max_shared_mem": shared, "max_registers": REGISTER_BUDGET}


def estimate_resources(kernel, config, kernel_size, dilation, head_dim, dtype) -> dict | None:
    family = _family(kernel)
    if family.estimate is None:
        return None
    return family.estimate(kernel, config, kernel_size, dilation, head_dim, dtype)


def fits(kernel, config, kernel_size, dilation, head_dim, dtype, limits=None) -> bool:
    """True when the estimate keeps `config` within registers (no spills) and shared memory."""
    estimate = estimate_resources(kernel, config, kernel_size, dilation, head_dim, dtype)
    if estimate is None:
        return True
    limits = limits or device_limits()
    return (estimate["registers"] <= limits["max_registers"]
            and estimate["shared_mem"] <= limits["max_shared_mem"])


def bucket(n: int) -> int:
    """Image sizes share a key up to the next power of two (56 and 60 -> 64)."""
    return next_power_of_2(max(1, int(n)))


def candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, height, width, prune=True,
                      limits=None) -> list[dict]:
    """The configs autotuning times for this key, the default first (always kept, so a tuned
    config is never slower than the default), then the family's space minus what the resource
    estimate says cannot fit (prune=False: the whole space)."""
    default = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    limits = limits or device_limits()
    out = [default]
    for config in _family(kernel).space(kernel, kernel_size, dilation, head_dim, dtype, bucket(height),
                                        bucket(width)):
        if config in out:
            continue
        if prune and not fits(kernel, config, kernel_size, dilation, head_dim, dtype, limits):
            continue
        out.append(config)
    return out


# ----------------------------------------------------------------------------------------------
# Keys, environment, tuned files
# ----------------------------------------------------------------------------------------------

def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def config_key(kernel, kernel_size, dilation, head_dim, dtype, height, width) -> str:
    """'local_fwd/k7/d1/D64/bf16/H64/W64': the cache key (bucketed image size, no batch)."""
    return (f"{kernel}/k{int(kernel_size)}/d{int(dilation)}/D{int(head_dim)}/{dtype_name(dtype)}"
            f"/H{bucket(height)}/W{bucket(width)}")


def autotune_mode() -> str:
    """SASA_TRITON_AUTOTUNE: "0" (never time; tuned files and defaults only), "1" (default:
    two-stage search) or "full" (time every pruned candidate)."""
    value = os.environ.get("SASA_TRITON_AUTOTUNE", "1").strip().lower()
    if value in ("0", "false", "off", "no", ""):
        return "off"
    return "full" if value in ("full", "2", "exhaustive") else "on"


def autotune_enabled() -> bool:
    return autotune_mode() != "off"


def cache_dir() -> str:
    """SASA_TRITON_CACHE_DIR, else $XDG_CACHE_HOME/sasa_triton, else ~/.cache/sasa_triton."""
    path = os.environ.get("SASA_TRITON_CACHE_DIR")
    if not path:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(root, "sasa_triton")
    return path


def device_name() -> str:
    """The name tuned files are keyed by: the CUDA device's, or "triton-interpreter"."""
    if interpreter_enabled():
        return "triton-interpreter"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "unknown"


def tuned_file(directory: str | None = None) -> str:
    """Path of this GPU's tuned file in `directory` (default: the user cache directory)."""
    return os.path.join(directory or cache_dir(), _slug(device_name()) + ".json")


def triton_version() -> str:
    import triton
    return triton.__version__


def kernel_source_hash(family: str) -> str | None:
    """sha256 (16 hex digits) of the source of the family module's @triton.jit functions; None
    when the module is absent."""
    module_name = _family(family + "_").module
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    sources = []
    for name, obj in sorted(vars(module).items()):
        fn = getattr(obj, "fn", None)
        if fn is None or not type(obj).__module__.startswith("triton") or not inspect.isfunction(fn):
            continue
        if fn.__module__ != module.__name__:
            continue
        sources.append(textwrap.dedent(inspect.getsource(fn)))
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]


def _config_only(entry: dict) -> dict:
    """The launch config of a file entry (drops the bookkeeping fields: ms, default_ms, ...)."""
    return {k: v for k, v in entry.items() if k in CONFIG_FIELDS or k.isupper()}


class _State:
    def __init__(self):
        self.memory: dict[str, dict] = {}       # key -> config resolved in this process
        self.files: list | None = None          # [(path, metadata, {key: entry})] that passed the file checks
        self.families: dict[str, dict] = {}     # family -> {key: entry} from files whose hash matches
        self.record: dict[str, dict] | None = None  # key -> entry, while recording (the CLI)
        self.retune = False                     # the CLI's --force: ignore tuned files and defaults
        self.warned: set = set()


_state = _State()


def clear_cache() -> None:
    """Forget every config of this process and the loaded files (they are read again on next use)."""
    global _state
    _state = _State()


def _warn_once(message: str) -> None:
    if message not in _state.warned:
        _state.warned.add(message)
        warnings.warn(message, stacklevel=3)


def config_files() -> list[str]:
    """Files looked at, highest priority first: SASA_TRITON_CONFIG_FILE (os.pathsep-separated),
    this GPU's file in the user cache directory, then in the package's configs/ folder."""
    explicit = [p for p in os.environ.get("SASA_TRITON_CONFIG_FILE", "").split(os.pathsep) if p]
    return explicit + [tuned_file(), tuned_file(PACKAGE_CONFIG_DIR)]


def read_tuned_file(path: str) -> dict | None:
    """The file's contents when it is for this GPU and Triton version, else None (with a warning
    when it exists but does not match)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: unreadable ({error})")
        return None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("configs"), dict):
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: not a format-{FILE_FORMAT} sasa_triton file")
        return None
    gpu, version = device_name(), triton_version()
    if data.get("gpu") != gpu:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: tuned on {data.get('gpu')!r}, this is {gpu!r}")
        return None
    if data.get("triton") != version:
        _warn_once(f"sasa_triton: ignoring tuned configs {path}: tuned with Triton {data.get('triton')}, "
                   f"this is Triton {version}; rerun python -m sasa_triton.autotune")
        return None
    return data


def _load_files() -> list:
    if _state.files is None:
        _state.files = []
        for path in config_files():
            data = read_tuned_file(path)
            if data is not None:
                _state.files.append((path, data))
    return _state.files


def _family_entries(family: str) -> dict:
    """{key: entry} of the family from the loaded files whose kernel hash matches (first file wins)."""
    if family not in _state.families:
        entries: dict = {}
        current = None
        for path, data in _load_files():
            mine = {k: v for k, v in data["configs"].items() if family_name(k) == family}
            if not mine:
                continue
            current = current or kernel_source_hash(family)
            stored = (data.get("kernel_hashes") or {}).get(family)
            if stored != current:
                _warn_once(f"sasa_triton: ignoring the {family}_* configs of {path}: the kernels changed since "
                           f"they were tuned (hash {stored}, now {current}); rerun python -m sasa_triton.autotune")
                continue
            for key, entry in mine.items():
                entries.setdefault(key, entry)
        _state.families[family] = entries
    return _state.families[family]


def save_tuned(path: str | None = None, entries: dict | None = None) -> str:
    """Write `entries` ({key: entry}; default: what this process tuned or recorded) to `path`
    (default: this GPU's file in the user cache directory), merged with what a matching file
    there already holds. Atomic (written beside, then renamed). Returns the path."""
    path = path or tuned_file()
    if entries is None:
        entries = dict(_state.record or {})
    configs = {}
    hashes = {}
    old = read_tuned_file(path) if os.path.exists(path) else None
    families = {family_name(k) for k in entries}
    if old is not None:
        families |= {family_name(k) for k in old["configs"]}
    for family in sorted(families):
        hashes[family] = kernel_source_hash(family)
    if old is not None:
        for key, entry in old["configs"].items():
            family = family_name(key)
            if (old.get("kernel_hashes") or {}).get(family) == hashes[family]:
                configs[key] = entry
    configs.update({key: {k: v for k, v in entry.items() if k != "source"} for key, entry in entries.items()})
    hashes = {f: h for f, h in hashes.items() if any(family_name(k) == f for k in configs)}
    data = {
        "format": FILE_FORMAT,
        "gpu": device_name(),
        "triton": triton_version(),
        "torch": torch.__version__,
        "kernel_hashes": hashes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": dict(sorted(configs.items())),
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # The next lookup reads the new file.
    _state.files = None
    _state.families.clear()
    return path


@contextlib.contextmanager
def recording(retune: bool = False):
    """Collect every config resolved (tuned or read from a file) inside the block, for save_tuned.
    retune=True ignores tuned files and previously resolved configs: every key is timed again."""
    previous = (_state.record, _state.retune)
    _state.record, _state.retune = {}, retune
    if retune:
        _state.memory.clear()
    try:
        yield _state.record
    finally:
        _state.record, _state.retune = previous


# ----------------------------------------------------------------------------------------------
# Timing and lookup
# ----------------------------------------------------------------------------------------------

def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and not interpreter_enabled()


def _can_time() -> bool:
    """Not while torch.compile traces or a CUDA graph is being captured."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and getattr(compiler, "is_compiling", lambda: False)():
        return False
    with contextlib.suppress(Exception):
        if torch.cuda.is_current_stream_capturing():
            return False
    return True


def _bench(run, config) -> float:
    """Median milliseconds of run(config) (triton.testing.do_bench, the L2 flushed each time)."""
    from triton.testing import do_bench
    result = do_bench(lambda: run(config), warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS, quantiles=[0.5])
    if isinstance(result, (list, tuple)):
        result = result[0]
    return float(result)


def _describe(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def autotune(kernel, kernel_size, dilation, head_dim, dtype, height, width, run, mode: str | None = None,
             candidates: list[dict] | None = None) -> tuple[dict, dict]:
    """Time the candidates of this key with run(config); returns (best config, entry) where the
    entry adds "ms" (the best median time), "default_ms" and "timed" (how many were timed).

    Under TRITON_INTERPRET=1: the default config and a dummy time of 0, nothing is timed.
    mode: "on" (default: every tile shape with one launch variant, then every variant of the
    TOP_TILES fastest tiles) or "full" (every candidate). Candidates that fail to compile or
    launch (out of resources) are skipped.
    """
    default = default_config(kernel, kernel_size, dilation, head_dim, dtype)
    key = config_key(kernel, kernel_size, dilation, head_dim, dtype, height, width)
    if interpreter_enabled():
        logger.debug("%s: interpreter, no timing: default %s", key, _describe(default))
        return default, {**default, "ms": 0.0, "default_ms": 0.0, "timed": 0}
    mode = mode or autotune_mode()
    candidates = candidates or candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, height, width)
    times: dict[int, float] = {}

    def time(index: int) -> None:
        if index in times:
            return
        config = candidates[index]
        try:
            times[index] = _bench(run, config)
            logger.debug("%s: %s: %.4f ms", key, _describe(config), times[index])
        except Exception as error:  # compile errors, out of resources: skip the candidate
            times[index] = float("inf")
            logger.info("%s: %s skipped: %s", key, _describe(config), str(error).splitlines()[0][:200]
                        if str(error) else type(error).__name__)

    def tile(config):
        return tuple((k, v) for k, v in config.items() if k not in CONFIG_FIELDS)

    tiles: dict = {}
    for index, config in enumerate(candidates):
        tiles.setdefault(tile(config), []).append(index)
    logger.info("%s: timing %d candidates (%d tile shapes, %s search)", key, len(candidates), len(tiles), mode)
    time(0)  # the default
    if mode == "full" or len(tiles) == len(candidates):
        for index in range(len(candidates)):
            time(index)
    else:
        # Stage 1: each tile shape with the launch variant closest to the default's.
        def closeness(index):
            config = candidates[index]
            return (config["num_warps"] != default["num_warps"], config["num_stages"] != default["num_stages"],
                    abs(config["num_warps"] - default["num_warps"]), config["num_stages"])
        for indices in tiles.values():
            time(min(indices, key=closeness))
        best_per_tile = sorted(tiles.values(), key=lambda ix: min(times.get(i, float("inf")) for i in ix))
        # Stage 2: every launch variant of the fastest tile shapes.
        for indices in best_per_tile[:TOP_TILES]:
            for index in indices:
                time(index)
    best = min(times, key=times.get)
    if times[best] == float("inf"):
        logger.warning("%s: no candidate ran; using the default", key)
        return default, {**default, "ms": None, "default_ms": None, "timed": 0}
    config = candidates[best]
    logger.info("%s: best %s: %.4f ms (default %.4f ms, %d timed)", key, _describe(config), times[best],
                times[0], len(times))
    return dict(config), {**config, "ms": round(times[best], 6), "default_ms": round(times[0], 6),
                          "timed": len(times)}


def get_config(kernel: str, kernel_size: int, dilation: int, head_dim: int, dtype: torch.dtype,
               height: int, width: int, run=None) -> dict:
    """The config a launcher uses for `kernel` on an image of height x width (any batch).

    run(config), when given, launches the kernel once with `config` on the real arguments; it is
    timed for each candidate when nothing is cached (see the module doc for the order).
    """
    key = config_key(kernel, kernel_size, dilation, head_dim, dtype, height, width)
    state = _state
    config = state.memory.get(key)
    if config is not None:
        return dict(config)
    if not state.retune:
        entry = _family_entries(family_name(kernel)).get(key)
        if entry is not None:
            config = _config_only(entry)
            state.memory[key] = config
            if state.record is not None:
                state.record[key] = {**entry, "source": "file"}
            return dict(config)
    if run is not None and autotune_enabled() and (_cuda_in_use() or interpreter_enabled()) and _can_time():
        config, entry = autotune(kernel, kernel_size, dilation, head_dim, dtype, height, width, run)
        state.memory[key] = config
        if state.record is not None:
            state.record[key] = entry
        if os.environ.get("SASA_TRITON_AUTOTUNE_SAVE", "0") not in ("", "0") and not interpreter_enabled():
            try:
                save_tuned(entries={key: entry})
            except OSError as error:
                _warn_once(f"sasa_triton: could not save tuned configs to {tuned_file()}: {error}")
        return dict(config)
    # Not cached: a later call with `run` may still tune this key.
    return default_config(kernel, kernel_size, dilation, head_dim, dtype)
