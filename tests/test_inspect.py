"""`python -m sasa_triton.inspect`: static sm_90 compilation report (no GPU needed), and the
instruction-count proxy of the local kernels held to tests/instruction_baseline.json.

Per Triton version (the package supports >= 3.3): the report runs the ptxas that Triton compiled
with, so it works on each; registers, the tensor-core instruction kind (3.3-3.6 often emit
mma.sync where 3.9 emits wgmma, so either counts) and the instruction counts differ by release,
so the baseline holds one entry per major.minor and the test skips, saying so, on a Triton it
has none for. A clean compile is required on every version, and no spill beyond the few that
tests/helpers.py's KNOWN_SPILLS lists per release with its reason (4-44 bytes on 3.3, 3.4 and
3.8, where the releases around them spill nothing; checked on Triton 3.3.1-3.9.0, 2026-11-30):
a spill of a default config that is not listed there is a config to change.
"""
import json
import os
import subprocess
import sys

import pytest

from sasa_triton import inspect as sasa_inspect

from helpers import known_spill_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD_FIELDS = {"kernel", "arch", "dtype", "kernel_size", "head_dim", "source", "config", "registers", "spill_stores",
                 "spill_loads", "stack_frame", "shared_mem", "HGMMA", "HMMA", "flops_per_pixel", "bytes_per_pixel",
                 "intensity", "mma_flops_per_pixel", "shape", "t_mem_us", "t_mma_us", "t_roofline_us",
                 "sass_instructions", "sass_loop_body", "sass_outside", "sass_loops", "loop_trips", "ttgir_loop_trips",
                 "warp_instructions_per_pixel_head", "error"}
BASELINE_TOLERANCE = 1.02  # the proxy may grow by 2% before the test fails


@pytest.fixture(scope="module")
def report():
    """One run at the baseline's shapes (bf16, k = 7, the four ResNet-50 stages, default configs;
    the stem kernels too), with TRITON_INTERPRET=1 still set in the environment
    (tests/conftest.py sets it without CUDA): the command must re-run itself without."""
    from sasa_triton._compile import toolchain_missing

    why_not = toolchain_missing()
    if why_not:
        pytest.skip(why_not)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "sasa_triton.inspect", "--arch", "sm_90", "--dtype", "bf16",
                           "--kernel-sizes", "7", "--head-dims", "8", "16", "32", "64", "--jobs", "2", "--json"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
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
        allowed = known_spill_bytes(record["kernel"], record.get("head_dim"))
        assert record["spill_stores"] <= allowed and record["spill_loads"] <= allowed, \
            f"{record['kernel']} {record['config']} spills: {record['spill_stores']}/{record['spill_loads']} bytes"
        assert (record["HGMMA"] or 0) + (record["HMMA"] or 0) > 0, f"{record['kernel']} has no tensor-core instruction"


def test_roofline_numbers(report):
    fwd = next(r for r in report["records"] if r["kernel"] == "local_fwd" and r["head_dim"] == 64)
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


def test_instruction_proxy_fields(report):
    local = [r for r in report["records"] if r["kernel"] in sasa_inspect.LOCAL_KERNELS]
    assert len(local) == 12
    for r in local:
        where = f"{r['kernel']} {r['shape']}"
        # The trip count from the launch meta is the one the compiled code runs (else
        # sasa_inspect.local_loop_trips no longer describes the kernel's loop); a loop the
        # compiler unrolled whole leaves no loop at all, and its straight-line code counts once.
        if r["ttgir_loop_trips"] or r["sass_loops"]:
            assert r["ttgir_loop_trips"] == [r["loop_trips"]], where
            assert r["sass_loop_body"] == max(r["sass_loops"]) > 0, where
        else:
            assert r["sass_loop_body"] == 0, where
        assert r["sass_outside"] + r["sass_loop_body"] == r["sass_instructions"], where
        pixels = r["config"]["BLOCK_H"] * r["config"]["BLOCK_W"]
        expected = r["config"]["num_warps"] * (r["sass_outside"] + r["loop_trips"] * r["sass_loop_body"]) / pixels
        assert r["warp_instructions_per_pixel_head"] == pytest.approx(expected), where


def test_instruction_proxy_does_not_grow(report):
    """Warp-instructions per (pixel, head) of each local kernel at each stage stay within 2% of
    tests/instruction_baseline.json (for this Triton version). After an improvement, rewrite it:
    python -m sasa_triton.inspect --write-instruction-baseline"""
    with open(sasa_inspect.INSTRUCTION_BASELINE) as f:
        versions = json.load(f)["triton"]
    version = sasa_inspect.triton_minor_version()
    if version not in versions:
        pytest.skip(f"no instruction baseline for Triton {version} (has {sorted(versions)}): "
                    f"python -m sasa_triton.inspect --write-instruction-baseline")
    baseline = versions[version]["warp_instructions_per_pixel_head"]
    local = [r for r in report["records"] if r["kernel"] in sasa_inspect.LOCAL_KERNELS]
    assert {sasa_inspect.instruction_baseline_key(r) for r in local} == set(baseline)
    grown = []
    for r in local:
        key = sasa_inspect.instruction_baseline_key(r)
        if r["warp_instructions_per_pixel_head"] > baseline[key] * BASELINE_TOLERANCE:
            grown.append(f"{key} {r['config']}: {r['warp_instructions_per_pixel_head']:.1f} > {baseline[key]}")
    assert not grown, "warp-instructions per (pixel, head) grew:\n" + "\n".join(grown)


