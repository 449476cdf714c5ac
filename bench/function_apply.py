"""The op's autograd Function applied through torch.autograd.Function.apply and through `_apply`.

    python bench/function_apply.py [--shape B H W heads D] [--rounds 300]

Runs without a GPU, as `python -m sasa_triton.bench_host` does (TRITON_INTERPRET=1, every kernel
launch stubbed, process CPU time, one CPU thread). Times the op's Function (q, k, v and both
tables requiring grad, k = 7), forward and forward + autograd.grad, applied through
torch.autograd.Function.apply (Python around autograd's own apply: default-argument binding,
the functorch check, unwrapping dead functorch wrappers from every argument) and through the
op's `_apply` (autograd's own apply where no functorch transform or wrapper is involved, which is
what local_attention2d calls). Alternating rounds of 10 calls each; min, 10th percentile and
median of the rounds (a shared machine only ever adds time). Both compute the same values
(tests/test_local_attention.py::test_functorch_wrappers_take_autograds_python_apply and every
autograd test of the op).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _rounds(jobs: dict, rounds: int, calls: int = 10) -> dict:
    """{name: (min, p10, median) microseconds per call over `rounds` alternating rounds}."""
    for fn in jobs.values():
        for _ in range(100):
            fn()
    times = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, fn in jobs.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            times[name].append((time.process_time() - start) / calls * 1e6)
    return {name: (min(t), sorted(t)[len(t) // 10], statistics.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 7, 7, 8, 64], metavar=("B", "H", "W", "HEADS", "D"))
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton is imported
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env)

    import torch

    from sasa_triton.ops import local_attention as op

    op._launch = lambda plan, launch_args: None
    torch.set_num_threads(1)
    B, H, W, heads, D = args.shape
    leaves = [torch.randn(B, H, W, heads, D).requires_grad_(True) for _ in range(3)]
    leaves += [torch.randn(7, D // 2).requires_grad_(True), torch.randn(7, D - D // 2).requires_grad_(True)]
    dy = torch.randn(B, H, W, heads, D)
    options = (7, 1, 1.0, "zeros")
    jobs = {
        "Function.apply forward": lambda: op._LocalAttention.apply(*leaves, *options),
        "_apply forward": lambda: op._apply(*leaves, *options),
        "Function.apply forward+backward":
            lambda: torch.autograd.grad(op._LocalAttention.apply(*leaves, *options), leaves, dy),
        "_apply forward+backward": lambda: torch.autograd.grad(op._apply(*leaves, *options), leaves, dy),
    }
    best = _rounds(jobs, args.rounds)
    print(f"the op's autograd Function at {B} x {H} x {W} x {heads} x {D}, k = 7, tables; launches stubbed, "
          f"torch {torch.__version__}; us per call, {args.rounds} rounds of 10 calls:")
    print(f"  {'':32s} {'min':>7s} {'p10':>7s} {'median':>7s}")
    for name, (low, p10, median) in best.items():
        print(f"  {name:32s} {low:7.1f} {p10:7.1f} {median:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
