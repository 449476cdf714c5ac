"""Tune every Triton kernel for this GPU and keep the winners: `python -m sasa_triton.autotune`.

Runs each op forward and backward once per shape and dtype with autotuning on, so every kernel
(local_fwd, local_bwd_dq, local_bwd_dkdv, and the stem's spatial_* kernels) times its candidate
configs on the real arguments; the fastest per key (kernel, window, dilation, head dim, dtype,
image size bucket) go to a JSON file for this GPU in the user cache directory, which the
package loads at first use without timing anything again.

    python -m sasa_triton.autotune                       # the paper's ResNet stages + stem, bf16/fp16/fp32
    python -m sasa_triton.autotune --dtypes bf16         # one dtype
    python -m sasa_triton.autotune --shape 32,56,56,8,64 --kernel-size 7 --dilation 1
    python -m sasa_triton.autotune --dry-run             # list the keys and candidate counts only

Without a GPU it exits with status 2, unless TRITON_INTERPRET=1: then it runs the whole flow on
tiny shapes through Triton's CPU interpreter, where "tuning" keeps the default config with a
dummy time of 0 (it still writes and reloads the file: a test of the flow, not of the speed).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
import time

import torch

from . import tuning
from ._utils import interpreter_enabled

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Paper shapes: the 3x3 convs of ResNet-26/38/50 become 7x7 SASA layers with 8 heads; the stage
# widths 64/128/256/512 give D = 8/16/32/64 at 56/28/14/7 pixels. The stem: 224 x 224 input,
# 4 heads of D = 16 (64 channels), 4 x 4 blocks, M = 4 value maps.
PAPER_LOCAL = ((56, 56, 8, 8), (28, 28, 8, 16), (14, 14, 8, 32), (7, 7, 8, 64))  # H, W, heads, D
PAPER_STEM = (224, 224, 4, 16)
PAPER_KERNEL_SIZE, STEM_BLOCK, STEM_MIXTURES = 7, 4, 4
# Under the interpreter: tiny shapes that exercise the same flow in seconds.
TINY_LOCAL = ((6, 6, 1, 8), (5, 6, 1, 16))
TINY_STEM = (8, 8, 2, 8)
TINY_KERNEL_SIZE = 3


@dataclasses.dataclass
class Job:
    op: str           # "local" or "spatial"
    shape: tuple      # (B, H, W, heads, D)
    kernel_size: int  # window size, or the stem's block size
    dilation: int = 1

    def describe(self) -> str:
        B, H, W, heads, D = self.shape
        size = f"k={self.kernel_size} d={self.dilation}" if self.op == "local" else f"block={self.kernel_size}"
        return f"{self.op} B={B} {H}x{W} heads={heads} D={D} {size}"


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape wants B,H,W,heads,D (five positive ints), got {text!r}")
    return shape


def _parse_dtypes(text: str) -> list:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--dtypes wants a comma list of {sorted(DTYPES)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sasa_triton.autotune",
        description="Autotune the sasa_triton kernels on this GPU and write the winners to a JSON file "
                    "that the package loads at first use.")
    parser.add_argument("--shape", type=_parse_shape, action="append", metavar="B,H,W,heads,D",
                        help="tune the local-attention kernels for this (B, H, W, heads, D) shape (repeatable); "
                             "default: the paper's ResNet stage shapes and the attention stem")
    parser.add_argument("--kernel-size", type=int, default=None,
                        help=f"window size (default {PAPER_KERNEL_SIZE}; {TINY_KERNEL_SIZE} under the interpreter)")
    parser.add_argument("--dilation", type=int, default=1, help="window dilation for --shape (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the paper shapes (default 32)")
    parser.add_argument("--dtypes", type=_parse_dtypes, default=None,
                        help="comma list of bf16,fp16,fp32 (default all three; fp32 under the interpreter)")
    parser.add_argument("--no-stem", action="store_true", help="skip the attention stem's kernels")
    parser.add_argument("--output", default=None,
                        help="file to write (default: <cache dir>/<GPU name>.json, cache dir from "
                             "SASA_TRITON_CACHE_DIR or ~/.cache/sasa_triton)")
    parser.add_argument("--force", action="store_true",
                        help="time every key again, even those a tuned file already has")
    parser.add_argument("--full", action="store_true",
                        help="time every pruned candidate (default: tile shapes first, then the launch "
                             "variants of the best tiles)")
    parser.add_argument("--warmup", type=float, default=tuning.BENCH_WARMUP_MS, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=float, default=tuning.BENCH_REP_MS, help="do_bench repetition time, ms")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the keys and their candidate counts, run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every candidate's time")
    return parser


def _jobs(args, interpret: bool) -> list[Job]:
    if args.shape:
        k = args.kernel_size or (TINY_KERNEL_SIZE if interpret else PAPER_KERNEL_SIZE)
        return [Job("local", shape, k, args.dilation) for shape in args.shape]
    batch = 1 if interpret else args.batch
    local = TINY_LOCAL if interpret else PAPER_LOCAL
    k = args.kernel_size or (TINY_KERNEL_SIZE if interpret else PAPER_KERNEL_SIZE)
    jobs = [Job("local", (batch, *s), k, args.dilation) for s in local]
    if not args.no_stem:
        jobs.append(Job("spatial", (batch, *(TINY_STEM if interpret else PAPER_STEM)), STEM_BLOCK))
    return jobs


def _kernels(job: Job) -> list[str]:
    if job.op == "local":
        return ["local_fwd", "local_bwd_dq", "local_bwd_dkdv"]
    return ["spatial_block_fwd", "spatial_block_bwd_dq", "spatial_block_bwd_dkdv"]


def _stem_op():
    """The stem op, or (None, why) when this install has none."""
    try:
        module = importlib.import_module(f"{__package__}.ops.spatial_attention")
    except ImportError as error:
        return None, f"the attention stem op is not available ({error})"
    op = getattr(module, "spatial_attention2d", None)
    if op is None:
        return None, "sasa_triton.ops.spatial_attention has no spatial_attention2d"
    return op, ""


def _run_job(job: Job, dtype: torch.dtype, device: torch.device) -> None:
    """The op forward and backward once: its launchers look up (and so tune) every kernel."""
    B, H, W, heads, D = job.shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dt).requires_grad_()

    if job.op == "local":
        from .ops.local_attention import local_attention2d
        k = job.kernel_size
        q, key, v = (rand(B, H, W, heads, D) for _ in range(3))
        rel_rows, rel_cols = rand(k, D // 2, dt=torch.float32), rand(k, D - D // 2, dt=torch.float32)
        y = local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, dilation=job.dilation,
                              backend="triton")
    else:
        op, why = _stem_op()
        if op is None:
            raise ModuleNotFoundError(why)
        M = STEM_MIXTURES
        q, key = rand(B, H, W, heads, D), rand(B, H, W, heads, D)
        values = rand(B, H, W, M, heads, D)
        mix = torch.softmax(torch.randn(job.kernel_size, job.kernel_size, M, generator=gen), dim=-1)
        mix = mix.to(device).requires_grad_()
        y = op(q, key, values, mix, block_size=job.kernel_size, backend="triton")
    y.backward(torch.randn(y.shape, generator=gen).to(device=device, dtype=y.dtype))
    if device.type == "cuda":
        torch.cuda.synchronize()


def _format_entry(entry: dict | None) -> str:
    if entry is None:
        return "not tuned (the launcher passes no run closure to tuning.get_config): default"
    config = tuning._describe(tuning._config_only(entry))
    if entry.get("source") == "file":
        return f"{config}  (from a tuned file; --force times it again)"
    if entry.get("ms") is None:
        return f"{config}  (no candidate ran)"
    if entry.get("timed") == 0:
        return f"{config}  (interpreter: the default, not timed)"
    return f"{config}  {entry['ms']:.4f} ms (default {entry['default_ms']:.4f} ms, {entry['timed']} timed)"


def _dry_run(jobs, dtypes) -> int:
    limits = tuning.device_limits()
    if not torch.cuda.is_available() or interpreter_enabled():
        print("no GPU in use: pruning with the limits of an H100 (sm_90)", file=sys.stderr)
    for job in jobs:
        B, H, W, heads, D = job.shape
        for name in dtypes:
            for kernel in _kernels(job):
                full = tuning.candidate_configs(kernel, job.kernel_size, job.dilation, D, DTYPES[name], H, W,
                                                prune=False, limits=limits)
                kept = tuning.candidate_configs(kernel, job.kernel_size, job.dilation, D, DTYPES[name], H, W,
                                                limits=limits)
                key = tuning.config_key(kernel, job.kernel_size, job.dilation, D, DTYPES[name], H, W)
                print(f"{key}: {len(kept)} of {len(full)} candidates fit")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    interpret = interpreter_enabled()
    dtypes = args.dtypes or (["fp32"] if interpret else list(DTYPES))
    jobs = _jobs(args, interpret)
    if args.dry_run:
        return _dry_run(jobs, dtypes)
    if not interpret and not torch.cuda.is_available():
        print("sasa_triton.autotune: no CUDA GPU found (torch.cuda.is_available() is False), nothing to tune. "
              "Run it on the GPU the configs are for, or set TRITON_INTERPRET=1 to test the flow on tiny "
              "shapes with Triton's CPU interpreter.", file=sys.stderr)
        return 2

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    tuning.logger.addHandler(handler)
    tuning.logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    os.environ["SASA_TRITON_AUTOTUNE"] = "full" if args.full else "1"
    tuning.BENCH_WARMUP_MS, tuning.BENCH_REP_MS = args.warmup, args.rep
    device = torch.device("cpu" if interpret else "cuda")
    where = "Triton interpreter (CPU): no timing, default configs" if interpret else tuning.device_name()
    print(f"sasa_triton.autotune: {where}, Triton {tuning.triton_version()}, dtypes {','.join(dtypes)}, "
          f"{len(jobs) * len(dtypes)} runs", file=sys.stderr)

    failures = 0
    start = time.time()
    try:
        with tuning.recording(retune=args.force) as record:
            runs = [(job, name) for job in jobs for name in dtypes]
            for i, (job, name) in enumerate(runs, 1):
                if job.op == "spatial" and _stem_op()[0] is None:
                    print(f"[{i}/{len(runs)}] {job.describe()} {name}: skipped, {_stem_op()[1]}", file=sys.stderr)
                    continue
                print(f"[{i}/{len(runs)}] {job.describe()} {name} ({time.time() - start:.0f} s elapsed)",
                      file=sys.stderr, flush=True)
                try:
                    _run_job(job, DTYPES[name], device)
                except Exception as error:  # one shape failing (out of memory...) does not stop the rest
                    failures += 1
                    print(f"    failed: {type(error).__name__}: {error}", file=sys.stderr)
                    continue
                finally:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                B, H, W, heads, D = job.shape
                for kernel in _kernels(job):
                    key = tuning.config_key(kernel, job.kernel_size, job.dilation, D, DTYPES[name], H, W)
                    print(f"    {kernel}: {_format_entry(record.get(key))}", file=sys.stderr)
            entries = dict(record)
    finally:
        tuning.logger.removeHandler(handler)
    if not entries:
        print("sasa_triton.autotune: nothing was tuned", file=sys.stderr)
        return 1
    path = tuning.save_tuned(args.output, entries)
    print(f"sasa_triton.autotune: {len(entries)} configs written to {path} ({time.time() - start:.0f} s)",
          file=sys.stderr)
    print(path)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
