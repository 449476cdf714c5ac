"""The local-attention kernels compile for sm_90 (H100) without a GPU, at their default configs,
without register spills, and with tensor-core instructions for half-precision inputs (the
backward kernels also in their variant that writes one dqkv, GRAD_PACK 3).

bf16 at k = 7 (the four ResNet-50 stages) is tests/test_inspect.py's; here fp32 and fp16 at a
small window. Runs on every Triton the package supports (>= 3.3): the report runs ptxas of the
release Triton compiled the PTX with (sasa_triton._compile.triton_ptxas). A spill one release
makes and the others do not is listed in tests/helpers.py's KNOWN_SPILLS.
"""
import json
import os
import subprocess
import sys

import pytest

from helpers import known_spill_bytes

SCRIPT = r"""
import json, sys, torch
from sasa_triton import tuning
from sasa_triton.ops.local_attention import static_specs
from sasa_triton._compile import static_report
dtype, kernel_size = getattr(torch, sys.argv[1]), int(sys.argv[2])
reports = []
for head_dim in (16, 32, 64):
    shape = (32, 56, 56, 8, head_dim)
    configs = {kernel: tuning.default_config(kernel, kernel_size, 1, head_dim, dtype)
               for kernel in ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")}
    for spec in static_specs(shape=shape, dtype=dtype, kernel_size=kernel_size, configs=configs):
        reports.append(dict(static_report(spec), head_dim=head_dim))
    # the backward kernels' variant writing one dqkv (SelfAttention2d's backward)
    for spec in static_specs(shape=shape, dtype=dtype, kernel_size=kernel_size, configs=configs,
                             packed_grads=True)[1:]:
        reports.append(dict(static_report(spec), head_dim=head_dim, packed_grads=True))
print(json.dumps(reports))
"""


def compile_reports(dtype, kernel_size):
    from sasa_triton._compile import toolchain_missing

    why_not = toolchain_missing()
    if why_not:
        pytest.skip(why_not)
    # @triton.jit functions are interpreter objects under TRITON_INTERPRET=1: compile in a fresh
    # process without it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: the kernels ask for fusion themselves
    proc = subprocess.run([sys.executable, "-c", SCRIPT, dtype, str(kernel_size)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype,kernel_size", [("float32", 7), ("float16", 3)])
def test_kernels_compile_for_sm90_without_spills(dtype, kernel_size):
    reports = compile_reports(dtype, kernel_size)
    assert {r["kernel"] for r in reports} == {"local_fwd", "local_bwd_dq", "local_bwd_dkdv"}
    assert sum(r.get("packed_grads", False) for r in reports) == 6  # dq, dk/dv at three head dims
    for r in reports:
        where = f"{r['kernel']} D={r['head_dim']} {dtype} k={kernel_size}: {r}"
        assert r["registers"] is not None and r["registers"] <= 255, where
        allowed = known_spill_bytes(r["kernel"], r["head_dim"])
        assert r["spill_stores"] <= allowed and r["spill_loads"] <= allowed, where
        if dtype != "float32":
            assert r["HGMMA"] > 0 or r["HMMA"] > 0, f"no tensor-core instructions in {where}"
        assert r["FFMA"] > 0, f"no fused multiply-adds in {where} (compiled without fp fusion?)"


def test_report_uses_the_ptxas_triton_compiles_with(tmp_path):
    """Triton compiles with TRITON_PTXAS_PATH (torch's inductor points it at the ptxas of torch's
    CUDA wheels), whose PTX .version the bundled ptxas may reject (issue 11: "Unsupported
    .version 9.0" on Triton 3.6 with torch 2.11+cu130): the report must run that same ptxas."""
    from sasa_triton._compile import _ptxas_candidates, toolchain_missing

    why_not = toolchain_missing()
    if why_not:
        pytest.skip(why_not)
    chosen = os.path.join(tmp_path, "ptxas")
    os.symlink(_ptxas_candidates(90)[0], chosen)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Triton 3.3 spells the second variable with a dash (TRITON_{name.upper()}_PATH).
    env.update({"TRITON_PTXAS_PATH": chosen, "TRITON_PTXAS_BLACKWELL_PATH": chosen,
                "TRITON_PTXAS-BLACKWELL_PATH": chosen})
    code = "from sasa_triton._compile import _ptxas_candidates; print(_ptxas_candidates(90)[0])"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == chosen
