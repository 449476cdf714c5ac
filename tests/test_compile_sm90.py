"""The local-attention kernels compile for sm_90 (H100) without a GPU, at their default configs,
without register spills, and with tensor-core instructions for half-precision inputs."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
from sasa_triton.ops.local_attention import static_specs
from sasa_triton._compile import static_report
dtype = getattr(torch, sys.argv[1])
reports = []
for head_dim in (16, 32, 64):
    shape = (32, 56, 56, 8, head_dim)
    for spec in static_specs(shape=shape, dtype=dtype, kernel_size=int(sys.argv[2])):
        reports.append(dict(static_report(spec), head_dim=head_dim))
print(json.dumps(reports))
"""


def compile_reports(dtype, kernel_size):
    # @triton.jit functions are interpreter objects under TRITON_INTERPRET=1: compile in a fresh
    # process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, dtype, str(kernel_size)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,kernel_size", [("bfloat16", 7), ("float32", 7), ("float16", 3)])
def test_kernels_compile_for_sm90_without_spills(dtype, kernel_size):
    reports = compile_reports(dtype, kernel_size)
    assert {r["kernel"] for r in reports} == {"local_fwd", "local_bwd_dq", "local_bwd_dkdv"}
    for r in reports:
        where = f"{r['kernel']} D={r['head_dim']} {dtype} k={kernel_size}: {r}"
        assert r["registers"] is not None and r["registers"] <= 255, where
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where
        if dtype != "float32":
            assert r["HGMMA"] > 0 or r["HMMA"] > 0, f"no tensor-core instructions in {where}"
