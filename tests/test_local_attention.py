"""The Triton kernels of local_attention2d against the float64 reference, forward and backward.

Without CUDA they run through Triton's interpreter (tests/conftest.py); with CUDA, compiled, with
the configs pinned (conftest: no tuned files, a private cache). Every comparison bounds each
element's error by PyTorch's own error in the same dtype (helpers.assert_close_to_reference).

The interpreter tests run the GPU's default configs (tuning.gpu_default_config) and a sample of
the autotuning candidates explicitly, so CI checks the tiles a GPU runs. SASA_TRITON_EXTENDED_TESTS=1
runs the full grid of default configs (windows 3-15, dilations 1-2, head dims 8-72, fp32 and fp16;
about 30 min on 2 cores) and more candidates.
"""
import os
import random
import types
from itertools import product, zip_longest

import pytest
import torch

import sasa_triton
from sasa_triton import tuning
from sasa_triton.ops.local_attention import _bwd, _fwd, _op_plan, _tile_config, channel_tile, computed_keys, qkv_parts
from sasa_triton.reference import local_attention2d as reference

from helpers import (TRANSFORMS, assert_close_to_reference, assert_rounding_noise, assert_transforms_match_reference,
                     autograd_graph_nodes, reference_in_dtype, zero_in_exact_arithmetic)

KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")
GRADIENTS = ("dq", "dk", "dv", "drel_rows", "drel_cols")
EXTENDED = os.environ.get("SASA_TRITON_EXTENDED_TESTS", "0") not in ("", "0")
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def gpu_defaults(kernel_size, dilation, head_dim, dtype):
    """{kernel: the config a GPU launch uses by default} (opaque dicts), also under the interpreter."""
    return {name: tuning.gpu_default_config(name, kernel_size, dilation, head_dim, dtype) for name in KERNELS}


# ----------------------------------------------------------------------------------------------
# Inputs, runs and checks
# ----------------------------------------------------------------------------------------------

