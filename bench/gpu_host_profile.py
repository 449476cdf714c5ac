"""Where an op call's time goes on a GPU (bf16, k 7, 8 heads, B 32, default configs): do_bench of
the forward with q/k/v as views of one interleaved qkv tensor and as separate contiguous tensors,
wall time per call (enqueue only, and until the GPU finishes), a CUDA-graph replay of the same
calls (the kernels without the host: forward, and forward+backward), and torch.profiler's top host
and device entries.

    SASA_TRITON_AUTOTUNE=0 python bench/gpu_host_profile.py [--profile]
"""
import os
import sys
import time

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from triton.testing import do_bench  # noqa: E402

import sasa_triton  # noqa: E402
from sasa_triton.bench import _captured  # noqa: E402

dev = "cuda"


def per_call_us(fn, calls=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    enqueue = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / calls * 1e6
    return enqueue, total


def graph_us(fn, calls=50):
    """Replay time of `calls` calls captured in one CUDA graph, per call: the device's time alone."""
    replay = _captured(lambda: [fn() for _ in range(calls)])  # the benchmark's capture recipe
    return do_bench(replay, rep=200) * 1e3 / calls


for HW, C in ((56, 64), (28, 128), (14, 256), (7, 512)):
    heads, D = 8, C // 8
    qkv = torch.randn(32, HW, HW, 3, heads, D, device=dev, dtype=torch.bfloat16)
    views = qkv.unbind(3)
    contiguous = [t.contiguous() for t in views]
    rr, rc = torch.randn(7, D // 2, device=dev), torch.randn(7, D - D // 2, device=dev)
    line = [f"{HW}x{HW}x{C}:"]
    for name, (q, k, v) in (("views", views), ("contiguous", contiguous)):
        fwd = lambda: sasa_triton.local_attention2d(q, k, v, rr, rc)
        line.append(f"fwd[{name}] do_bench {do_bench(fwd, rep=100) * 1e3:.1f} us")
    q, k, v = contiguous
    fwd = lambda: sasa_triton.local_attention2d(q, k, v, rr, rc)
    enq, tot = per_call_us(fwd)
    line.append(f"fwd per call enqueue {enq:.1f} us, to finish {tot:.1f} us")
    try:
        line.append(f"fwd graph replay {graph_us(fwd):.1f} us")
    except Exception as error:  # noqa: BLE001
        line.append(f"fwd graph capture failed: {type(error).__name__}: {str(error)[:120]}")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, rr, rc)]
    dy = torch.randn_like(q)
    both = lambda: torch.autograd.grad(sasa_triton.local_attention2d(*leaves), leaves, dy)
    enq, tot = per_call_us(both, 100)
    line.append(f"fwd+bwd do_bench {do_bench(both, rep=100) * 1e3:.1f} us, per call enqueue {enq:.1f} us, "
                f"to finish {tot:.1f} us")
    try:  # the device's time for forward+backward: issue 12's fwd+bwd / fwd without the host
        line.append(f"fwd+bwd graph replay {graph_us(both, calls=20):.1f} us")
    except Exception as error:  # noqa: BLE001
        line.append(f"fwd+bwd graph capture failed: {type(error).__name__}: {str(error)[:120]}")
    print("; ".join(line), flush=True)
    if "--profile" in sys.argv and HW in (28, 7):
        from torch.profiler import ProfilerActivity, profile
        for _ in range(5):
            both()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                both()
            torch.cuda.synchronize()
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60), flush=True)
        print(table.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60), flush=True)