# A made-up SASS listing in cuobjdump's layout: an outer loop (0x0020-0x0090) holding an inner
# one (0x0040-0x0060, two back edges to it), and a second, smaller loop (0x00b0-0x00c0).
SASS = """
\tcode for sm_90a
\t\tFunction : kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                    /* 0x0000000000007919 */
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;               /* 0x0 */
        /*0030*/               @P1 BRA 0x80 ;                            /* 0x0 */
        /*0040*/                   FADD R3, R3, R4 ;                     /* 0x0 */
        /*0050*/               @P2 BRA 0x40 ;                            /* 0x0 */
        /*0060*/                   BRA.U !UP0, 0x40 ;                    /* 0x0 */
        /*0070*/                   FMUL R3, R3, R4 ;                     /* 0x0 */
        /*0080*/                   ISETP.NE.AND P0, PT, R2, 0xe, PT ;    /* 0x0 */
        /*0090*/               @P0 BRA 0x20 ;                            /* 0x0 */
        /*00a0*/                   MOV R5, R3 ;                          /* 0x0 */
        /*00b0*/                   FADD R5, R5, R5 ;                     /* 0x0 */
        /*00c0*/               @P4 BRA 0xb0 ;                            /* 0x0 */
        /*00d0*/                   EXIT ;                                /* 0x0 */
        /*00e0*/                   BRA 0xe0;                             /* 0x0 */
        /*00f0*/                   NOP;                                  /* 0x0 */
        /*0100*/                   NOP;                                  /* 0x0 */
"""


def test_sass_instruction_profile_finds_loops():
    from sasa_triton._compile import instructions_per_pixel_head, sass_instruction_profile

    profile = sass_instruction_profile(SASS)
    assert profile["total"] == 14  # up to EXIT; the trap and the padding after it are left out
    assert profile["loops"] == [
        {"start": "0x20", "end": "0x90", "instructions": 8, "depth": 0},
        {"start": "0x40", "end": "0x60", "instructions": 3, "depth": 1},
        {"start": "0xb0", "end": "0xc0", "instructions": 2, "depth": 0},
    ]
    assert profile["hot_loop"] == 0 and profile["body"] == 8 and profile["outside"] == 6
    report = {"BLOCK_H": 2, "BLOCK_W": 8, "num_warps": 4, "sass_outside": 6, "sass_loop_body": 8}
    assert instructions_per_pixel_head(report, 14) == 4 * (6 + 14 * 8) / 16
    with pytest.raises(ValueError, match="trips"):
        instructions_per_pixel_head(report, -1)
    with pytest.raises(ValueError, match="one kernel function"):
        sass_instruction_profile(SASS + SASS)


def test_ttgir_loop_trips():
    from sasa_triton._compile import ttgir_loop_trips

    ttgir = """
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c2_i32 = arith.constant 2 : i32 loc(#loc1)
    %c14_i32 = arith.constant 14 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %acc:3 = scf.for %key_step = %c0_i32 to %c14_i32 step %c1_i32 iter_args(%m = %x) -> (f32) : i32 {
      %inner = scf.for %t = %c0_i32 to %c2_i32 step %c1_i32 iter_args(%a = %m) -> (f32) : i32 {
      }
    }
    %other = scf.for %j = %c1_i32 to %c14_i32 step %c2_i32 iter_args(%a = %m) -> (f32) : i32 {
    }
    %runtime = scf.for %j = %c0_i32 to %n step %c1_i32 iter_args(%a = %m) -> (f32) : i32 {
    }
"""
    assert ttgir_loop_trips(ttgir) == [14, 7, None]  # outermost loops only; 13 steps of 2 from 1 is 7 trips


def test_local_instruction_report_checks_its_arguments():
    import torch

    with pytest.raises(ValueError, match="shape"):
        sasa_inspect.local_instruction_report((32, 56, 56, 8), torch.bfloat16, 7)
    with pytest.raises(TypeError, match="dtype"):
        sasa_inspect.local_instruction_report((32, 56, 56, 8, 8), torch.float64, 7)
    with pytest.raises(ValueError, match="kernel_size"):
        sasa_inspect.local_instruction_report((32, 56, 56, 8, 8), torch.bfloat16, 4)
    with pytest.raises(ValueError, match="local_fwd"):
        sasa_inspect.local_instruction_report((32, 56, 56, 8, 8), torch.bfloat16, 7,
                                              {"local_fwd": {"BLOCK_H": 2, "BLOCK_W": 16}})
    with pytest.raises(ValueError, match="kernel must be one of"):
        sasa_inspect.local_instruction_report((32, 56, 56, 8, 8), torch.bfloat16, 7, {"fwd": {}})


def test_cli_config_option():
    args = sasa_inspect.parse_args(["--config", 'local_fwd={"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 1, '
                                                '"num_stages": 1}'])
    assert args.explicit == {"local_fwd": [{"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 1, "num_stages": 1}]}
    for bad in ("local_fwd", 'local_fwd={"BLOCK_H": 2}', 'fwd={"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 1, '
                                                         '"num_stages": 1}', "local_fwd={"):
        with pytest.raises(SystemExit):
            sasa_inspect.parse_args(["--config", bad])
    configs = sasa_inspect._configs_for("local_fwd", "default", 7, 8, __import__("torch").bfloat16, 56, 56,
                                        explicit=args.explicit)
    assert [source for source, _ in configs] == ["default", "explicit"]
    assert sasa_inspect.parse_args([], prog="sasa-triton inspect").explicit == {}