def make_inputs(B, H, W, heads, D, k, rel, device, dtype, seed=0):
    """Kernel inputs in `dtype` on `device` (the tables stay fp32, as parameters do under
    autocast) and an upstream gradient dy (float64, on the CPU)."""
    gen = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    rel_rows = rel_cols = None
    if rel is not None:
        lead = (heads,) if rel == "per_head" else ()
        rel_rows = (torch.randn(*lead, k, D // 2, generator=gen, dtype=torch.float64) * 0.5).float()
        rel_cols = (torch.randn(*lead, k, D - D // 2, generator=gen, dtype=torch.float64) * 0.5).float()
    dy = torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64)
    inputs = [t if t is None else t.to(device) for t in (q, key, v, rel_rows, rel_cols)]
    return inputs, dy


def results_by_autograd(fn, inputs, dy, cast=lambda t: t, **options):
    """{"y", "dq", "dk", "dv", "drel_rows", "drel_cols"} of fn(inputs) with dy, through autograd."""
    leaves = [None if t is None else cast(t).detach().requires_grad_(True) for t in inputs]
    y = fn(*leaves, **options)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, dy.to(y.device, y.dtype))
    return {"y": y, **dict(zip(GRADIENTS, grads))}


def results_of_launchers(inputs, dy, configs, kernel_size, dilation, scale, padding):
    """The same from the launchers with explicit configs ({kernel: config}), plus "lse"."""
    q, key, v, rel_rows, rel_cols = inputs
    y, lse = _fwd(q, key, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding, config=configs["local_fwd"])
    grads = _bwd(q, key, v, rel_rows, rel_cols, y, lse, dy.to(q.device, q.dtype), kernel_size, dilation, scale,
                 padding, config_dq=configs["local_bwd_dq"], config_dkdv=configs["local_bwd_dkdv"])
    out = {"y": y, "lse": lse, **dict(zip(GRADIENTS, grads))}
    return {name: t for name, t in out.items() if t is not None}


def references(inputs, dy, **options):
    """The float64 reference's results and PyTorch's in the inputs' dtype (the yardstick)."""
    exact = results_by_autograd(reference, inputs, dy, cast=lambda t: t.double(), **options)
    in_dtype = results_by_autograd(reference_in_dtype, inputs, dy, **options)
    return exact, in_dtype


def check_results(results, exact, in_dtype, dtype, label="", **bounds):
    """y and every gradient of `results` within assert_close_to_reference of the float64 ones. A
    gradient that is zero in exact arithmetic (k = 1: a softmax over one key has none; a one-row
    image with mask padding: the rel_rows taps shift every logit of a query alike) comes out as
    rounding noise, in PyTorch's computation as in the kernels' (which form p * (dp - delta)
    from the rounded y, as flash-attention does): it is bounded by 3x PyTorch's largest error plus
    64 ulps of y's scale. `bounds`: assert_close_to_reference's atol_units, rms_atol_units."""
    assert set(exact) <= set(results), f"{label}: missing {set(exact) - set(results)}"
    y_scale = exact["y"].abs().max().item() if "y" in exact else 0.0
    for name in exact:
        assert results[name].dtype == in_dtype[name].dtype, f"{label} {name}: dtype {results[name].dtype}"
        if name != "y" and zero_in_exact_arithmetic(exact[name], y_scale):
            assert_rounding_noise(results[name], exact[name], dtype, y_scale, f"{label} {name}", in_dtype[name])
            continue
        assert_close_to_reference(results[name], exact[name], in_dtype[name], dtype, f"{label} {name}", **bounds)


def case_id(B, H, W, heads, D, k, dilation, padding, rel, dtype=None):
    table = {"shared": "shared", "per_head": "perhead", None: "norel"}[rel]
    dtype_part = f"-{DTYPE_IDS[dtype]}" if dtype is not None else ""
    return f"B{B}-H{H}-W{W}-h{heads}-D{D}-k{k}-d{dilation}-{padding}-{table}{dtype_part}"


def case(*args):
    return pytest.param(*args, id=case_id(*args))


# ----------------------------------------------------------------------------------------------
# The public op: odd and edge shapes (image smaller than the window, odd head dims) through autograd
# ----------------------------------------------------------------------------------------------

PUBLIC_CASES = [
    # B, H, W, heads, D, k, dilation, padding, rel, dtype
    case(2, 6, 5, 2, 6, 3, 2, "mask", "per_head", torch.float32),
    case(1, 4, 9, 1, 10, 7, 1, "zeros", "shared", torch.float32),
    case(1, 3, 3, 1, 20, 7, 1, "mask", "per_head", torch.float32),
    case(1, 5, 6, 2, 9, 5, 1, "zeros", None, torch.float16),
    # odd D with tables: rel_rows has one channel fewer than rel_cols (their gradients split apart)
    case(1, 5, 6, 2, 9, 5, 1, "zeros", "shared", torch.float32),
    case(2, 4, 5, 2, 7, 3, 1, "mask", "per_head", torch.float32),
    # edge shapes: a 1 x 1 window, one-row, one-column and one-pixel images, heads of one and two
    # channels (the tables one channel each), a dilated window wider than the image
    case(2, 5, 6, 2, 8, 1, 1, "zeros", "shared", torch.float32),
    case(1, 4, 9, 1, 16, 1, 1, "mask", None, torch.float16),
    case(2, 1, 9, 2, 8, 5, 1, "mask", "per_head", torch.float32),
    case(2, 1, 5, 3, 16, 9, 2, "mask", "per_head", torch.float16),
    case(1, 7, 1, 1, 6, 3, 2, "zeros", "shared", torch.float16),
    case(1, 1, 1, 2, 8, 7, 1, "zeros", "per_head", torch.float32),
    case(2, 5, 4, 3, 1, 3, 1, "zeros", None, torch.float32),
    case(1, 6, 5, 2, 2, 5, 1, "mask", "shared", torch.float32),
    case(1, 4, 5, 1, 8, 5, 3, "mask", "shared", torch.float16),
]


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel,dtype", PUBLIC_CASES)
def test_public_op_matches_reference(B, H, W, heads, D, k, dilation, padding, rel, dtype, device):
    """local_attention2d (the config this machine looks up) and its autograd, y and every gradient."""
    inputs, dy = make_inputs(B, H, W, heads, D, k, rel, device, dtype)
    options = dict(kernel_size=k, dilation=dilation, scale=0.5, padding=padding)
    results = results_by_autograd(sasa_triton.local_attention2d, inputs, dy, backend="triton", **options)
    check_results(results, *references(inputs, dy, **options), dtype)


def test_bf16_matches_reference(device):
    """bf16 through the public op (under the interpreter, computed in fp32: Triton's interpreter
    mishandles bf16) within bf16's bound of the float64 reference."""
    inputs, dy = make_inputs(1, 5, 9, 1, 16, 3, "shared", device, torch.bfloat16)
    options = dict(kernel_size=3, dilation=1, scale=0.5, padding="zeros")
    results = results_by_autograd(sasa_triton.local_attention2d, inputs, dy, backend="triton", **options)
    assert results["y"].dtype == torch.bfloat16
    check_results(results, *references(inputs, dy, **options), torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# The GPU's default configs, run explicitly (through the interpreter in CI)
# ----------------------------------------------------------------------------------------------

# Images of two tiles or more each way (one way for a few) for the default tiles (2 x 8, dk/dv 4 x 8
# in 16 bits at D <= 16, at r = 1, 3, 4; 4 x 4, dk/dv 8 x 4, at r = 2, 5, 6; 8 x 2, dk/dv 16 x 2,
# at r = 7), so that tile edges, the halo of a neighbouring tile and the image border all
# occur; small, because the interpreter is slow (a case at k = 15 or at D > 64 with k = 11 costs
# 10-40 s there: SASA_TRITON_EXTENDED_TESTS=1 runs the rest).
DEFAULT_CONFIG_CASES = [
    # B, H, W, heads, D, k, dilation, padding, rel, dtype
    case(1, 10, 9, 1, 8, 3, 1, "zeros", "shared", torch.float32),
    case(1, 9, 6, 2, 16, 3, 2, "mask", "per_head", torch.float16),
    case(1, 9, 9, 1, 64, 7, 1, "zeros", None, torch.float16),
    case(1, 6, 11, 2, 32, 7, 1, "mask", "per_head", torch.float16),  # dq: the whole 8 x 16 strip at D 32
    case(1, 5, 17, 1, 8, 7, 2, "zeros", "shared", torch.float16),
    case(1, 5, 17, 1, 16, 11, 1, "mask", "shared", torch.float32),
    case(1, 5, 17, 1, 8, 15, 1, "mask", "shared", torch.float16),
    case(1, 10, 5, 1, 16, 15, 1, "zeros", "shared", torch.float32),  # 8 x 2 tiles, two rows of them
    case(1, 9, 9, 1, 72, 3, 1, "mask", "shared", torch.float16),
    case(1, 4, 9, 1, 72, 7, 1, "zeros", "shared", torch.float32),
]


def _extended_default_cases():
    """Every window of 3-15, dilation 1-2, head dim 8, 16, 64, 72 (D > 64 tiles) in fp32 and fp16,
    padding and tables rotating through the grid."""
    cases = []
    rotation = [("zeros", "shared"), ("mask", "per_head"), ("mask", "shared"), ("zeros", None)]
    for index, (k, dilation, D, dtype) in enumerate(
            (k, d, D, dt) for k in (3, 7, 11, 15) for d in (1, 2) for D in (8, 16, 64, 72)
            for dt in (torch.float32, torch.float16)):
        padding, rel = rotation[(index // 2 + index % 2 + index // 8) % len(rotation)]  # each dtype and D sees all
        radius = dilation * (k // 2)
        # two default tiles or more each way: 2 x 8 (r <= 4), 8 x 2 (r = 7), else 4 x 4
        H, W = (9, 10) if radius <= 4 else (10, 5) if radius == 7 else (5, 18)
        heads = 2 if rel == "per_head" else 1
        cases.append(case(1, H, W, heads, D, k, dilation, padding, rel, dtype))
    return cases


@pytest.mark.parametrize("k,dilation,width", [(3, 1, 8), (5, 1, 4), (7, 1, 8), (9, 1, 8), (11, 1, 4), (13, 1, 4),
                                               (15, 1, 2), (3, 2, 4), (7, 2, 4)])
def test_default_tile_computes_the_fewest_logits(k, dilation, width):
    """Each kernel's default tile computes no more logits per query than the same kernel's default
    at another width (8 or 4, and 2 at radius 7; a narrower one only where it computes fewer), and
    the forward's width at 16 bits and D 8 is the one whose strip is narrower."""
    for kernel, D, dtype in product(KERNELS, (8, 16, 32, 64, 72), (torch.bfloat16, torch.float32)):
        default = tuning.gpu_default_config(kernel, k, dilation, D, dtype)
        pixels = default["BLOCK_H"] * default["BLOCK_W"]
        for other_width in (8, 4, 2) if dilation * (k // 2) == 7 else (8, 4):
            other = _tile_config(kernel, k, dilation, channel_tile(D), dtype, pixels // other_width, other_width)
            assert computed_keys(default, k, dilation) <= computed_keys(other, k, dilation), (kernel, D, dtype)
            if other_width > default["BLOCK_W"]:
                assert computed_keys(default, k, dilation) < computed_keys(other, k, dilation), (kernel, D, dtype)
    assert tuning.gpu_default_config("local_fwd", k, dilation, 8, torch.bfloat16)["BLOCK_W"] == width


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel,dtype",
                         _extended_default_cases() if EXTENDED else DEFAULT_CONFIG_CASES)
def test_gpu_default_configs(B, H, W, heads, D, k, dilation, padding, rel, dtype, device):
    """The forward, dq and dk/dv kernels, each at the GPU's default config for the key, against
    float64: y and every gradient."""
    inputs, dy = make_inputs(B, H, W, heads, D, k, rel, device, dtype)
    options = dict(kernel_size=k, dilation=dilation, scale=0.5, padding=padding)
    configs = gpu_defaults(k, dilation, D, dtype)
    results = results_of_launchers(inputs, dy, configs, **options)
    check_results(results, *references(inputs, dy, **options), dtype, label=str(configs))


# ----------------------------------------------------------------------------------------------
# Autotuning candidates
# ----------------------------------------------------------------------------------------------

def candidates(kernel, kernel_size, dilation, head_dim, dtype, height, width):
    return tuning.candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, height, width)


def _tile(config):
    """A config without its launch parameters (warps, stages): what the interpreter runs."""
    return tuple(sorted((k, v) for k, v in config.items() if k not in tuning.CONFIG_FIELDS))


def candidate_sample(kernel, n, *key):
    """The default and n other tiles of the key's candidates, picked at random with a fixed seed
    (the interpreter ignores warps and stages, so one config per tile)."""
    configs = candidates(kernel, *key)
    by_tile = {}
    for config in configs[1:]:
        by_tile.setdefault(_tile(config), config)
    by_tile.pop(_tile(configs[0]), None)
    tiles = sorted(by_tile)
    picked = random.Random(f"{kernel}{key}").sample(tiles, min(n, len(tiles)))
    return [configs[0]] + [by_tile[t] for t in picked]


def check_candidates(inputs, dy, options, per_kernel, dtype):
    """Runs the i-th candidate of each kernel together (the default stands in for a kernel with
    fewer) and checks every output against float64 and lse against the default config's lse.
    Returns the mismatches, one line each (after trying every candidate)."""
    exact, in_dtype = references(inputs, dy, **options)
    defaults = {kernel: configs[0] for kernel, configs in per_kernel.items()}
    default_lse = None
    failures = []
    for picks in zip_longest(*per_kernel.values()):
        configs = {kernel: pick or defaults[kernel] for kernel, pick in zip(per_kernel, picks)}
        label = ", ".join(f"{kernel} {configs[kernel]}" for kernel in per_kernel)
        try:
            results = results_of_launchers(inputs, dy, configs, **options)
            if default_lse is None:  # the first combination is every kernel's default
                default_lse = results["lse"]
            check_results(results, exact, in_dtype, dtype, label)
            torch.testing.assert_close(results["lse"], default_lse, rtol=1e-5, atol=1e-5, msg=lambda m: f"lse: {m}")
        except AssertionError as error:
            failures.append(f"{label}: {str(error).splitlines()[0]}")
    return failures


def test_candidate_configs_sample(device):
    """A deterministic sample of the autotuning candidates of each kernel for one small key, run
    explicitly, against float64 and the default config (the first candidate)."""
    B, H, W, heads, D, k, dilation = 1, 10, 11, 1, 16, 7, 1
    dtype = torch.float32
    inputs, dy = make_inputs(B, H, W, heads, D, k, "shared", device, dtype)
    options = dict(kernel_size=k, dilation=dilation, scale=0.5, padding="zeros")
    per_kernel = {kernel: candidate_sample(kernel, 1 + EXTENDED * 3, k, dilation, D, dtype, H, W)
                  for kernel in KERNELS}
    assert all(len(configs) > 1 for configs in per_kernel.values()), per_kernel
    failures = check_candidates(inputs, dy, options, per_kernel, dtype)
    assert not failures, "\n".join(failures)


PAIR_CASES = [  # B, H, W, heads, D, k, dilation, padding, rel, dtype
    case(2, 9, 11, 4, 8, 7, 1, "zeros", "shared", torch.float32),
    case(1, 6, 7, 2, 8, 3, 2, "mask", "per_head", torch.float16),
    case(1, 5, 9, 2, 4, 5, 1, "zeros", None, torch.float32),
    case(1, 6, 6, 3, 8, 3, 1, "zeros", "per_head", torch.float32),  # odd heads: one head a program
]


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel,dtype", PAIR_CASES)
def test_forward_head_pairs(B, H, W, heads, D, k, dilation, padding, rel, dtype, device):
    """The forward's HEADS_PER_PROGRAM 2 candidate (two heads' packed channels in one program):
    every y and lse element written (outputs poisoned), against float64 and the default config."""
    inputs, _ = make_inputs(B, H, W, heads, D, k, rel, device, dtype)
    options = (k, dilation, 0.5, padding)
    default = tuning.gpu_default_config("local_fwd", k, dilation, D, dtype)
    paired = {**default, "HEADS_PER_PROGRAM": 2}
    y = torch.full((B, H, W, heads, D), float("nan"), dtype=dtype, device=device)
    lse = torch.full((B, heads, H, W), float("nan"), device=device)
    y, lse = _fwd(*inputs, *options, y=y, lse=lse, config=paired)
    y_default, lse_default = _fwd(*inputs, *options, config=default)
    exact = reference(*(None if t is None else t.double() for t in inputs), *options)
    in_dtype = reference_in_dtype(*inputs, *options)
    assert_close_to_reference(y, exact, in_dtype, dtype, "y")
    torch.testing.assert_close(y, y_default, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse_default, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dilation,padding,rel", [(1, "zeros", "shared"), (2, "mask", "per_head")])
def test_dkdv_row_bias_by_fmas_and_by_dot_and_gather(dilation, padding, rel, device):
    """dk/dv's two ways to the row bias (ROW_BIAS_FMA: FMAs against the step's table slice where
    Dr * BLOCK_H <= 16; else a dot against every tap and a gather): at D = 16 a 2 x 8 key tile
    takes the first, a 4 x 8 tile the second (the default here, k = 5, is 4 x 4). Both against
    float64, and against each other."""
    B, H, W, heads, D, k = 1, 9, 11, 2, 16, 5
    dtype = torch.float32
    inputs, dy = make_inputs(B, H, W, heads, D, k, rel, device, dtype)
    options = dict(kernel_size=k, dilation=dilation, scale=0.5, padding=padding)
    exact, in_dtype = references(inputs, dy, **options)
    defaults = gpu_defaults(k, dilation, D, dtype)
    runs = {}
    for block_h in (2, 4):
        configs = {**defaults, "local_bwd_dkdv": {**defaults["local_bwd_dkdv"], "BLOCK_H": block_h, "BLOCK_W": 8}}
        plan = _op_plan(*inputs[:4], k, dilation, padding, configs)
        runs[plan.dkdv.meta["ROW_BIAS_FMA"]] = results = results_of_launchers(inputs, dy, configs, **options)
        check_results(results, exact, in_dtype, dtype, label=f"dk/dv BLOCK_H {block_h}")
    assert set(runs) == {0, 1}
    for name in ("dk", "dv"):
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("D", [8, 16])
def test_dkdv_half_step_candidate(D, device):
    """dk/dv's half-step candidates in 16 bits (config_space; one 16-wide row a step here, k = 7,
    at D 8 with the row bias by FMAs, at D 16 by dot and gather) are in the tuner's space and
    compute what the default computes: against float64, and dk, dv against the default's."""
    B, H, W, heads, k, dtype = 1, 9, 11, 2, 7, torch.float16
    default = tuning.gpu_default_config("local_bwd_dkdv", k, 1, D, dtype)
    half = {**default, "STEP_ROWS": default["STEP_ROWS"] // 2}
    assert half["STEP_ROWS"] >= 1 and half in candidates("local_bwd_dkdv", k, 1, D, dtype, 56, 56)
    inputs, dy = make_inputs(B, H, W, heads, D, k, "shared", device, dtype)
    options = dict(kernel_size=k, dilation=1, scale=0.5, padding="zeros")
    exact, in_dtype = references(inputs, dy, **options)
    defaults = gpu_defaults(k, 1, D, dtype)
    runs = []
    for config in (default, half):
        runs.append(results_of_launchers(inputs, dy, {**defaults, "local_bwd_dkdv": config}, **options))
        check_results(runs[-1], exact, in_dtype, dtype, label=f"dk/dv {config}")
    for name in ("dk", "dv"):
        torch.testing.assert_close(runs[1][name], runs[0][name], rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# The check itself: it must reject what the kernels could get wrong
# ----------------------------------------------------------------------------------------------

CHECK_DTYPES = [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (torch.float32, torch.float16, torch.bfloat16)]


def reference_outputs(dtype, padding="zeros", k=7, shape=(1, 9, 10, 2, 16)):
    """Inputs in dtype; the float64 output, PyTorch's in dtype, and the float64 output of
    `padding` rounded to dtype (the best a kernel computing it can return)."""
    B, H, W, heads, D = shape
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", "cpu", dtype)
    options = dict(kernel_size=k, scale=0.5)
    exact = reference(*(t.double() for t in (q, key, v, rel_rows, rel_cols)), padding="zeros", **options)
    in_dtype = reference_in_dtype(q, key, v, rel_rows, rel_cols, padding="zeros", **options)
    kernel_like = reference(*(t.double() for t in (q, key, v, rel_rows, rel_cols)), padding=padding, **options)
    return exact, in_dtype, kernel_like.to(dtype)


@pytest.mark.parametrize("dtype", CHECK_DTYPES)
def test_check_accepts_correct_output(dtype):
    exact, in_dtype, correct = reference_outputs(dtype)
    assert_close_to_reference(correct, exact, in_dtype, dtype, "y")
    # So does an fp32 computation rounded to dtype (what the kernels do).
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(1, 9, 10, 2, 16, 7, "shared", "cpu", dtype)
    fp32 = reference(q.float(), key.float(), v.float(), rel_rows, rel_cols, kernel_size=7, scale=0.5)
    assert_close_to_reference(fp32.to(dtype), exact, in_dtype, dtype, "y")


@pytest.mark.parametrize("k", [7, 15])
@pytest.mark.parametrize("dtype", CHECK_DTYPES)
def test_check_rejects_mask_where_zeros_was_asked(dtype, k):
    exact, in_dtype, masked = reference_outputs(dtype, padding="mask", k=k, shape=(1, 12, 11, 2, 16))
    with pytest.raises(AssertionError, match="worst at"):
        assert_close_to_reference(masked, exact, in_dtype, dtype, "y")


@pytest.mark.parametrize("dtype", CHECK_DTYPES)
def test_check_rejects_two_zeroed_elements(dtype):
    exact, in_dtype, correct = reference_outputs(dtype)
    # Two elements of typical size (|y| >= its RMS), as a kernel skipping a store would leave.
    typical = torch.nonzero(exact.abs().flatten() >= exact.pow(2).mean().sqrt()).flatten()
    assert typical.numel() > 100
    wrong = correct.clone().flatten()
    wrong[typical[[17, 101]]] = 0
    with pytest.raises(AssertionError, match="2 of .* elements"):
        assert_close_to_reference(wrong.view_as(correct), exact, in_dtype, dtype, "y")


@pytest.mark.parametrize("dtype", CHECK_DTYPES)
def test_check_rejects_nan(dtype):
    exact, in_dtype, correct = reference_outputs(dtype)
    wrong = correct.clone()
    wrong[0, 4, 5, 1, 3] = float("nan")
    with pytest.raises(AssertionError, match=r"1 non-finite values, first at \[\[0, 4, 5, 1, 3\]\]"):
        assert_close_to_reference(wrong, exact, in_dtype, dtype, "y")


# ----------------------------------------------------------------------------------------------
# Buffers, layouts, extremes
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["zeros", "mask"])
def test_every_output_element_is_written(padding, device):
    """Poisoned (NaN) output and gradient buffers come back fully finite (the GPU's default configs)."""
    B, H, W, heads, D, k = 1, 5, 10, 1, 12, 5
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    configs = gpu_defaults(k, 1, D, torch.float32)
    y = torch.full_like(q, float("nan"))
    lse = torch.full((B, heads, H, W), float("nan"), device=device)
    y, lse = _fwd(q, key, v, rel_rows, rel_cols, k, 1, 1.0, padding, y=y, lse=lse, config=configs["local_fwd"])
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    dy = torch.randn_like(q)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))
    dq, dk, dv, drr, drc = _bwd(q, key, v, rel_rows, rel_cols, y, lse, dy, k, 1, 1.0, padding, grads=grads,
                                config_dq=configs["local_bwd_dq"], config_dkdv=configs["local_bwd_dkdv"])
    for g in (dq, dk, dv, drr, drc):
        assert torch.isfinite(g).all()


def test_preallocated_gradients_of_different_layouts_are_refused(device):
    """_bwd writes dq, dk and dv with one set of strides: gradients that share a shape but not a
    layout (here dk transposed in H and W) are refused, not written as if laid out like dq."""
    B, H, W, heads, D, k = 1, 6, 6, 1, 8, 3
    (q, key, v, rel_rows, rel_cols), dy = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    dy = dy.to(device, torch.float32)
    y, lse = _fwd(q, key, v, rel_rows, rel_cols, k, 1, 1.0, "zeros")
    transposed = torch.empty(B, W, H, heads, D, device=device).transpose(1, 2)
    assert transposed.shape == q.shape and transposed.stride() != q.stride()
    for grads in ((torch.empty_like(q), transposed, torch.empty_like(q)),
                  (torch.empty_like(q), torch.empty_like(q), transposed)):
        with pytest.raises(ValueError, match="grads must be contiguous"):
            _bwd(q, key, v, rel_rows, rel_cols, y, lse, dy, k, 1, 1.0, "zeros", grads=grads)


def test_row_strides_past_int32_offsets_are_refused():
    """A tile's haloed strip is addressed with int32 offsets: the largest row stride whose
    strip stays under 2**31 elements is planned, the next one is refused with a clear error."""
    shape = (1, 4, 2, 1, 8)
    plan = _op_plan(*(torch.empty(shape, device="meta"),) * 3, None, 3, 1, "zeros")
    rows = max(p.meta["BLOCK_H"] + 2 * p.meta["DILATION"] * (p.meta["KSIZE"] // 2) + p.meta["STEP_ROWS"]
               for p in (plan.fwd, plan.dq, plan.dkdv))
    limit = -(-2 ** 31 // rows)  # the smallest row stride with rows * stride >= 2**31
    for stride_h in (limit - 1, limit):
        view = torch.empty(0, device="meta").as_strided(shape, (4 * stride_h, stride_h, 8, 8, 1))
        if stride_h < limit:
            assert _op_plan(view, view, view, None, 3, 1, "zeros").strides[1] == stride_h
        else:
            with pytest.raises(ValueError, match="rows are too far apart"):
                _op_plan(view, view, view, None, 3, 1, "zeros")


def test_noncontiguous_and_channels_last_views(device):
    """q, k, v as strided views of one fused projection: channels_last needs no copy, NCHW is
    copied to contiguous tensors first; y and every gradient either way."""
    B, H, W, heads, D, k = 1, 5, 6, 2, 8, 3
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64)
    for memory_format, copied in ((torch.contiguous_format, True), (torch.channels_last, False)):
        qkv = torch.randn(B, 3 * heads * D, H, W, generator=gen).to(device).contiguous(memory_format=memory_format)
        q, key, v = qkv.permute(0, 2, 3, 1).unflatten(-1, (3, heads, D)).unbind(3)
        rel_rows = torch.randn(k, D // 2, generator=gen).to(device)
        rel_cols = torch.randn(k, D - D // 2, generator=gen).to(device)
        assert _op_plan(q, key, v, rel_rows, k, 1, "zeros").copy_qkv is copied
        inputs = [q, key, v, rel_rows, rel_cols]
        results = results_by_autograd(sasa_triton.local_attention2d, inputs, dy, kernel_size=k, backend="triton")
        check_results(results, *references(inputs, dy, kernel_size=k), torch.float32, str(memory_format))


def split_projection(t, heads):
    """q, k, v as the views of a (B, 3 * heads * D, H, W) projection, (B, H, W, heads, D) each."""
    return t.permute(0, 2, 3, 1).unflatten(-1, (3, heads, t.shape[1] // (3 * heads))).unbind(3)


@pytest.mark.parametrize("rel", ["shared", None])
def test_unbound_qkv_takes_its_gradient_in_one_piece(rel, device):
    """q, k, v unbound from one channels_last qkv projection that requires grad: the kernels write
    their gradients into one tensor laid out like the projection, which autograd hands it directly
    (no UnbindBackward stacking three). y and every gradient bitwise as with separate q, k, v
    leaves, and against float64; NaN-poisoned, the one gradient comes back fully written."""
    B, H, W, heads, D, k = 2, 5, 6, 2, 8, 3
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(B, 3 * heads * D, H, W, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    tables = [None, None] if rel is None else [torch.randn(k, D // 2, generator=gen).to(device),
                                               torch.randn(k, D - D // 2, generator=gen).to(device)]
    dy = torch.randn(B, H, W, heads, D, generator=gen).to(device)
    options = dict(kernel_size=k, padding="mask", backend="triton")

    qkv = proj.clone().requires_grad_(True)
    q, key, v = split_projection(qkv, heads)
    assert qkv_parts(q, key, v) is qkv
    tables_packed = [None if t is None else t.clone().requires_grad_(True) for t in tables]
    y = sasa_triton.local_attention2d(q, key, v, *tables_packed, **options)
    assert "UnbindBackward0" not in autograd_graph_nodes(y.grad_fn)
    y.backward(dy)
    d_packed = split_projection(qkv.grad, heads)

    leaves = [t.detach().requires_grad_(True) for t in split_projection(proj, heads)]
    assert qkv_parts(*leaves) is None  # separate leaves
    tables_apart = [None if t is None else t.clone().requires_grad_(True) for t in tables]
    y_apart = sasa_triton.local_attention2d(*leaves, *tables_apart, **options)
    y_apart.backward(dy)
    assert torch.equal(y, y_apart)
    for name, got, want in zip(("dq", "dk", "dv"), d_packed, (t.grad for t in leaves)):
        assert torch.equal(got, want), name
    if rel is not None:
        for got, want in zip(tables_packed, tables_apart):
            assert torch.equal(got.grad, want.grad)
        results = {"y": y, **dict(zip(GRADIENTS, (*d_packed, *(t.grad for t in tables_packed))))}
        inputs = [*(t.detach() for t in leaves), *tables]
        check_results(results, *references(inputs, dy.double().cpu(), kernel_size=k, padding="mask"),
                      torch.float32, "packed")

    # Every element of the one gradient is written (a NaN-poisoned buffer laid out like qkv).
    y, lse = _fwd(*(t.detach() for t in (q, key, v)), *tables, k, 1, 1.0, "mask")
    poisoned = torch.full_like(proj, float("nan"))
    grads = split_projection(poisoned, heads)
    _bwd(*(t.detach() for t in (q, key, v)), *tables, y, lse, dy, k, 1, 1.0, "mask", grads=grads)
    assert torch.isfinite(poisoned).all()


def test_views_that_do_not_cover_one_packed_tensor_take_gradients_apart(device):
    """The one-piece gradient needs q, k, v to be, in order, the parts of one channels_last
    projection that requires grad, made with grad enabled, none with retain_grad() or a hook;
    otherwise each takes its own."""
    B, H, W, heads, D = 1, 4, 5, 2, 8
    channels_last = torch.randn(B, 3 * heads * D, H, W).to(device).contiguous(memory_format=torch.channels_last)
    nchw = channels_last.contiguous().requires_grad_(True)
    packed = channels_last.requires_grad_(True)
    q, key, v = split_projection(packed, heads)
    assert qkv_parts(q, key, v) is packed
    six_d = torch.randn(B, H, W, 3, heads, D).to(device).requires_grad_(True)  # also one piece
    assert qkv_parts(*six_d.unbind(3)) is six_d
    assert qkv_parts(*six_d.transpose(1, 2).unbind(3)) is None  # its parts not laid out as the kernels write
    assert qkv_parts(*split_projection(nchw, heads)) is None  # NCHW: the kernels read a copy
    assert qkv_parts(key, q, v) is None  # another order
    assert qkv_parts(q, key.detach(), v) is None  # one of them without grad
    with torch.no_grad():
        assert qkv_parts(*split_projection(packed, heads)) is None  # views made without grad
    q, key, v = split_projection(packed, heads)
    key.retain_grad()
    assert qkv_parts(q, key, v) is None  # a part's own gradient asked for
    q, key, v = split_projection(packed, heads)
    v.register_hook(lambda grad: grad)
    assert qkv_parts(q, key, v) is None
    wider = torch.randn(B, 4 * heads * D, H, W).to(device).contiguous(memory_format=torch.channels_last)
    wider.requires_grad_(True)
    assert qkv_parts(*wider.permute(0, 2, 3, 1).unflatten(-1, (4, heads, D)).unbind(3)[:3]) is None  # not all of it


def test_functorch_wrappers_take_autograds_python_apply(device):
    """The op calls autograd's own apply directly unless functorch is involved: a dead functorch
    wrapper (a tensor leaked out of a transform) is still unwrapped and computed on; under an
    active transform the op runs its reference (test_forward_ad_and_torch_func_transforms)."""
    leaked = []
    torch.func.grad(lambda t: leaked.append(t) or t.sum())(torch.randn(1, 4, 4, 2, 8).to(device))
    dead = leaked[0]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    q, key = (torch.randn(1, 4, 4, 2, 8).to(device).requires_grad_(True) for _ in range(2))
    options = dict(kernel_size=3, backend="triton")
    y = sasa_triton.local_attention2d(dead, key, key, **options)
    assert torch.equal(y, sasa_triton.local_attention2d(torch._C._functorch.unwrap_if_dead(dead), key, key, **options))
    grad = torch.func.grad(lambda t: sasa_triton.local_attention2d(t, key, key, **options).sum())(q.detach())
    assert torch.equal(grad, torch.func.grad(lambda t: reference(t, key, key, kernel_size=3).sum())(q.detach()))


@pytest.mark.parametrize("D", [8, 7])
def test_shared_table_gradients_reach_their_parameters_uncopied(D, device):
    """The backward sums the tiles' partial table gradients into one buffer that holds the
    rel_rows gradient, then the rel_cols one, each contiguous: autograd then keeps them as the
    parameters' .grad (a non-contiguous gradient would be copied by AccumulateGrad, one more
    kernel per table and step)."""
    gen = torch.Generator().manual_seed(3)
    q, key, v = (torch.randn(2, 5, 6, 2, D, generator=gen).to(device).requires_grad_(True) for _ in range(3))
    rel_rows = torch.randn(5, D // 2, generator=gen).to(device).requires_grad_(True)
    rel_cols = torch.randn(5, D - D // 2, generator=gen).to(device).requires_grad_(True)
    y = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=5, backend="triton")
    dy = torch.randn(y.shape, generator=gen).to(device)
    y.backward(dy)
    # Both kept as the backward returned them (a copy would have storage of its own): two
    # contiguous views of the one sum.
    assert rel_rows.grad.shape == rel_rows.shape and rel_cols.grad.shape == rel_cols.shape
    assert rel_rows.grad.is_contiguous() and rel_cols.grad.is_contiguous()
    assert rel_rows.grad.untyped_storage().data_ptr() == rel_cols.grad.untyped_storage().data_ptr()


def _tensors_held(obj, depth=4, seen=None):
    """The tensors an object reaches through its attributes, containers and slots (a few levels)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth == 0 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype,
                                                          torch.device, torch.Size, type, types.FunctionType,
                                                          types.MethodType, types.BuiltinFunctionType)):
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        names = [n for cls in type(obj).__mro__ for n in getattr(cls, "__slots__", ())]
        children = [getattr(obj, n) for n in names if hasattr(obj, n)] + list(getattr(obj, "__dict__", {}).values())
    return [t for child in children for t in _tensors_held(child, depth - 1, seen)]


def test_launch_plans_are_cached_per_layout_and_follow_the_tuning_state(device):
    """An op call looks its launch plan up once (the backward reuses the forward's); the plan is
    per shape and strides, and a reset of the tuning state (new configs) rebuilds it."""
    qkv = torch.randn(1, 4, 4, 3, 2, 8).to(device)
    q, key, v = qkv.unbind(3)
    rel_rows, rel_cols = torch.randn(3, 4).to(device), torch.randn(3, 4).to(device)
    plan = _op_plan(q, key, v, rel_rows, 3, 1, "zeros")
    assert _op_plan(q, key, v, rel_rows, 3, 1, "zeros") is plan and not plan.copy_qkv
    assert plan.strides == q.stride()[:3] and plan.drel_shape == (plan.dq.programs, 2, 3, 4)
    # A cached plan holds no tensor: one allocated while torch.compile's CUDA graphs record would
    # stay alive in their pool, which they refuse (seen on an H200 with one-element templates).
    assert not _tensors_held(plan), _tensors_held(plan)
    contiguous = _op_plan(q.contiguous(), key.contiguous(), v.contiguous(), rel_rows, 3, 1, "zeros")
    assert contiguous is not plan and contiguous.strides == q.contiguous().stride()[:3]
    assert _op_plan(q, key, v, None, 3, 1, "zeros").drel_shape == (1,)
    # Explicit configs (the tuner times each candidate's launches) are planned once each too.
    config = tuning.gpu_default_config("local_fwd", 3, 1, 8, q.dtype)
    explicit = _op_plan(q, key, v, rel_rows, 3, 1, "zeros", {"local_fwd": config})
    assert explicit is not plan and explicit.fwd.config == config
    assert _op_plan(q, key, v, rel_rows, 3, 1, "zeros", {"local_fwd": dict(config)}) is explicit
    tuning.clear_cache()
    assert _op_plan(q, key, v, rel_rows, 3, 1, "zeros") is not plan
    with pytest.raises(ValueError, match="rows are too far apart"):
        wide = torch.empty(1, 4, 2 ** 28, 2, 8, device="meta")
        _op_plan(wide, wide, wide, None, 3, 1, "zeros")
    # CUDA's grid takes at most 65535 row (column) tiles: one more is a clear error, not a driver's.
    row_tiles = torch.empty(1, 65535 * plan.fwd.meta["BLOCK_H"], 1, 1, 8, device="meta")
    assert _op_plan(row_tiles, row_tiles, row_tiles, None, 3, 1, "zeros").fwd.grid[1] == 65535
    for shape, name in (((1, 65535 * 16 + 1, 1, 1, 8), "height"), ((1, 1, 65535 * 16 + 1, 1, 8), "width")):
        tall = torch.empty(shape, device="meta")
        with pytest.raises(ValueError, match=f"image {name} {65535 * 16 + 1} is too large for the kernels' launch grid"):
            _op_plan(tall, tall, tall, None, 3, 1, "zeros")


def test_op_calls_find_their_plan_with_their_route(device, monkeypatch):
    """An op call's checks and launch plan are one lookup per kind of call: after the first call
    of a kind, calls without grad and with it (forward and backward) build no plan, until the
    tuning state is reset; the plan depends on strides, so a copy of q, k, v is another kind."""
    from sasa_triton.ops import local_attention as op

    built = []
    real_op_plan = op._op_plan
    monkeypatch.setattr(op, "_op_plan", lambda *args, **kwargs: built.append(args[0].stride()) or
                        real_op_plan(*args, **kwargs))
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 5, 6, 3, 2, 8, generator=gen).to(device)
    tables = [torch.randn(3, 4, generator=gen).to(device) for _ in range(2)]
    leaves = [t.clone().requires_grad_(True) for t in (*qkv.unbind(3), *tables)]
    tuning.clear_cache()
    with torch.no_grad():
        expected = reference(*qkv.unbind(3), *tables, 3)
        for _ in range(2):
            y = sasa_triton.local_attention2d(*qkv.unbind(3), *tables, kernel_size=3)
            assert torch.allclose(y, expected, atol=1e-4)
    assert built == [qkv.unbind(3)[0].stride()]
    for _ in range(2):
        torch.autograd.grad(sasa_triton.local_attention2d(*leaves, kernel_size=3), leaves, torch.ones(1, 5, 6, 2, 8, device=device))
    assert len(built) == 2  # the contiguous leaves: another kind, planned once
    tuning.clear_cache()
    with torch.no_grad():
        sasa_triton.local_attention2d(*qkv.unbind(3), *tables, kernel_size=3)
    assert len(built) == 3


def test_saved_tensors_hold_nothing_of_window_size(device):
    """What autograd keeps for backward: q, k, v, y, the log-sum-exp and the embeddings."""
    B, H, W, heads, D, k = 1, 6, 5, 2, 8, 3
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    for t in (q, key, v, rel_rows, rel_cols):
        t.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
    allowed = {tuple(q.shape), (B, heads, H, W), tuple(rel_rows.shape), tuple(rel_cols.shape)}
    shapes = [tuple(t.shape) for t in saved]
    assert all(s in allowed for s in shapes), shapes
    assert sum(t.numel() for t in saved) <= 4 * q.numel() + B * heads * H * W + rel_rows.numel() + rel_cols.numel()
    out.sum().backward()


def test_fp16_large_logits_do_not_overflow(device):
    """Logits near 1e4 in fp16 inputs stay finite: the softmax runs in fp32 (PyTorch's own fp16
    softmax overflows here, so the yardstick is fp32 rounded to fp16)."""
    B, H, W, heads, D, k = 1, 4, 4, 1, 16, 3
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    key = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    v = torch.randn(B, H, W, heads, D, generator=gen).half()
    logits = (q.float() * key.float()).sum(-1)
    assert logits.abs().max() > 1e3
    out = sasa_triton.local_attention2d(q.to(device), key.to(device), v.to(device), kernel_size=k, backend="triton")
    assert torch.isfinite(out).all()
    exact = reference(q.double(), key.double(), v.double(), kernel_size=k)
    in_fp32 = reference(q.float(), key.float(), v.float(), kernel_size=k).half()
    assert_close_to_reference(out, exact, in_fp32, torch.float16, "y")


def test_nan_reaches_every_query_that_sees_it(device):
    """A NaN value reaches every query whose window holds it. (Like flash-attention, it can also
    reach other queries of the same tile: 0 * NaN in the tensor-core product; finite inputs
    always give finite outputs, see the poison and large-logit tests.)"""
    B, H, W, heads, D, k = 1, 7, 7, 1, 8, 3
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    v = v.clone()
    v[0, 0, 0, 0, 0] = float("nan")
    out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
    nan_pixels = torch.isnan(out).any(-1).any(-1)[0].cpu()
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:2, :2] = True  # the queries whose 3x3 window holds pixel (0, 0)
    assert torch.all(nan_pixels[expected])


def test_empty_batch(device):
    q = torch.randn(0, 4, 4, 2, 8, device=device)
    rel_rows, rel_cols = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    for t in (q, rel_rows, rel_cols):
        t.requires_grad_(True)
    out = sasa_triton.local_attention2d(q, q, q, rel_rows, rel_cols, kernel_size=3, backend="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert rel_rows.grad is not None and torch.all(rel_rows.grad == 0)


def test_backend_selection_on_cpu(monkeypatch, device):
    """CPU tensors run the kernels only under the interpreter; "auto" falls back to the reference
    elsewhere; "reference" runs anywhere; float64 is the reference's alone. The same on a machine
    with or without CUDA."""
    q = torch.randn(1, 4, 4, 1, 4, dtype=torch.float64)
    out = sasa_triton.local_attention2d(q, q, q, kernel_size=3, backend="reference")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):  # where the kernels can run, not in float64
        sasa_triton.local_attention2d(*(q.to(device),) * 3, kernel_size=3, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q32 = q.float()
    with pytest.raises(ValueError, match="backend='triton'"):
        sasa_triton.local_attention2d(q32, q32, q32, kernel_size=3, backend="triton")
    out = sasa_triton.local_attention2d(q32, q32, q32, kernel_size=3)  # auto: the reference on the CPU
    torch.testing.assert_close(out, reference(q32, q32, q32, kernel_size=3), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# GPU only: compiled kernels at the pinned default configs (conftest), then every candidate
# ----------------------------------------------------------------------------------------------

GPU_WINDOWS = [pytest.param(k, d, id=f"k{k}-d{d}") for k, d in [(3, 1), (7, 1), (7, 2), (11, 1), (15, 1), (15, 2)]]
GPU_VARIANTS = [  # head dim, padding, tables
    pytest.param(32, "zeros", "shared", id="D32-zeros-shared"),
    pytest.param(64, "mask", "per_head", id="D64-mask-perhead"),
    pytest.param(96, "zeros", None, id="D96-zeros-norel"),
    pytest.param(128, "mask", "shared", id="D128-mask-shared"),
]
GPU_DTYPES = [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("D,padding,rel", GPU_VARIANTS)
@pytest.mark.parametrize("k,dilation", GPU_WINDOWS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_matches_reference(dtype, k, dilation, D, padding, rel):
    """The public op on CUDA (default configs: conftest pins them), y and every gradient, windows
    up to 15, dilation 2, D up to 128, both paddings, shared, per-head and absent tables."""
    B, H, W, heads = 2, 30, 27, 4
    inputs, dy = make_inputs(B, H, W, heads, D, k, rel, "cuda", dtype)
    options = dict(kernel_size=k, dilation=dilation, scale=0.5, padding=padding)
    results = results_by_autograd(sasa_triton.local_attention2d, inputs, dy, **options)
    check_results(results, *references(inputs, dy, **options), dtype)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_repeatable():
    B, H, W, heads, D, k = 4, 28, 28, 8, 16, 7
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", "cuda", torch.bfloat16)
    for t in (q, key, v, rel_rows, rel_cols):
        t.requires_grad_(True)
    dy = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k)
        runs.append(torch.autograd.grad(out, (q, key, v, rel_rows, rel_cols), dy))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_forward_backward_and_layer_replay_in_cuda_graphs():
    """The op's forward+backward and SelfAttention2d captured in CUDA graphs (how small feature
    maps escape the per-call host cost) replay to the eager results, bit for bit, on new inputs."""
    B, H, W, heads, D, k = 2, 14, 14, 8, 32, 7
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", "cuda", torch.bfloat16)
    leaves = [t.requires_grad_(True) for t in (q, key, v, rel_rows, rel_cols)]
    dy = torch.randn_like(q)

    def step():
        out = sasa_triton.local_attention2d(*leaves, kernel_size=k)
        return (out, *torch.autograd.grad(out, leaves, dy))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():  # new inputs in the captured buffers
        for t in leaves:
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for name, got, want in zip(["y", *GRADIENTS], captured, step()):
        assert torch.equal(got, want), f"{name}: the replay differs from the eager call"

    layer = sasa_triton.SelfAttention2d(64, 64, kernel_size=k, heads=8).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(B, 64, H, W, device="cuda").to(memory_format=torch.channels_last).requires_grad_(True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    x_new = torch.randn_like(x).requires_grad_(True)
    out = graphed(x_new)
    out.backward(torch.ones_like(out))
    x_eager = x_new.detach().clone().requires_grad_(True)
    want = layer(x_eager)
    want.backward(torch.ones_like(want))
    # (cuDNN's 1x1 convolutions may pick other algorithms in a capture: fp32-close, not bitwise)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_new.grad, x_eager.grad, rtol=1e-5, atol=1e-5)


# ResNet-50's four attention stages (8 heads, k = 7) at batch 2, in bf16 (fp16 compiles to the same
# tensor-core layouts) and fp32 (FMA dots). Last in this file: a candidate that faults poisons the
# CUDA context, and with it every test after it.
# Three more windows in bf16 where narrower tiles (4 x 4, 8 x 4, 8 x 2, 16 x 2) are defaults and candidates.
RESNET50_STAGES = [pytest.param(H, D, 7, id=f"H{H}-D{D}") for H, D in [(56, 8), (28, 16), (14, 32), (7, 64)]]
NARROW_TILE_KEYS = [pytest.param(28, 16, 11, id="H28-D16-k11"), pytest.param(14, 32, 5, id="H14-D32-k5"),
                    pytest.param(28, 16, 15, id="H28-D16-k15")]


# Each key's candidates in three shards (the default first in each), so that pytest-xdist spreads a
# key over workers: a whole k = 11 or 15 key (32 candidates per kernel) outlasted a 250 s timeout
# on an H200 with 15 workers compiling at once.
CANDIDATE_SHARDS = 3


@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(CANDIDATE_SHARDS), ids=lambda shard: f"part{shard}")
@pytest.mark.parametrize("dtype,H,D,k", [
    pytest.param(dt, *stage.values, id=f"{DTYPE_IDS[dt]}-{stage.id}")
    for dt in (torch.bfloat16, torch.float32) for stage in RESNET50_STAGES
] + [pytest.param(torch.bfloat16, *key.values, id=f"bf16-{key.id}") for key in NARROW_TILE_KEYS])
def test_gpu_every_candidate_config(dtype, H, D, k, shard):
    """Every autotuning candidate of the forward, dq and dk/dv kernels at a ResNet-50 stage shape
    (k = 7), and at three keys whose default tiles are narrower, against float64 (and lse against
    the default config's): lists every mismatch. The i-th candidates of the three kernels run
    together; this shard takes every third i after the default's."""
    B, heads = 2, 8
    inputs, dy = make_inputs(B, H, H, heads, D, k, "shared", "cuda", dtype)
    options = dict(kernel_size=k, dilation=1, scale=1.0, padding="zeros")
    # zip_longest pairs the i-th candidates; the same slice of every list keeps those pairs whole
    per_kernel = {}
    for kernel in KERNELS:
        configs = candidates(kernel, k, 1, D, dtype, H, H)
        per_kernel[kernel] = configs[:1] + configs[1 + shard::CANDIDATE_SHARDS]
    failures = check_candidates(inputs, dy, options, per_kernel, dtype)
    assert not failures, f"{len(failures)} failing candidate combinations:\n" + "\n".join(failures)


@pytest.mark.parametrize("layout", ["apart", "packed", "strided", "registered"])
def test_double_backward_goes_through_the_reference(layout, device):
    """create_graph=True (a gradient penalty, a double backward): the first- and second-order
    gradients of every input against float64, each way the op is called: q, k, v apart (per-head
    tables, mask padding), as the parts of one packed qkv (its gradient in one piece), with heads
    and channels not packed (the kernels read contiguous copies) and through the registered op (torch.compile's route).
    The Triton backward's outputs have no graph: through them the second-order terms came out zero,
    with no error; such a backward now runs through the PyTorch reference."""
    from helpers import assert_penalty_gradients

    B, H, W, heads, D, ksize = 1, 5, 6, 2, 4, 3
    gen = torch.Generator().manual_seed(7)
    per_head = (heads,) if layout == "apart" else ()
    tables = [torch.randn(*per_head, ksize, D // 2, generator=gen) for _ in range(2)]
    options = dict(kernel_size=ksize, dilation=1, scale=0.8, padding="mask" if layout == "apart" else "zeros")

    def op(backend):
        call = lambda q, k, v, rel_rows, rel_cols: sasa_triton.local_attention2d(  # noqa: E731
            q, k, v, rel_rows, rel_cols, backend=backend, **options)
        if layout == "registered" and backend == "triton":
            call = lambda *args: torch.ops.sasa_triton.local_attention2d_fwd(*args, *options.values())[0]  # noqa: E731
        if layout == "packed":  # the leaf is qkv (B, H, W, 3, heads, D): q, k, v its parts
            return lambda qkv, *tables: call(*qkv.unbind(3), *tables)
        if layout == "strided":  # the leaves are (B, H, W, D, heads): q, k, v their transposes
            return lambda q, k, v, *tables: call(q.transpose(3, 4), k.transpose(3, 4), v.transpose(3, 4), *tables)
        return call

    if layout == "packed":
        leaves, names = [torch.randn(B, H, W, 3, heads, D, generator=gen), *tables], ["qkv", "rel_rows", "rel_cols"]
        qkv = leaves[0].to(device).requires_grad_(True)
        assert qkv_parts(*qkv.unbind(3)) is qkv  # the packed path
    else:
        shape = (B, H, W, D, heads) if layout == "strided" else (B, H, W, heads, D)
        leaves = [torch.randn(shape, generator=gen) for _ in range(3)] + tables
        names = ["q", "k", "v", "rel_rows", "rel_cols"]
    if layout == "strided":
        q = leaves[0].to(device).transpose(3, 4)
        assert _op_plan(q, q, q, leaves[3], ksize, 1, "zeros").copy_qkv  # the kernels take copies
    leaves = [t.to(device) for t in leaves]
    assert_penalty_gradients(op("triton"), op("reference"), leaves, names)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_forward_ad_and_torch_func_transforms(transform, device, monkeypatch):
    """Forward-mode AD and torch.func's transforms through the op: against the float64 reference.
    The kernels have rules for neither (a dual input's tangent was dropped, None, with no error;
    the transforms raised "Cannot access storage of TensorWrapper" and the like), so under them
    the op runs its PyTorch reference; the next plain call launches the kernels again."""
    from sasa_triton.ops import local_attention as op

    inputs, _ = make_inputs(1, 4, 5, 2, 4, 3, "shared", device, torch.float32, seed=11)
    q, k, v, rel_rows, rel_cols = inputs
    t = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(device)
    options = dict(kernel_size=3, dilation=1, scale=0.9, padding="mask")

    def fn(backend, dtype):
        cast = lambda x: x.to(dtype)  # noqa: E731
        return lambda x: sasa_triton.local_attention2d(x, cast(k), cast(v), cast(rel_rows), cast(rel_cols),
                                                       backend=backend, **options)

    assert_transforms_match_reference(transform, fn, q, t, t)
    launches = []
    real_launch = op._launch
    monkeypatch.setattr(op, "_launch", lambda plan, args: (launches.append(plan), real_launch(plan, args)))
    with torch.no_grad():
        sasa_triton.local_attention2d(q, k, v, rel_rows, rel_cols, backend="triton", **options)
    assert len(launches) == 1


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter: inf * 0
@pytest.mark.parametrize("tensor", ["k", "v"])
def test_non_finite_inputs_stay_within_their_tiles_strips(tensor, device):
    """An inf in one pixel of k or v: the kernels' masks are additive biases (-inf) and the p.v
    dot multiplies p = 0 by it, so every query of a tile whose strip holds that pixel comes out
    non-finite (the reference: only the queries whose window holds it; README). This pins that it
    goes no further: y and every gradient at pixels more than two strips' extent away from it
    are the clean run's, bitwise."""
    ksize = 3
    inputs, dy = make_inputs(1, 8, 48, 1, 8, ksize, "shared", device, torch.float32, seed=21)
    dy = dy.to(device, torch.float32)
    row, col = 4, 24

    def run(tensors):
        leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        y = sasa_triton.local_attention2d(*leaves, kernel_size=ksize, backend="triton")
        grads = torch.autograd.grad(y, leaves[:3], dy)  # dq, dk, dv: (B, H, W, heads, D)
        return [y, *grads]

    clean = run(inputs)
    poisoned = list(inputs)
    index = ("k", "v").index(tensor) + 1
    poisoned[index] = poisoned[index].clone()
    poisoned[index][0, row, col] = float("inf")
    dirty = run(poisoned)
    plan = _op_plan(*inputs[:4], ksize, 1, "zeros")  # the tiles that ran
    metas = [kernel_plan.meta for kernel_plan in (plan.fwd, plan.dq, plan.dkdv)]
    reach_rows = 2 * max(meta["BLOCK_H"] + 2 * (ksize // 2) for meta in metas)
    reach_cols = 2 * max(meta["BLOCK_W"] + 2 * (ksize // 2) for meta in metas)
    rows, cols = torch.arange(8, device=device), torch.arange(48, device=device)
    far = ((rows - row).abs() > reach_rows)[:, None] | ((cols - col).abs() > reach_cols)[None, :]
    assert far.any() and not far.all()
    for name, a, b in zip(["y", "dq", "dk", "dv"], clean, dirty):
        assert torch.isfinite(a).all()
        if (tensor, name) != ("v", "dv"):  # dv = p^T dy does not read v
            assert not torch.isfinite(b).all(), name  # the poison reached its window at least
        assert torch.equal(a[0][far], b[0][far]), name
