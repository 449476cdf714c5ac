"""Host-path benchmark: the Python cost of one op call, with the kernel launches stubbed out.

    python -m sasa_triton.bench_host [--shape B H W heads D] [--calls N]

At 14x14 and 7x7 a SASA kernel runs for 11-27 us on an H100, so the Python around the launch
(argument checks, autograd, output allocation, config lookup, launch arguments) decides the op's
speed there. This times that path without a GPU: the process runs with TRITON_INTERPRET=1 (so
CPU tensors take the Triton path exactly as CUDA tensors do) and every kernel launch is replaced
by a no-op (`sasa_triton.ops.local_attention._launch`), so what is timed is everything but the
kernel and Triton's own launcher. `--calls` calls in 40 rounds, after a warmup, alternating with
PyTorch's floor for the same call; the fastest round counts (on a shared machine other load only
ever adds time), on one CPU thread. The default shape
has batch 1 so that the CPU's own work on the tensors (allocation, the sum of the relative-table
partial gradients), which a GPU does asynchronously, stays negligible next to the Python. A
forward + `autograd.grad` of one call also pays autograd's start-up of a backward pass, which a
model pays once a step: the same calls in a chain of CHAIN (16), one backward at the end, give the
cost per call inside a model's graph (the op's and the floor's).

On a GPU, the same path's wall time per call (launch included) is what `--gpu` measures: CUDA
tensors at 7x7, kernels really launched, the time to enqueue (not to finish) each call.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _time_rounds(jobs: dict, repeats: int = 40, clock=time.process_time, sync=lambda: None) -> dict:
    """{name: mean microseconds per call of fn in its fastest round} for jobs {name: (fn, calls)}:
    `repeats` rounds, each running every job's fn calls / repeats times in turn, so that the op
    and its floor see the same moments of a shared machine (the minimum, as timeit reports: other
    load only ever adds time; many short rounds find a quiet one where a few long ones do not).
    The default clock is this process's CPU time, which other processes do not inflate as they do
    the wall time; with a GPU (kernels really launched) it is the wall time."""
    best = {name: float("inf") for name in jobs}
    for fn, calls in jobs.values():
        for _ in range(max(10, calls // 10)):
            fn()
    sync()
    for _ in range(repeats):
        for name, (fn, calls) in jobs.items():
            per_round = max(1, calls // repeats)
            start = clock()
            for _ in range(per_round):
                fn()
            best[name] = min(best[name], (clock() - start) / per_round * 1e6)
            sync()
    return best


CHAIN = 16  # op calls in the chained forward + backward (host_calls)


def host_calls(shape=(1, 7, 7, 8, 64), kernel_size=7, device="cpu", stub=True, dtype_name="float32") -> tuple:
    """({name: fn} of the calls this benchmark times, the layer's channels, the launches the stub
    saw). With `stub`, every kernel launch is replaced by a no-op (and the CPU runs one thread)
    until `restore()` (the fourth element) is called."""
    import torch

    import sasa_triton
    from sasa_triton.ops import local_attention as op

    dtype = getattr(torch, dtype_name)
    B, H, W, heads, D = shape
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3, heads, D, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.unbind(3)
    rel_rows = torch.randn(kernel_size, D // 2, generator=gen).to(device)
    rel_cols = torch.randn(kernel_size, D - D // 2, generator=gen).to(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rel_rows, rel_cols)]
    dy = torch.randn_like(q)
    kwargs = dict(kernel_size=kernel_size, dilation=1, scale=1.0, padding="zeros", backend="triton")

    launched = []
    real_launch, threads = op._launch, torch.get_num_threads()
    if stub:
        op._launch = lambda plan, args: launched.append(plan.grid)
        torch.set_num_threads(1)  # the CPU's thread pool only adds noise to a Python-path timing

    def restore():
        op._launch = real_launch
        torch.set_num_threads(threads)

    def forward():
        with torch.no_grad():
            sasa_triton.local_attention2d(q, k, v, rel_rows, rel_cols, **kwargs)

    def forward_backward():
        y = sasa_triton.local_attention2d(*leaves, **kwargs)
        torch.autograd.grad(y, leaves, dy)

    # PyTorch's own floor for the same call shape: an autograd.Function that validates
    # nothing, launches nothing and only allocates the op's outputs and gradients.
    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, rel_rows, rel_cols):
            y, lse = torch.empty_like(q), q.new_empty(q.shape[:4], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, rel_rows, rel_cols, y, lse)
            return y

        @staticmethod
        def backward(ctx, dy):
            q, k, v, rel_rows, rel_cols, y, lse = ctx.saved_tensors
            return (*torch.empty((3, *q.shape), dtype=q.dtype, device=q.device).unbind(0),
                    torch.empty_like(rel_rows), torch.empty_like(rel_cols))

    # A native PyTorch op's forward + backward at the same call shape (q * 2 and its gradient):
    # what any differentiable call costs autograd on this machine, the op's or not.
    def native_forward_backward():
        torch.autograd.grad(leaves[0] * 2, leaves[0], dy)

    def floor_forward():
        with torch.no_grad():
            Floor.apply(q, k, v, rel_rows, rel_cols)

    def floor_forward_backward():
        torch.autograd.grad(Floor.apply(*leaves), leaves, dy)

    # The op inside a longer graph, as a model runs it: CHAIN calls, each one's y the next one's q
    # (k, v and tables of its own, so no gradient is accumulated twice), and one autograd.grad at
    # the end. Per call, that is its forward and its backward node without autograd's start-up of
    # a backward pass, which a model pays once a step (timed for the whole chain; measure()
    # divides by CHAIN).
    own = [[t.detach().clone().requires_grad_(True) for t in leaves[1:]] for _ in range(CHAIN)]  # k, v, tables
    chain_leaves = [leaves[0], *(t for call in own for t in call)]

    def chain(fn):
        def run():
            y = leaves[0]
            for call in own:
                y = fn(y, *call)
            torch.autograd.grad(y, chain_leaves, dy)
        return run

    chain_forward_backward = chain(lambda *args: sasa_triton.local_attention2d(*args, **kwargs))
    floor_chain_forward_backward = chain(Floor.apply)

    # The layer (SelfAttention2d on channels_last input, as the models run it) and the part of
    # it that is not this package's: its 1x1 qkv projection alone. Stubbed, at most 64 channels
    # (D 8): at 512 the CPU's own convolution takes a millisecond and drowns the Python.
    C = heads * D if not stub else heads * min(D, 8)
    layer = sasa_triton.SelfAttention2d(C, C, kernel_size, heads=heads, backend="triton")
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    layer_leaves = [x, *layer.parameters()]
    layer_dy = torch.randn(B, C, H, W, generator=gen).to(device=device, dtype=dtype)
    proj_dy = torch.randn(B, 3 * C, H, W, generator=gen).to(device=device, dtype=dtype)
    layer_dy, proj_dy = (t.contiguous(memory_format=torch.channels_last) for t in (layer_dy, proj_dy))

    def layer_forward():
        with torch.no_grad():
            layer(x)

    def layer_forward_backward():
        torch.autograd.grad(layer(x), layer_leaves, layer_dy)

    def proj_forward():
        with torch.no_grad():
            layer.qkv(x)

    def proj_forward_backward():
        torch.autograd.grad(layer.qkv(x), (x, layer.qkv.weight), proj_dy)

    fns = {"fwd_us": forward, "fwd_bwd_us": forward_backward, "floor_fwd_us": floor_forward,
           "floor_fwd_bwd_us": floor_forward_backward, "native_fwd_bwd_us": native_forward_backward,
           "fwd_bwd_chain_us": chain_forward_backward,
           "floor_fwd_bwd_chain_us": floor_chain_forward_backward, "layer_fwd_us": layer_forward,
           "layer_fwd_bwd_us": layer_forward_backward, "proj_fwd_us": proj_forward,
           "proj_fwd_bwd_us": proj_forward_backward}
    return fns, C, launched, restore


def measure(shape=(1, 7, 7, 8, 64), kernel_size=7, calls=2000, device="cpu", stub=True,
            dtype_name="float32") -> dict:
    """Microseconds per call of local_attention2d forward (no grad) and forward + backward, of
    PyTorch's floor for such a call, of the SelfAttention2d layer of that shape and of its 1x1
    projection alone."""
    import torch

    fns, C, launched, restore = host_calls(shape, kernel_size, device, stub, dtype_name)
    try:
        rounds = max(1, calls // 4)  # the forward + backward calls take about four times as long
        best = _time_rounds({name: (fn, max(1, rounds // CHAIN) if "chain" in name else rounds if "bwd" in name
                                    else calls) for name, fn in fns.items()},
                            clock=time.perf_counter if device == "cuda" else time.process_time,
                            sync=torch.cuda.synchronize if device == "cuda" else (lambda: None))
        best = {name: us / CHAIN if "chain" in name else us for name, us in best.items()}
    finally:
        restore()
    if stub:
        assert launched, "no kernel launch reached the stub: the benchmark timed the wrong path"
    return {"shape": list(shape), "kernel_size": kernel_size, "device": device, "stubbed": stub, "layer_channels": C,
            **{name: round(us, 2) for name, us in best.items()}}


def main(argv=None, prog=None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m sasa_triton.bench_host", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 7, 7, 8, 64], metavar=("B", "H", "W", "HEADS", "D"))
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA tensors, kernels really launched (bf16): the wall time to enqueue one call")
    args = parser.parse_args(argv)
    if args.gpu:
        result = measure(tuple(args.shape), args.kernel_size, args.calls, device="cuda", stub=False,
                         dtype_name="bfloat16")
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            # The interpreter must be on before triton is imported: run again in a child.
            import subprocess
            env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
            return subprocess.call([sys.executable, "-m", "sasa_triton.bench_host", *(argv or sys.argv[1:])], env=env)
        result = measure(tuple(args.shape), args.kernel_size, args.calls)
    import torch
    label = "GPU, launched, wall time" if args.gpu else "CPU, launch stubbed, process CPU time"
    print(f"host path per op call ({label}; torch {torch.__version__}; shape {result['shape']}, "
          f"k={result['kernel_size']}): forward {result['fwd_us']:.1f} us, "
          f"forward+backward {result['fwd_bwd_us']:.1f} us; PyTorch's floor for the same call (an "
          f"autograd.Function that only allocates the outputs): forward {result['floor_fwd_us']:.1f} us, "
          f"forward+backward {result['floor_fwd_bwd_us']:.1f} us; the op's own share over that floor: forward+backward "
          f"{result['fwd_bwd_us'] - result['floor_fwd_bwd_us']:.1f} us; a native PyTorch op on q (q * 2) forward + "
          f"autograd.grad: {result['native_fwd_bwd_us']:.1f} us")
    print(f"in a chain of {CHAIN} calls with one autograd.grad (a model's backward pass): forward+backward "
          f"{result['fwd_bwd_chain_us']:.1f} us per call, PyTorch's floor {result['floor_fwd_bwd_chain_us']:.1f} us, the "
          f"op's own share {result['fwd_bwd_chain_us'] - result['floor_fwd_bwd_chain_us']:.1f} us")
    B, H, W, heads, _ = result["shape"]
    print(f"SelfAttention2d({result['layer_channels']}, {result['layer_channels']}, heads={heads}) on a channels_last "
          f"{B} x {result['layer_channels']} x {H} x {W} x: forward "
          f"{result['layer_fwd_us']:.1f} us, forward+backward {result['layer_fwd_bwd_us']:.1f} us; its 1x1 qkv projection "
          f"alone: forward {result['proj_fwd_us']:.1f} us, forward+backward {result['proj_fwd_bwd_us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
