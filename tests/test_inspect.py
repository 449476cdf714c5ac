"""`python -m sasa_triton.inspect`: static sm_90 compilation report (no GPU needed)."""
import json
import os
import subprocess
import sys

import pytest

from sasa_triton import inspect as sasa_inspect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {"kernel", "arch", "dtype", "kernel_size", "head_dim", "source", "config", "registers", "spill_stores",
                 "spill_loads", "stack_frame", "shared_mem", "HGMMA", "HMMA", "flops_per_pixel", "bytes_per_pixel",
                 "intensity", "mma_flops_per_pixel", "shape", "t_mem_us", "t_mma_us", "t_roofline_us", "error"}


def _has_ptxas() -> bool:
    try:
        from sasa_triton._compile import _tool
        return _tool("ptxas") is not None
    except Exception:
        return False


@pytest.fixture(scope="module")
def report():
    """One run on a sample (bf16, k = 7, D = 64), with TRITON_INTERPRET=1 still set in the
    environment (tests/conftest.py sets it without CUDA): the command must re-run itself without."""
    if not _has_ptxas():
        pytest.skip("no ptxas (the triton wheel ships one for the NVIDIA backend)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sasa_triton.inspect", "--arch", "sm_90", "--dtype", "bf16",
                           "--kernel-sizes", "7", "--head-dims", "64", "--jobs", "2", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_json_has_expected_fields(report):
    assert report["arch"] == "sm_90" and report["bandwidth_tbps"] == 3.0 and report["peak_tflops"] == 790.0
    kernels = [r["kernel"] for r in report["records"]]
    assert kernels[:3] == ["local_fwd", "local_bwd_dq", "local_bwd_dkdv"]
    for record in report["records"]:
        assert set(record) == RECORD_FIELDS, record["kernel"]
        assert record["error"] is None, f"{record['kernel']}: {record['error']}"
        assert record["arch"] == "sm_90" and record["dtype"] == "bf16" and record["source"] == "default"
        assert record["registers"] > 0 and record["shared_mem"] >= 0
        assert {"num_warps", "num_stages"} <= set(record["config"])
        assert record["t_roofline_us"] >= record["t_mem_us"] > 0
    from sasa_triton.ops import spatial_attention
    if hasattr(spatial_attention, "static_specs"):  # the stem's kernels are covered too
        assert {"spatial_block_fwd", "spatial_block_bwd_dq", "spatial_block_bwd_dkdv"} <= set(kernels)


def test_default_configs_do_not_spill_and_use_tensor_cores(report):
    for record in report["records"]:
        assert record["spill_stores"] == 0 and record["spill_loads"] == 0, \
            f"{record['kernel']} {record['config']} spills: {record['spill_stores']}/{record['spill_loads']} bytes"
        assert (record["HGMMA"] or 0) + (record["HMMA"] or 0) > 0, f"{record['kernel']} has no tensor-core instruction"


def test_roofline_numbers(report):
    fwd = next(r for r in report["records"] if r["kernel"] == "local_fwd")
    k, D = 7, 64
    assert fwd["flops_per_pixel"] == 4 * k * k * D + 2 * k * D  # q.k, p.v and the 2k relative dots
    assert fwd["bytes_per_pixel"] == 4 * D * 2 + 4  # q, k, v, y in bf16 and the fp32 lse
    assert fwd["mma_flops_per_pixel"] >= fwd["flops_per_pixel"]
    B, H, W, heads = 32, 7, 7, 8  # the ResNet-50 stage of D = 64
    assert fwd["shape"] == f"{B}x{H}x{W}x{heads}x{D}"
    expected_us = B * H * W * heads * fwd["bytes_per_pixel"] / 3.0e12 * 1e6
    assert fwd["t_mem_us"] == pytest.approx(expected_us)


def test_cli_parsing():
    assert sasa_inspect.parse_arch("sm_90") == 90 and sasa_inspect.parse_arch("90") == 90
    assert sasa_inspect.parse_arch("sm_80") == 80 and sasa_inspect.parse_arch("sm_90a") == 90
    assert sasa_inspect.parse_shape("32x56x56x8") == (32, 56, 56, 8)
    with pytest.raises(SystemExit):
        sasa_inspect.parse_args(["--arch", "hopper"])
    with pytest.raises(SystemExit):
        sasa_inspect.parse_args(["--kernel-sizes", "4"])
    args = sasa_inspect.parse_args([])
    assert args.arch == 90 and args.dtype == ["bf16"] and args.bandwidth == 3.0 and args.configs == "default"


def test_tuned_file_configs_are_added(tmp_path):
    import torch

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({
        "format": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0",
        "configs": {"local_fwd/k7/d1/D64/bf16/H8/W8": {"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 4, "num_stages": 2,
                                                      "ms": 0.04, "default_ms": 0.05, "timed": 9},
                    "local_fwd/k7/d2/D64/bf16/H8/W8": {"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 4, "num_stages": 2}},
    }))
    table, notes = sasa_inspect.read_tuned_files([str(path)])
    assert table == {("local_fwd", 7, 64, "bf16"): [("tuned H8/W8", {"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 4,
                                                                     "num_stages": 2})]}
    assert "NVIDIA H100 80GB HBM3" in notes[0]
    configs = sasa_inspect._configs_for("local_fwd", "default", 7, 64, torch.bfloat16, 7, 7, table)
    assert [source for source, _ in configs] == ["default", "tuned H8/W8"]
