"""The host path's cost in instructions: python -m sasa_triton.bench_host's calls, counted by
valgrind's callgrind instead of timed. Needs valgrind (and no GPU).

    python bench/host_instructions.py [--shape B H W heads D] [--kernel-size K] [--launches]

A timing of the Python path on a small shared machine moves by 10-40 % from run to run (other
tenants, caches, frequency); the instructions one call executes do not: two runs of the same
code agree to within 0.5 % (bench/RESULTS.md, 2026-11-30), so a change of 1-2 % shows. Each call of
bench_host's set (the op's forward without grad and forward + autograd.grad, PyTorch's floor for
both, the SelfAttention2d layer and its projection; launches stubbed, the interpreter's CPU
tensors) runs warm under callgrind with its instrumentation off, then N1 and N2 times with it on;
(count(N2) - count(N1)) / (N2 - N1) is one call's instructions, the start and stop cancelling.
Instructions are not time (a cache miss costs a hundred), but for the same machine they track the
Python path's share: on the 2-core machine of bench/RESULTS.md (2026-11-30), about 3,100 per us.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

N1, N2 = 20, 120


def _launch_calls(shape) -> tuple:
    """({name: one direct launch of a kernel}, launched, restore), as bench_host.host_calls gives
    its calls (launched: true, restore: nothing to undo): the three local kernels compiled for
    sm_90 behind bench/launch_overhead.py's stand-in CUDA driver (its launcher records each call
    and calls the launch hooks as Triton's C launcher does), each launch's record then dropped."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import launch_overhead

    fns = {}
    for name, (launch, launch_args) in launch_overhead._launches(*launch_overhead._inputs(shape)).items():
        launch(launch_args)  # through Triton: compiles and keeps the compiled kernel

        def fn(launch=launch, launch_args=launch_args):
            launch(launch_args)
            launch_overhead.CALLS.clear()
        fns[f"launch_{name}"] = fn
    return fns, (lambda: True), (lambda: None)


def _child(args) -> None:
    from sasa_triton import bench_host

    def control(*flags):  # callgrind_control talks to this process's valgrind
        subprocess.run(["callgrind_control", *flags, str(os.getpid())], check=True, stdout=subprocess.DEVNULL)

    if args.launches:
        fns, launched, restore = _launch_calls(tuple(args.shape))
    else:
        fns, _, launched, restore = bench_host.host_calls(tuple(args.shape), args.kernel_size)
        # (not the chained calls: 16 calls a run would take callgrind 16 times as long)
        fns = {name: fn for name, fn in fns.items() if "chain" not in name}
    print("calls:", *fns)
    try:
        for name, fn in fns.items():
            for _ in range(30):
                fn()
            control("--instr=on")
            for count in (N1, N2):
                for _ in range(count):
                    fn()
                control("--dump", f"{name}:{count}")  # (N1 calls, then N2 more: dumps zero the counts)
            control("--instr=off")
    finally:
        restore()
    assert launched, "no kernel launch reached the stub: the wrong path was counted"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=5, default=[1, 7, 7, 8, 64], metavar=("B", "H", "W", "HEADS", "D"))
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--launches", action="store_true",
                        help="count one direct launch of each local kernel instead (compiled for sm_90 behind a "
                             "stand-in CUDA driver, bench/launch_overhead.py; the launcher's own C code not included)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"needs {' and '.join(missing)} (e.g. apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
        if args.launches:  # compiled kernels (the interpreter has no launcher)
            env.pop("TRITON_INTERPRET")
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/cg.out",
                   sys.executable, os.path.abspath(__file__), "--child", "--shape", *map(str, args.shape),
                   "--kernel-size", str(args.kernel_size), *(["--launches"] if args.launches else [])]
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        counts: dict = {}
        for path in glob.glob(f"{tmp}/cg.out.*"):
            text = open(path).read()
            dump = re.search(r"^desc: Trigger: dump (\S+):(\d+)$", text, re.M)
            total = re.search(r"^totals: (\d+)", text, re.M)
            if dump and total:
                counts.setdefault(dump.group(1), {})[int(dump.group(2))] = int(total.group(1))
    names = proc.stdout.split("calls:", 1)[1].split()  # in bench_host's order
    per_call = {name: (counts[name][N2] - counts[name][N1]) / (N2 - N1) for name in names}
    import torch
    import triton
    what = "the Python of one direct launch, sm_90, stand-in driver" if args.launches else "launches stubbed"
    print(f"host path per call in instructions (callgrind; {what}; torch {torch.__version__}, "
          f"triton {triton.__version__}; shape {args.shape}, k={args.kernel_size}):")
    for name, value in per_call.items():
        print(f"  {name.removesuffix('_us'):18s} {value:10.0f}")
    for kind in ("fwd", "fwd_bwd") if not args.launches else ():
        own = per_call[f"{kind}_us"] - per_call[f"floor_{kind}_us"]
        print(f"  the op's own share over PyTorch's floor, {kind.replace('_', '+')}: {own:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
