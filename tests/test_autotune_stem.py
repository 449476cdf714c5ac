"""Autotuning of the stem's kernels (spatial_{block|sliding}_{fwd|bwd_dq|bwd_dkdv}): the config
space per block size and window, and a sample of candidates of each kernel through the launchers
against the float64 reference. (Which candidates spill is a fact of the compiled kernel: the
tuner prunes on it at tune time, tests/test_autotune.py.)
"""
import pytest
import torch

from sasa_triton import tuning
from sasa_triton.ops.spatial_attention import _bwd, _fwd, _meta
from sasa_triton.reference import spatial_attention2d as reference

from helpers import assert_close

WINDOWS = ("block", "sliding")
KINDS = ("fwd", "bwd_dq", "bwd_dkdv")
KERNELS = tuple(f"spatial_{w}_{k}" for w in WINDOWS for k in KINDS)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SASA_TRITON_CONFIG_FILE", raising=False)
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


# ----------------------------------------------------------------------------------------------
# (a) The space
# ----------------------------------------------------------------------------------------------

def check_launch_constraints(kernel, config, block_size, head_dim, where):
    """What the stem's launchers require of a config (_meta raises on a bad chunk)."""
    window = kernel.split("_")[1]
    tile_keys = {"GROUP", "BLOCK_M", "BLOCK_N"} if window == "block" else {"BLOCK_H", "BLOCK_W"}
    assert set(config) == tile_keys | {"TILES_PER_PROGRAM", "num_warps", "num_stages"}, where
    assert config["TILES_PER_PROGRAM"] >= 1, where
    assert config["num_warps"] in (1, 2, 4, 8, 16) and 1 <= config["num_stages"] <= 4, where
    q = torch.empty((1, 8, 8, 1, head_dim), device="meta")
    meta = _meta(q, 2, block_size, window, "zeros", config)
    assert is_pow2(meta["BLOCK_M"]) and meta["BLOCK_M"] >= 16, where
    assert is_pow2(meta["BLOCK_N"]) and meta["BLOCK_N"] >= 16, where
    if window == "block":
        assert config["GROUP"] >= 1, where
        # No chunk larger than its group of blocks needs (padded to a power of two).
        pixels = max(16, tuning.next_power_of_2(config["GROUP"] * block_size ** 2))
        assert config["BLOCK_M"] <= pixels and config["BLOCK_N"] <= pixels, where
    else:
        assert is_pow2(config["BLOCK_H"]) and is_pow2(config["BLOCK_W"]), where
        assert meta["BLOCK_N"] >= config["BLOCK_W"] + block_size - 1, where


@pytest.mark.parametrize("block_size", range(2, 9), ids=lambda b: f"bs{b}")
def test_config_space_valid_for_every_block_size(block_size):
    for kernel in KERNELS:
        for head_dim in (8, 16, 24, 32, 48, 64, 96, 128):
            for dtype in DTYPES:
                for H, W in ((224, 224), (56, 56), (8, 8), (3, 5)):
                    where = f"{kernel} bs={block_size} D={head_dim} {dtype} {H}x{W}"
                    space = tuning.candidate_configs(kernel, block_size, 1, head_dim, dtype, H, W)
                    default = tuning.default_config(kernel, block_size, 1, head_dim, dtype)
                    assert space[0] == default, where
                    if min(H, W) >= 8:
                        assert len(space) > 1, f"nothing to tune beyond the default: {where}"
                    assert len(space) <= 32, f"{len(space)} candidates: too many to tune in seconds: {where}"
                    for config in space:
                        check_launch_constraints(kernel, config, block_size, head_dim, where)


def test_space_varies_the_tile_shapes():
    """Not just warps and stages: GROUP and chunks per block size, tile shapes, TILES_PER_PROGRAM."""
    def tiles(kernel, bs, keys):
        kept = tuning.candidate_configs(kernel, bs, 1, 16, torch.bfloat16, 224, 224)
        return {tuple(c[k] for k in keys) for c in kept}
    for bs in (2, 3, 4, 5, 8):
        # At bs 8 a 64-pixel block fills a chunk of 64 or 128 by itself: one or two blocks a tile.
        assert len(tiles("spatial_block_fwd", bs, ("GROUP", "BLOCK_M", "BLOCK_N"))) >= (2 if bs == 8 else 3), bs
        assert len(tiles("spatial_block_bwd_dkdv", bs, ("TILES_PER_PROGRAM",))) >= 2, bs
        assert len(tiles("spatial_sliding_fwd", bs, ("BLOCK_H", "BLOCK_W"))) >= 3, bs
    groups2 = tiles("spatial_block_fwd", 2, ("GROUP",))
    groups4 = tiles("spatial_block_fwd", 4, ("GROUP",))
    assert groups2 != groups4 and max(groups2) > max(groups4)


# ----------------------------------------------------------------------------------------------
# (b) Candidates of each kernel through the launchers, against the float64 reference
# ----------------------------------------------------------------------------------------------

def picks(kernel, bs, dtype, count):
    """`count` non-default candidates spread over the pruned space (first, last, middle, ...)."""
    kept = tuning.candidate_configs(kernel, bs, 1, 32, dtype, 224, 224)
    kept = kept[1:] or kept  # the default when nothing else survives
    index = sorted({round(i * (len(kept) - 1) / max(1, count - 1)) for i in range(count)})
    return [kept[i] for i in index]


# block size, H, W: partial blocks / windows at the bottom and right edges, odd and even sizes.
RUNS = {"block": (3, 7, 10), "sliding": (4, 6, 9)}


@pytest.mark.parametrize("window", WINDOWS)
def test_candidates_match_the_reference(window, device):
    bs, H, W = RUNS[window]
    B, heads, D, M, scale = 1, 1, 8, 2, 0.7
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64) for _ in range(2))
    values = torch.randn(B, H, W, M, heads, D, generator=gen, dtype=torch.float64)
    mix = torch.softmax(torch.randn(bs, bs, M, generator=gen, dtype=torch.float64), dim=-1)
    dy = torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_(True) for t in (q, k, values, mix)]
    expected = reference(*ref_inputs, block_size=bs, scale=scale, window=window, padding="zeros")
    expected_grads = torch.autograd.grad(expected, ref_inputs, dy)
    inputs = [t.to(device, torch.float32) for t in (q, k, values, mix)]
    # Candidates of the 16-bit and the fp32 spaces (their warps differ), run in fp32.
    configs = [picks(f"spatial_{window}_{kind}", bs, torch.bfloat16, 2) + picks(f"spatial_{window}_{kind}", bs,
               torch.float32, 1) for kind in KINDS]
    for cfg_fwd, cfg_dq, cfg_dkdv in zip(*configs):
        where = f"{window} bs={bs}: fwd {cfg_fwd}, dq {cfg_dq}, dkdv {cfg_dkdv}"
        y = torch.full_like(inputs[0], float("nan"))
        lse = torch.full((B, heads, H, W), float("nan"), device=device)
        y, lse = _fwd(*inputs, bs, scale, window, "zeros", y=y, lse=lse, config=cfg_fwd)
        assert_close(y, expected, torch.float32, f"y ({where})")
        grads = tuple(torch.full_like(t, float("nan")) for t in inputs[:3])
        got = _bwd(*inputs, y, lse, dy.to(device, torch.float32), bs, scale, window, "zeros", grads=grads, config_dq=cfg_dq,
                   config_dkdv=cfg_dkdv)
        for name, g, e in zip(("dq", "dk", "dvalues", "dmix"), got, expected_grads):
            assert_close(g, e, torch.float32, f"{name} ({where})")
