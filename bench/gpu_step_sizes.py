"""Time the backward kernels at smaller steps than their defaults (a GPU probe for issue 12).

    python bench/gpu_step_sizes.py            # bf16, k 7, batch 32, the 56x56x64, 28x28x128 and 14x14x256 stages

Why: on an H200 (Triton 3.6, 2026-11-29) the 56x56 backward kernels ran at 12 % achieved
occupancy, neither memory- nor issue-bound (dq: 253 registers, memory 53 %, SM 34 %). Since
2026-11-30 dq's default at these stages takes the whole haloed strip in one step (sm_90, Triton
3.6: 190 registers and 8 % fewer instructions than the previous default, STEP_ROWS 4 with two
pipeline stages, which is this probe's half step); dk/dv at half its step needs 189 registers
instead of 224, and 160 with one pipeline stage, which on Triton 3.6 also executes fewer
instructions than two (156.5 against 173.6 per (pixel, head) at 56x56x64; bench/RESULTS.md,
2026-12-01). Whether occupancy pays for instructions is this probe's question: each kernel
alone (the other one's outputs prepared), `do_bench` medians of the default config (and, where it
takes several steps, of it with the other number of pipeline stages) and of 1/2 and 1/4 of its
STEP_ROWS (down to one row), each with one and with two pipeline stages, three
alternating rounds, and each smaller step's outputs against
the default's (max abs difference, relative to the default's max abs value). Prints one line per
(stage, kernel, config).
"""
import os
import sys

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

from sasa_triton import tuning  # noqa: E402
from sasa_triton.ops import local_attention as op  # noqa: E402

STAGES = [(32, 56, 56, 8, 8), (32, 28, 28, 8, 16), (32, 14, 14, 8, 32)]
KSIZE = 7


def _buffers(shape, configs):
    B, H, W, heads, D = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dy = (torch.randn(shape, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
    rel_rows = torch.randn(KSIZE, D // 2, device="cuda", generator=gen) * 0.5
    rel_cols = torch.randn(KSIZE, D - D // 2, device="cuda", generator=gen) * 0.5
    y, lse = op._fwd(q, k, v, rel_rows, rel_cols, KSIZE, 1, 1.0, "zeros")
    plan = op._op_plan(q, k, v, rel_rows, KSIZE, 1, "zeros", configs)
    outs = [torch.empty_like(q) for _ in range(3)] + [torch.empty(plan.drel_shape, device="cuda")]
    delta = torch.empty_like(lse)
    dq_args, dkdv_args = op._bwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, dy, delta, *outs[:3], outs[3],
                                      1.0)
    plan.dq.launch(dq_args)  # delta, which dk/dv reads
    return {"local_bwd_dq": (plan.dq, dq_args, (outs[0], outs[3])),
            "local_bwd_dkdv": (plan.dkdv, dkdv_args, (outs[1], outs[2]))}


def main() -> int:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, k {KSIZE}")
    print(f"{'stage':<16} {'kernel':<15} {'config':<26} {'us (3 rounds)':<24} {'vs default':>10} {'max diff':>9}")
    for shape in STAGES:
        D = shape[-1]
        for kernel in ("local_bwd_dq", "local_bwd_dkdv"):
            default = tuning.default_config(kernel, KSIZE, 1, D, torch.bfloat16)
            rows, configs = default["STEP_ROWS"], [default]
            if rows < default["BLOCK_H"] + 2 * (KSIZE // 2):  # several steps: the other stages too
                configs.append({**default, "num_stages": 3 - default["num_stages"]})
            configs += [{**default, "STEP_ROWS": steps, "num_stages": stages}  # down to one row
                        for steps in (rows // 2, rows // 4) if steps for stages in (1, 2)]
            reference, runs = None, []
            for config in configs:
                kernels = _buffers(shape, {kernel: config})
                kernel_plan, args, outputs = kernels[kernel]
                kernel_plan.launch(args)
                torch.cuda.synchronize()
                result = [t.float().clone() for t in outputs]
                reference = reference or result
                diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                           for a, b in zip(result, reference))
                runs.append((config, kernel_plan, args, diff, []))
            for _ in range(3):  # alternating rounds
                for _, kernel_plan, args, _, times in runs:
                    times.append(triton.testing.do_bench(lambda: kernel_plan.launch(args), warmup=25, rep=100) * 1e3)
            base = sorted(runs[0][4])[1]
            for config, _, _, diff, times in runs:
                label = (f"{config['BLOCK_H']}x{config['BLOCK_W']} STEP_ROWS {config['STEP_ROWS']} "
                         f"w{config['num_warps']} s{config['num_stages']}")
                stage = "x".join(map(str, shape[1:3])) + f"x{shape[3] * D}"
                print(f"{stage:<16} {kernel:<15} {label:<26} {' '.join(f'{t:7.1f}' for t in times):<24} "
                      f"{sorted(times)[1] / base:>9.2f}x {diff:>9.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
