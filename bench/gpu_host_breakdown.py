"""Where the host time of one forward+backward op call goes on a GPU machine (issue 12): the
eager call takes about 1 ms on the lent H200 VM against 29 us for a forward under no_grad, and
the CPU benchmark with the launches stubbed (python -m sasa_triton.bench_host) cannot see the
CUDA side (Triton's launcher, the driver, the caching allocator, the autograd engine's device
thread). Every figure is the wall time to enqueue one call (the fastest of 5 rounds, the GPU
synchronised between rounds) at a shape whose kernels are short (B 32, 7x7, 8 heads, D 64, bf16,
k 7, default configs), then cProfile of the direct launches.

    SASA_TRITON_AUTOTUNE=0 python bench/gpu_host_breakdown.py

A dry run of the script's logic without a GPU (tiny, interpreted, timings meaningless):
TRITON_INTERPRET=1 HOST_BREAKDOWN_DRY=1 python bench/gpu_host_breakdown.py
"""
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("SASA_TRITON_AUTOTUNE", "0")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import sasa_triton  # noqa: E402
from sasa_triton.bench_host import measure  # noqa: E402
from sasa_triton.ops import local_attention as op  # noqa: E402

DRY = os.environ.get("HOST_BREAKDOWN_DRY") == "1"
dev = "cpu" if DRY else "cuda"
sync = (lambda: None) if DRY else torch.cuda.synchronize


def enqueue_us(fn, calls=200, rounds=5):
    if DRY:
        calls, rounds = 1, 1
    for _ in range(1 if DRY else 20):
        fn()
    sync()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
        sync()
    return best


B, H, W, heads, D, k = (1 if DRY else 32), 7, 7, 8, 64, 7
qkv = torch.randn(B, H, W, 3, heads, D, device=dev, dtype=torch.bfloat16)
q, key, v = (t.contiguous() for t in qkv.unbind(3))
rel_rows, rel_cols = torch.randn(k, D // 2, device=dev), torch.randn(k, D - D // 2, device=dev)
options = (k, 1, 1.0, "zeros")
y, lse = op._fwd(q, key, v, rel_rows, rel_cols, *options)
dy = torch.randn_like(y)
rows = []


def row(name, fn, calls=200):
    us = enqueue_us(fn, calls)
    rows.append((name, us))
    print(f"{name:<72} {us:8.1f} us", flush=True)


print("cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch", torch.__version__, "triton", __import__("triton").__version__)
print(f"enqueue wall time per call, B {B} {H}x{W} heads {heads} D {D} bf16 k {k}")
small = torch.zeros(1024, device=dev)
row("torch: small.add_(1) (one PyTorch kernel launch)", lambda: small.add_(1))
row("torch: torch.empty_like(q)", lambda: torch.empty_like(q))
row("torch: 3 x torch.empty_like(q)", lambda: [torch.empty_like(q) for _ in range(3)])
plan = op._op_plan(q, key, v, rel_rows, k, 1, "zeros")
fwd_args = op._fwd_args(plan, q, key, v, rel_rows, rel_cols, y, lse, 1.0)
row("triton: forward kernel launch alone (prepared args; direct, the op's path)",
    lambda: op._launch(plan.fwd, fwd_args))
row("triton: forward kernel launch alone (prepared args; through JITFunction.run)",
    lambda: op._local_attn_fwd_kernel[plan.fwd.grid](*fwd_args, **plan.fwd.launch.meta))
delta = torch.empty_like(lse)
dq, dk, dv = (torch.empty_like(q) for _ in range(3))
drel = torch.empty(plan.drel_shape, device=dev)
dq_args, dkdv_args = op._bwd_args(plan, q, key, v, rel_rows, rel_cols, y, lse, dy, delta, dq, dk, dv, drel, 1.0)
row("triton: dq kernel launch alone (prepared args; direct)", lambda: op._launch(plan.dq, dq_args))
row("triton: dq kernel launch alone (prepared args; through JITFunction.run)",
    lambda: op._local_attn_bwd_dq_kernel[plan.dq.grid](*dq_args, **plan.dq.launch.meta))
row("triton: dk/dv kernel launch alone (prepared args; direct)", lambda: op._launch(plan.dkdv, dkdv_args))
row("torch: drel.sum(0) (the table-gradient sum)", lambda: drel.sum(0))
with torch.no_grad():
    row("op: local_attention2d under no_grad", lambda: sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols))
row("op: _fwd direct (no autograd)", lambda: op._fwd(q, key, v, rel_rows, rel_cols, *options))
row("op: _bwd direct (no autograd)", lambda: op._bwd(q, key, v, rel_rows, rel_cols, y, lse, dy, *options))
leaves = [t.detach().clone().requires_grad_(True) for t in (q, key, v, rel_rows, rel_cols)]
row("op: forward with grad (Function.apply), no backward",
    lambda: sasa_triton.local_attention2d(*leaves))
row("op: forward + torch.autograd.grad", lambda: torch.autograd.grad(sasa_triton.local_attention2d(*leaves), leaves, dy),
    calls=50)

# Where the autograd engine's share goes: the backward on the calling thread instead of the
# engine's CUDA device thread, and leaves accumulating .grad instead of autograd.grad.
if hasattr(torch.autograd, "set_multithreading_enabled"):
    with torch.autograd.set_multithreading_enabled(False):
        row("op: forward + torch.autograd.grad, autograd multithreading off",
            lambda: torch.autograd.grad(sasa_triton.local_attention2d(*leaves), leaves, dy), calls=50)


def forward_backward_accumulate():
    for t in leaves:
        t.grad = None
    sasa_triton.local_attention2d(*leaves).backward(dy)


row("op: forward + y.backward(dy) (leaves accumulate .grad)", forward_backward_accumulate, calls=50)


