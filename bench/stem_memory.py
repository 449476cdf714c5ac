"""Bytes allocated per input pixel by one forward+backward of AttentionStem on the CPU (fp32).

Measured as issue 13 states it: torch.profiler with profile_memory=True over one forward and
backward, the total of the positive self CPU memory allocations, divided by B * H * W.

    python bench/stem_memory.py                       # the path a CPU user gets (backend="auto")
    TRITON_INTERPRET=1 python bench/stem_memory.py    # the Triton kernels, interpreted

--path fused|unfused|reference picks the stem's route explicitly (fused: the one-pass op of
ops/attention_stem.py; unfused: 1x1 conv + spatial_attention2d kernels; reference: the PyTorch
reference, the CPU path without the interpreter). Both Triton routes need TRITON_INTERPRET=1 here.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile


def allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="H = W of the input")
    parser.add_argument("--window", default="block", choices=["block", "sliding"])
    parser.add_argument("--path", default="auto", choices=["auto", "fused", "unfused", "reference"])
    args = parser.parse_args(argv)

    from sasa_triton import AttentionStem
    from sasa_triton._utils import interpreter_enabled

    torch.manual_seed(0)
    backend = {"auto": "auto", "fused": "triton", "unfused": "triton", "reference": "reference"}[args.path]
    stem = AttentionStem(window=args.window, backend=backend)
    if args.path == "unfused":
        stem.attention.fuse_max_in_channels = 0  # the 1x1 conv + spatial_attention2d route
    x = torch.randn(args.batch, 3, args.size, args.size)

    def step():
        stem(x).sum().backward()

    step()  # warm-up: first-call caches (kernel launch metadata) are not the stem's memory
    stem.zero_grad(set_to_none=True)
    total = allocated_bytes(step)
    pixels = args.batch * args.size * args.size
    route = args.path if args.path != "auto" else f"auto -> {stem.attention.route(x)}"
    print(f"AttentionStem fp32 B={args.batch} 3x{args.size}x{args.size} window={args.window} path={route} "
          f"interpreter={interpreter_enabled()} torch={torch.__version__} python={sys.version.split()[0]}")
    print(f"allocated {total / 2**20:.2f} MiB in one forward+backward = {total / pixels:.0f} B "
          f"({total / pixels / 1024:.2f} KB) per input pixel")


if __name__ == "__main__":
    main()
