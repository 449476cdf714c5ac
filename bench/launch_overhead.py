"""The Python cost of launching a compiled kernel, and a check of the op's direct launches.

    python bench/launch_overhead.py            # time it: Triton's run against the direct launch
    python bench/launch_overhead.py --check    # the direct launch passes what Triton's run passes
    python bench/launch_overhead.py --op       # whole op calls (forward; forward + backward) either way

Runs without a GPU. A stand-in for Triton's CUDA driver targets sm_90, so the local-attention
kernels really compile for an H100 (through Triton's own JITFunction.run), and its launcher
records each call instead of launching it. What is timed is then everything Python does per
launch: Triton's binding, specialization and cache lookup (`kernel[grid](*args, **meta)`) against
the op's direct launch (sasa_triton._library.KernelLaunch: the compiled kernel's own runner),
without the C launcher and the driver's cuLaunchKernel, which both paths share. The check
compares the recorded calls: the direct launches must pass the very same arguments (the same
tensors, grid, stream, function handle and metadata, to the same compiled kernel) as Triton's
run does, also when a table's dtype or a tensor's alignment changes the specialization. It
checks the direct launches on any Triton (SASA_TRITON_DIRECT_LAUNCH=1): passing on one not yet in
sasa_triton._library.DIRECT_LAUNCH_TRITONS is what adds that Triton there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels (the interpreter has no launcher)
os.environ["SASA_TRITON_DIRECT_LAUNCH"] = "1"  # on this Triton too if it is not a checked one
os.environ["SASA_TRITON_AUTOTUNE"] = "0"  # default configs; no tuned file is read

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

STREAM = 0x5EA  # the stand-in's current stream: every recorded launch must carry it
CALLS = []  # (launcher, args) of every recorded launch


class _Launcher:
    """Takes a compiled kernel's launch (grid x 3, stream, function, packed metadata, launch
    metadata, enter hook, exit hook, *args) and, as Triton's C launcher does, calls each hook that
    is not None with the launch metadata around the launch it records."""

    def __init__(self, src, metadata):
        self.name = metadata.name

    def __call__(self, *args):
        launch_metadata, enter_hook, exit_hook = args[6:9]
        if enter_hook is not None:
            enter_hook(launch_metadata)
        CALLS.append((self, args))
        if exit_hook is not None:
            exit_hook(launch_metadata)


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        handles = (f"module:{name}", f"function:{name}", 0, 0)
        return handles if triton.__version__ < "3.4" else (*handles, 1024)

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class FakeCudaDriver:
    """What Triton asks of its active driver to compile, load and launch, minus the GPU."""
    launcher_cls = _Launcher
    utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return STREAM

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


driver.set_active(FakeCudaDriver())

from sasa_triton import _library  # noqa: E402
from sasa_triton.bench_host import _time_rounds  # noqa: E402
from sasa_triton.ops import local_attention as op  # noqa: E402

assert _library.DIRECT_LAUNCH, "direct launches are off (the triton_op path: SASA_TRITON_TRITON_OP=1)"


def _inputs(shape, table_dtype=torch.float32, kernel_size=7):
    B, H, W, heads, D = shape
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3, heads, D, generator=gen).to(torch.bfloat16)
    q, k, v = qkv.unbind(3)
    rel_rows = torch.randn(kernel_size, D // 2, generator=gen).to(table_dtype)
    rel_cols = torch.randn(kernel_size, D - D // 2, generator=gen).to(table_dtype)
    return q, k, v, rel_rows, rel_cols


def _launches(q, k, v, rel_rows, rel_cols, kernel_size=7):
    """{kernel name: (its KernelLaunch, the arguments of one launch)} of the op at these inputs."""
    plan = op._op_plan(q, k, v, rel_rows, kernel_size, 1, "zeros")
    if plan.copy_qkv:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    y, lse = torch.empty_like(q), torch.empty(q.shape[:4], dtype=torch.float32)
    dy, dq, dk, dv = (torch.randn_like(q) for _ in range(4))
    delta, drel = torch.empty_like(lse), torch.empty(plan.drel_shape)
    dq_args, dkdv_args = op._bwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, dy, delta, dq, dk, dv, drel, 1.0)
    return {"local_fwd": (plan.fwd.launch, op._fwd_args(plan, q, k, v, rel_rows, rel_cols, y, lse, 1.0)),
            "local_bwd_dq": (plan.dq.launch, dq_args), "local_bwd_dkdv": (plan.dkdv.launch, dkdv_args)}


def _through_triton(launch, args):
    launch.kernel[launch.grid](*args, **launch.meta)


@contextlib.contextmanager
def _counting_runs(kernel):
    """[how many launches of kernel went through Triton's JITFunction.run] while inside (the
    class's run is wrapped: an instance attribute would send every launch through Triton)."""
    runs = [0]
    cls = type(kernel)
    real_run = cls.run

    def counting_run(self, *args, **kwargs):
        runs[0] += self is kernel
        return real_run(self, *args, **kwargs)

    cls.run = counting_run
    try:
        yield runs
    finally:
        cls.run = real_run


def _recorded(fn):
    """The one launch fn makes: (launcher, launch arguments)."""
    CALLS.clear()
    fn()
    assert len(CALLS) == 1, f"expected one launch, got {len(CALLS)}"
    return CALLS[0]


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return x is y
    if hasattr(x, "get") and hasattr(x, "extras"):  # launch metadata (a LazyDict, built per launch)
        return type(x) is type(y) and x.get() == y.get()
    return x == y


def _hooks(args):
    """A launch's (launch metadata, enter hook, exit hook), or None where neither hook would call
    anything (None, or Triton's empty hook chains: the metadata is built for them alone)."""
    if _library._hook_set(args[7]) or _library._hook_set(args[8]):
        return args[6:9]
    return None


def _same_call(a, b) -> bool:
    """Same launcher (compiled kernel) and the same arguments: tensors the same objects; the
    launch metadata and hooks the same, or calling nothing in both (a direct launch passes None
    where Triton's runner passes its empty hook chains and the metadata built for them)."""
    (launcher_a, args_a), (launcher_b, args_b) = a, b
    hooks_a, hooks_b = _hooks(args_a), _hooks(args_b)
    return (launcher_a is launcher_b and len(args_a) == len(args_b)
            and all(map(_same, args_a[:6] + args_a[9:], args_b[:6] + args_b[9:]))
            and (hooks_a is None and hooks_b is None
                 or hooks_a is not None and hooks_b is not None and all(map(_same, hooks_a, hooks_b))))


@contextlib.contextmanager
def _launch_enter_hook(hook):
    """hook set as Triton's launch enter hook while inside (a profiler's way in)."""
    from triton.compiler import CompiledKernel

    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton >= 3.4
    chain = getattr(knobs, "launch_enter_hook", None)
    if hasattr(chain, "add"):  # a hook chain (3.6-3.9)
        chain.add(hook)
        try:
            yield
        finally:
            chain.remove(hook)
        return
    owner = knobs if knobs is not None else CompiledKernel
    before = owner.launch_enter_hook
    owner.launch_enter_hook = hook
    try:
        yield
    finally:
        owner.launch_enter_hook = before


def check(shape=(1, 9, 11, 4, 16)) -> list:
    """Failures (empty when every check holds)."""
    failures = []

    def expect(ok, what):
        print(("ok   " if ok else "FAIL ") + what, flush=True)
        if not ok:
            failures.append(what)

    for name, (launch, args) in _launches(*_inputs(shape)).items():
        with _counting_runs(launch.kernel) as runs:
            first = _recorded(lambda: launch(args))  # through Triton: compiles, keeps the runner
            direct = [_recorded(lambda: launch(args)) for _ in range(2)]
        own = _recorded(lambda: _through_triton(launch, args))
        expect(runs == [1], f"{name}: only the first of three launches went through Triton's run")
        expect(all(_same_call(call, own) for call in (first, *direct)),
               f"{name}: the direct launches pass Triton's own launch arguments ({len(own[1])} of them)")
        expect(own[1][3] == STREAM, f"{name}: launched on the current stream")
        expect(len(own[1]) == 9 + len(launch.kernel.arg_names),
               f"{name}: every kernel parameter, constexprs included, reaches the launcher")
        expect(direct[1][1][6:9] == (None, None, None), f"{name}: no launch hook set, the direct launch passes none")
        # With a launch hook set (a profiler), direct launches pass it and its metadata as Triton does.
        seen = []
        with _launch_enter_hook(lambda metadata: seen.append(metadata.get()["name"])):
            hooked = _recorded(lambda: launch(args))
            own_hooked = _recorded(lambda: _through_triton(launch, args))
            passed = _same_call(hooked, own_hooked) and _hooks(hooked[1]) is not None
        expect(passed and seen == [launch.kernel.__name__] * 2,
               f"{name}: with a launch hook set, the direct launch calls it with Triton's metadata")

    # A run replaced on the kernel (the tuner's compile-only launches) is respected: compiled, not
    # launched, although this plan's launch is kept.
    kernel = launch.kernel
    kernel.run = lambda *a, grid, warmup, **kw: type(kernel).run(kernel, *a, grid=grid, warmup=True, **kw)
    try:
        CALLS.clear()
        launch(args)
        expect(not CALLS and launch.runners, f"{name}: a compile-only run on the kernel launches nothing")
    finally:
        del kernel.run

    # The tuner's compile pass (compile-only runs, Triton's AsyncCompileMode where it has one:
    # launches return compiles in flight) on plans never launched: nothing launched, nothing
    # kept; then the first real launch goes through Triton and the next ones directly.
    from sasa_triton import autotune

    fresh = _launches(*_inputs((2, 5, 6, 2, 16)))
    kernels = [launch.kernel for launch, _ in fresh.values()]
    CALLS.clear()
    with autotune._compile_only(kernels) as compiled, autotune._parallel_compiles(4):
        for launch, args in fresh.values():
            launch(args)
    expect(not CALLS and len(compiled) == 3 and not any(launch.runners for launch, _ in fresh.values()),
           "tuner's parallel compile-only pass: three kernels compiled, nothing launched or kept")
    for name, (launch, args) in fresh.items():
        with _counting_runs(launch.kernel) as runs:
            calls = [_recorded(lambda: launch(args)) for _ in range(3)]
        expect(runs == [1] and _same_call(calls[0], calls[2]), f"{name}: then launched, directly from the second on")

    # A new specialization (a table's dtype, a misaligned tensor) is a new key: its first launch
    # goes through Triton again and its direct launches reach the kernel compiled for it.
    q, k, v, rel_rows, rel_cols = _inputs(shape)
    launch, args = _launches(q, k, v, rel_rows, rel_cols)["local_fwd"]
    aligned = _recorded(lambda: launch(args))
    variants = {
        "bf16 tables": _launches(q, k, v, rel_rows.bfloat16(), rel_cols.bfloat16())["local_fwd"][1],
        "a misaligned rel_rows": _launches(q, k, v, torch.randn(rel_rows.numel() + 1)[1:].view_as(rel_rows),
                                           rel_cols)["local_fwd"][1],
    }
    for what, variant in variants.items():
        before = len(launch.runners)
        first = _recorded(lambda: launch(variant))
        direct = _recorded(lambda: launch(variant))
        own = _recorded(lambda: _through_triton(launch, variant))
        expect(len(launch.runners) == before + 1 and _same_call(first, own) and _same_call(direct, own)
               and own[0] is not aligned[0],
               f"local_fwd with {what}: a kernel of its own, launched with Triton's arguments")

    # A one-dimensional grid through the shared per-(kernel, grid, meta) launches (the attention
    # stem's dx kernel).
    from sasa_triton.ops import attention_stem as stem

    x = torch.randn(1, 3, 16, 16).bfloat16()
    gx, dx = torch.randn(1, 16, 16, 16, 3), torch.empty_like(x)
    grid, dx_args, meta = stem._dx_launch(x, gx, dx, 4, "block", stem.default_config("dx", 4))
    with _counting_runs(stem._stem_dx_kernel) as runs:
        calls = [_recorded(lambda: _library.launch(stem._stem_dx_kernel, grid, dx_args, meta)) for _ in range(3)]
    own = _recorded(lambda: stem._stem_dx_kernel[grid](*dx_args, **meta, **_library.LAUNCH_OPTIONS))
    expect(runs == [1] and all(_same_call(call, own) for call in calls) and own[1][:3] == (grid[0], 1, 1),
           f"stem dx, grid {grid}: launched with Triton's arguments, directly from the second launch on")

    # The op end to end (forward and backward launchers of one plan).
    q, k, v, rel_rows, rel_cols = _inputs(shape)
    for _ in range(2):
        CALLS.clear()
        y, lse = op._fwd(q, k, v, rel_rows, rel_cols, 7, 1, 1.0, "zeros")
        op._bwd(q, k, v, rel_rows, rel_cols, y, lse, torch.randn_like(y), 7, 1, 1.0, "zeros")
        expect([launcher.name for launcher, _ in CALLS] == ["_local_attn_fwd_kernel", "_local_attn_bwd_dq_kernel",
                                                             "_local_attn_bwd_dkdv_kernel"]
               and all(call[3] == STREAM for _, call in CALLS), "op: _fwd and _bwd launch their three kernels")
    return failures


def _unrecorded(fn, direct=True):
    """fn with direct launches on or off, the recorder emptied after each call (timing)."""
    def call():
        _library.DIRECT_LAUNCH = direct
        fn()
        CALLS.clear()
    return call


def time_launches(shape=(32, 7, 7, 8, 64), rounds=30, calls=300) -> dict:
    """{kernel: (us per launch through Triton's run, us per direct launch, arguments)}: the fastest
    of `rounds` alternating rounds (sasa_triton.bench_host._time_rounds: process CPU time), one
    CPU thread, a no-op launcher."""
    torch.set_num_threads(1)
    result = {}
    for name, (launch, args) in _launches(*_inputs(shape)).items():
        launch(args)  # compile; keep the runner
        best = _time_rounds({"triton": (_unrecorded(lambda: _through_triton(launch, args)), rounds * calls),
                             "direct": (_unrecorded(lambda: launch(args)), rounds * calls)}, repeats=rounds)
        result[name] = (best["triton"], best["direct"], len(args))
    return result


def time_op(shape=(1, 7, 7, 8, 64), rounds=30, calls=200) -> dict:
    """{(pass, way): us per op call}: the op's forward (`_fwd`, as under no_grad) and forward +
    torch.autograd.grad (through its autograd.Function; the argument checks of local_attention2d,
    which refuse CPU tensors outside the interpreter, are left out) with the kernels compiled but
    not run, launched directly or through Triton's run: the fastest of `rounds` alternating
    rounds (bench_host._time_rounds), process CPU time, one thread. Batch 1 keeps the CPU's own
    tensor work (the table-gradient sum) small."""
    torch.set_num_threads(1)
    q, k, v, rel_rows, rel_cols = _inputs(shape)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, rel_rows, rel_cols)]
    dy = torch.randn_like(q)
    options = (7, 1, 1.0, "zeros")

    def forward():
        op._fwd(q, k, v, rel_rows, rel_cols, *options)

    def forward_backward():
        torch.autograd.grad(op._LocalAttention.apply(*leaves, *options), leaves, dy)

    jobs = {(name, way): (_unrecorded(fn, way == "direct"), rounds * per_round)
            for name, fn, per_round in (("forward", forward, calls), ("forward+backward", forward_backward, calls // 4))
            for way in ("Triton run", "direct")}
    try:
        return _time_rounds(jobs, repeats=rounds)
    finally:
        _library.DIRECT_LAUNCH = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare the direct launches with Triton's own")
    parser.add_argument("--op", action="store_true",
                        help="time whole op calls (forward; forward + autograd.grad) launched either way")
    parser.add_argument("--shape", type=int, nargs=5, default=None, metavar=("B", "H", "W", "HEADS", "D"))
    args = parser.parse_args(argv)
    checked = _library.TRITON_VERSION in _library.DIRECT_LAUNCH_TRITONS
    print(f"torch {torch.__version__}, triton {triton.__version__}, kernels compiled for sm_90, launcher stubbed; "
          f"direct launches by default on this Triton: {'yes' if checked else 'no (not in DIRECT_LAUNCH_TRITONS)'}")
    if args.check:
        failures = check(*([tuple(args.shape)] if args.shape else []))
        print(f"{len(failures)} failed" if failures else "all checks passed")
        return 1 if failures else 0
    if args.op:
        shape = tuple(args.shape) if args.shape else (1, 7, 7, 8, 64)
        print(f"Python per op call, bf16 {shape} k 7 (fastest of alternating rounds, process CPU time, us):")
        for (name, way), us in time_op(shape).items():
            print(f"{name:<17} {way:<11} {us:8.1f}")
        return 0
    shape = tuple(args.shape) if args.shape else (32, 7, 7, 8, 64)
    print(f"Python per launch, bf16 {shape} k 7 (fastest of alternating rounds, process CPU time, us):")
    print(f"{'kernel':<16} {'arguments':>9} {'Triton run':>10} {'direct':>8}")
    for name, (through_triton, direct, n_args) in time_launches(shape).items():
        print(f"{name:<16} {n_args:>9} {through_triton:>10.1f} {direct:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