class Direct(torch.autograd.Function):  # our kernels behind the thinnest Function
    @staticmethod
    def forward(ctx, q, k, v, rel_rows, rel_cols):
        y, lse = op._fwd(q, k, v, rel_rows, rel_cols, *options)
        ctx.save_for_backward(q, k, v, rel_rows, rel_cols, y, lse)
        return y

    @staticmethod
    def backward(ctx, dy):
        return op._bwd(*ctx.saved_tensors, dy, *options)


row("op kernels behind a bare autograd.Function + torch.autograd.grad",
    lambda: torch.autograd.grad(Direct.apply(*leaves), leaves, dy), calls=50)


class Floor(torch.autograd.Function):  # PyTorch's floor: allocations only, no launches
    @staticmethod
    def forward(ctx, q, k, v, rel_rows, rel_cols):
        ctx.save_for_backward(q)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, dy):
        (q,) = ctx.saved_tensors
        return (*(torch.empty_like(q) for _ in range(3)), None, None)


row("floor: empty autograd.Function forward + torch.autograd.grad",
    lambda: torch.autograd.grad(Floor.apply(*leaves), leaves[:3], dy), calls=50)

# Does the same work cost more inside a backward than on the calling thread? On the H200 VM
# (2026-11-30) _bwd took 155 us called directly but some 350-450 us as the backward node. Each
# probe runs one piece of work in the backward of a Function that otherwise does nothing, with
# the engine's device thread (default) and with multithreading off (the calling thread); the
# difference from the empty probe is the work's cost there, beside its cost called directly.
bwd_args = (q, key, v, rel_rows, rel_cols, y, lse, dy, *options)
work = {
    "pure Python (a 300-step loop)": lambda: sum(i * i for i in range(300)),
    "5 x torch.empty_like(q)": lambda: [torch.empty_like(q) for _ in range(5)],
    "drel.sum(0)": lambda: drel.sum(0),
    "Triton dq launch (prepared args)": lambda: op._launch(plan.dq, dq_args),
    "_bwd (the op's whole backward)": lambda: op._bwd(*bwd_args),
}


def probe(job):
    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.empty_like(x)

        @staticmethod
        def backward(ctx, grad):
            if job is not None:
                job()
            return grad

    return lambda: torch.autograd.grad(Probe.apply(leaves[0]), leaves[0], dy)


threaded_modes = [("device thread", None)]
if hasattr(torch.autograd, "set_multithreading_enabled"):
    threaded_modes.append(("calling thread", False))
for mode, enabled in threaded_modes:
    def timed(fn):
        if enabled is None:
            return enqueue_us(fn, 50)
        with torch.autograd.set_multithreading_enabled(enabled):
            return enqueue_us(fn, 50)
    empty = timed(probe(None))
    print(f"{'probe: empty backward node, ' + mode:<72} {empty:8.1f} us", flush=True)
    for name, job in work.items():
        inside = timed(probe(job)) - empty
        rows.append((f"probe: {name} in a backward ({mode})", inside))
        print(f"{'probe: ' + name + ', in a backward (' + mode + ') / direct':<72} {inside:8.1f} us"
              f" / {enqueue_us(job, 50):.1f} us", flush=True)
if not DRY:
    result = measure((B, H, W, heads, D), k, 400, device="cuda", stub=False, dtype_name="bfloat16")
    print("sasa_triton.bench_host --gpu at this shape:", result, flush=True)

profile = cProfile.Profile()
sync()
profile.enable()
for _ in range(2 if DRY else 100):
    op._fwd(q, key, v, rel_rows, rel_cols, *options)
    op._bwd(q, key, v, rel_rows, rel_cols, y, lse, dy, *options)
profile.disable()
sync()
text = io.StringIO()
pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
print("cProfile of 100 direct _fwd + _bwd calls (main thread), by own time:")
print(text.getvalue(), flush=True)

# Part 2: a whole model. On the H200 VM (2026-11-30) eager SASA-ResNet-50 inference took 17.4 ms
# per step against 3.57 ms replayed from a CUDA graph (ResNet-50: 5.25 / 2.60 ms), far more host
# time than 16 op calls explain: time one eager step of each model, then profile the SASA one.
if not DRY:
    from torch.profiler import ProfilerActivity, profile

    from sasa_triton import models

    def finish_ms(step, steps=20, warmup=0):
        """Mean milliseconds per step() from the first enqueue to the GPU's finish."""
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps * 1e3

    for name, kwargs in (("resnet50", {}), ("sasa_resnet50", dict(stem="conv", backend="triton"))):
        net = getattr(models, name)(**kwargs).to(dev, memory_format=torch.channels_last).eval()
        images = torch.randn(32, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)

        def infer():
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return net(images)
        row(f"model: {name} eager inference step, B 32 bf16 autocast (enqueue)", infer, calls=20)
        print(f"{'model: ' + name + ' eager inference step, to finish':<72} {finish_ms(infer):8.2f} ms", flush=True)
        # A training step with the backward on the engine's device thread (PyTorch's default) and
        # on the calling thread: the hand-over is the suspect for the op's unexplained share.
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        labels = torch.randint(0, 1000, (32,), device=dev)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(net(images), labels)
            loss.backward()
            opt.step()
        for mode, threads in (("device thread", True), ("calling thread", False)):
            with torch.autograd.set_multithreading_enabled(threads):
                ms = finish_ms(train_step, warmup=3)
            print(f"{'model: ' + name + ' eager training step, backward on the ' + mode + ', to finish':<72} "
                  f"{ms:8.2f} ms", flush=True)
        net.eval()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            infer()
        torch.cuda.synchronize()
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=55), flush=True)
    print(table.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=55), flush=True)
