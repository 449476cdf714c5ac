"""Tune the kernels for this GPU and keep the winners: `python -m sasa_triton.autotune`.

The only place sasa_triton tunes anything. The package's launchers never do: they look configs
up (sasa_triton.tuning.get_config) in the file this command writes, else use the defaults.

Why here and in a child process: on an H100 with Triton 3.6 some autotune candidates computed
wrong answers and some faulted with an illegal memory access, which poisons the whole CUDA
context (catching the exception does not help), and tuning inside a user's first call cost
~30 s per new shape. So:
  - every key (kernel, window, dilation, head dim, dtype, image-size bucket) is tuned in a child
    process (multiprocessing, spawn); one child works through the keys in turn (its start is paid
    once) until a candidate faults, hangs or kills it. That costs only the child:
    the parent records the candidate as a fault and carries on in a fresh child with the key's
    remaining candidates (`candidates_per_child=1` isolates every candidate). A key whose default
    config itself fails is logged and keeps its default (no entry is written for it);
  - a candidate is accepted only if its outputs agree with the default config's on the tuning
    inputs (`compare`: per element |a - b| <= rtol * (rms(b) + |b|) and relative RMS error
    <= rtol / 4, every value finite, rtol per dtype in TOLERANCE), for both paddings ("zeros"
    with shared relative tables, "mask" with per-head ones), with the outputs poisoned with NaN
    beforehand (an unwritten element fails) and the inputs checked unchanged afterwards. Forward
    kernels: y and lse; backward kernels: everything the backward returns (dq, dk, dv and the
    table or mix gradients; delta, which the dq kernel writes, is read by the dk/dv kernel, so a
    wrong delta shows in dk and dv). Rejected candidates are logged with the error measured and
    listed in the key's entry ("rejected");
  - cheap: a small space per key (tuning.candidate_configs), compiled in parallel before
    anything runs (Triton's AsyncCompileMode on a thread pool, the launches made compile-only),
    candidates that fail to compile or spill registers dropped on the compiled kernel's own
    n_spills, then short do_bench windows. The goal is at most 5 s per key on an H100. Seen on
    an H200 (Triton 3.6, batch 32, bf16): 6-11 s per local key with 16 candidates and a cold
    Triton cache, under 2 s warm; 37-48 s with the 88 candidates of today's local space, cold.

    python -m sasa_triton.autotune                        # ResNet-50 stages at k = 7 + the stem, bf16
    python -m sasa_triton.autotune --dtypes bf16 fp16 fp32
    python -m sasa_triton.autotune --shapes 32,56,56,8,8 --kernel-sizes 3 7 11 --dilation 1
    python -m sasa_triton.autotune --dry-run              # list the keys and candidate counts only

Without a GPU it exits with status 2, unless TRITON_INTERPRET=1: then it runs the whole flow
(child process, validation, file) on tiny shapes through Triton's CPU interpreter, with
nothing timed ("ms": null; a test of the flow, not of the speed).

Python API: `tune(tasks)` with `Task`s returns a `KeyResult` per task (`KeyResult.entry()` is
what the tuned file holds); call it under `if __name__ == "__main__":` (spawn re-imports the
main module).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import multiprocessing
import os
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch

from . import tuning
from ._utils import interpreter_enabled

DTYPES = tuning.DTYPES  # "bf16" -> torch.bfloat16, ...

# Paper shapes: the 3x3 convs of ResNet-50 become 7x7 SASA layers with 8 heads; the stage widths
# 64/128/256/512 give D = 8/16/32/64 at 56/28/14/7 pixels. The stem: 224 x 224 input, 4 heads of
# D = 16 (64 channels), 4 x 4 blocks, M = 4 value maps.
PAPER_LOCAL = ((56, 56, 8, 8), (28, 28, 8, 16), (14, 14, 8, 32), (7, 7, 8, 64))  # H, W, heads, D
PAPER_STEM = (224, 224, 4, 16)
PAPER_KERNEL_SIZE, STEM_BLOCK, STEM_MIXTURES = 7, 4, 4
# Under the interpreter: tiny shapes that run the same flow in about a minute.
TINY_LOCAL = ((6, 6, 1, 8),)
TINY_STEM = (4, 8, 1, 8)
TINY_KERNEL_SIZE = 3
TINY_MAX_CANDIDATES = 2  # the default and one other per key

# Relative tolerance per input dtype (see compare). Outputs stored in fp32 (lse, the table and
# mix gradients) are compared at no more than FP32_OUTPUT_TOLERANCE: they are fp32 sums of the
# same terms in another order, and a bf16 tolerance on lse (~10) would let a shift of 0.04 through.
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
FP32_OUTPUT_TOLERANCE = 1e-3
RMS_FRACTION = 0.25  # relative RMS error allowed: RMS_FRACTION * rtol

# do_bench budget per candidate, milliseconds (--warmup/--rep change them).
BENCH_WARMUP_MS = 5
BENCH_REP_MS = 20
SILENCE_TIMEOUT_S = 600  # a child silent for this long is killed: its candidate counts as a fault
FAULT_EXIT_CODE = 3      # the child exits with it after a candidate broke the CUDA context


# ----------------------------------------------------------------------------------------------
# Tasks and results
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Task:
    """One key to tune: `kernel` on (B, H, W, heads, D) inputs of `dtype` ("bf16", "fp16", "fp32").

    kernel_size is the window (local kernels) or the block size (stem kernels). candidates:
    explicit configs to try (default: tuning.candidate_configs); the default config is always
    tried first, as the reference. max_candidates caps how many are tried (default included).
    """
    kernel: str
    kernel_size: int
    dilation: int
    shape: tuple
    dtype: str
    candidates: list | None = None
    max_candidates: int | None = None

    @property
    def head_dim(self) -> int:
        return self.shape[4]

    @property
    def key(self) -> str:
        return tuning.config_key(self.kernel, self.kernel_size, self.dilation, self.head_dim, DTYPES[self.dtype],
                                 self.shape[1], self.shape[2])

    def configs(self) -> list[dict]:
        """The default config, then the candidates (no duplicates)."""
        args = (self.kernel, self.kernel_size, self.dilation, self.head_dim, DTYPES[self.dtype])
        out = [tuning.default_config(*args)]
        space = self.candidates if self.candidates is not None else \
            tuning.candidate_configs(*args, self.shape[1], self.shape[2])
        for config in space:
            if config not in out:
                out.append(dict(config))
        return out[:self.max_candidates] if self.max_candidates else out

    def describe(self) -> str:
        B, H, W, heads, D = self.shape
        return f"{self.key} (B={B} {H}x{W} heads={heads})"


@dataclasses.dataclass
class KeyResult:
    """What tuning one key found. results[i] describes configs[i] (configs[0] is the default):
    {"status": "accepted" | "mismatch" | "fault" | "error" | "pruned", "reason": str or None,
     "ms": median time or None, "errors": {output: relative RMS error}, "registers", "spills"}.
    error: why the key as a whole failed (it keeps its default), else None."""
    task: Task
    configs: list
    results: dict = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return self.task.key

    def best(self) -> int | None:
        """Index of the fastest accepted config (the default on ties or without times)."""
        accepted = [i for i, r in sorted(self.results.items()) if r["status"] == "accepted"]
        if self.error is not None or 0 not in accepted:
            return None
        timed = [i for i in accepted if self.results[i].get("ms") is not None]
        return min(timed, key=lambda i: (self.results[i]["ms"], i)) if timed else 0

    def rejected(self) -> list[dict]:
        return [{"config": self.configs[i], "reason": f"{r['status']}: {r['reason']}"}
                for i, r in sorted(self.results.items()) if r["status"] != "accepted"]

    def entry(self) -> dict | None:
        """The tuned-file entry: the best config, its time and the default's, how many were
        timed, the rejected candidates with their reasons; None when the key failed."""
        best = self.best()
        if best is None:
            return None
        timed = [r for r in self.results.values() if r["status"] == "accepted" and r.get("ms") is not None]
        return {**self.configs[best], "ms": self.results[best].get("ms"),
                "default_ms": self.results[0].get("ms"), "timed": len(timed), "rejected": self.rejected()}


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def tolerance(dtype_name: str, output_dtype: torch.dtype) -> float:
    """Relative tolerance of an output of `output_dtype` computed from `dtype_name` inputs."""
    rtol = TOLERANCE[dtype_name]
    return min(rtol, FP32_OUTPUT_TOLERANCE) if output_dtype == torch.float32 else rtol


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> tuple[str | None, float]:
    """(why `got` does not match `expected`, or None; relative RMS error).

    Every element finite and |got - expected| <= atol + rtol * |expected| with atol = rtol times
    the RMS of `expected`, and a relative RMS error of at most RMS_FRACTION * rtol."""
    if got.shape != expected.shape:
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}", math.inf
    g, e = got.detach().double(), expected.detach().double()
    finite = torch.isfinite(g)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        return f"{name}: {int((~finite).sum())} of {g.numel()} values not finite (first at {bad})", math.inf
    rms = float(e.pow(2).mean().sqrt()) if e.numel() else 0.0
    diff = (g - e).abs()
    rel_rms = float(diff.pow(2).mean().sqrt()) / max(rms, 1e-30) if e.numel() else 0.0
    excess = diff - (rtol * rms + rtol * e.abs())
    if e.numel() and float(excess.max()) > 0:
        worst = int(excess.argmax())
        index = [int(i) for i in torch.unravel_index(torch.tensor(worst), g.shape)]
        return (f"{name}: {int((excess > 0).sum())} of {g.numel()} elements off (worst at {index}: "
                f"{float(g.flatten()[worst]):.6g}, expected {float(e.flatten()[worst]):.6g}; "
                f"relative RMS error {rel_rms:.2e})"), rel_rms
    if rel_rms > RMS_FRACTION * rtol:
        return f"{name}: relative RMS error {rel_rms:.2e} > {RMS_FRACTION * rtol:.1e}", rel_rms
    return None, rel_rms


def compare_outputs(got: dict, expected: dict, dtype_name: str) -> tuple[str | None, dict]:
    """compare() each named output; (first reason or None, {name: relative RMS error})."""
    errors = {}
    for name, want in expected.items():
        reason, errors[name] = compare(name, got[name], want, tolerance(dtype_name, want.dtype))
        if reason is not None:
            return reason, errors
    return None, errors


# ----------------------------------------------------------------------------------------------
# Problems: seeded inputs of a key and its kernel run with an explicit config
# ----------------------------------------------------------------------------------------------

def _nan(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


class Problem:
    """Fresh random (seeded) inputs of a task's shape and the launch of its kernel with a config.

    Subclasses set VARIANTS (the validation variants, the first is timed) and implement
    _setup() and _launch(config, fill) -> {name: output}. Configs are opaque: they go to the
    op's launchers (`_fwd(..., config=)`, `_bwd(..., config_dq=, config_dkdv=)`) as they are.
    """
    VARIANTS = ("zeros", "mask")
    SEED = 0

    def __init__(self, task: Task, device: torch.device, variant: str):
        self.task, self.device, self.variant = task, device, variant
        self.dtype = DTYPES[task.dtype]
        self.generator = torch.Generator().manual_seed(self.SEED)
        self.inputs: list[torch.Tensor] = []
        self._setup()

    def randn(self, *shape, dtype=None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.generator).to(device=self.device, dtype=dtype or self.dtype)
        self.inputs.append(t)
        return t

    def default(self, kernel: str) -> dict:
        t = self.task
        return tuning.default_config(kernel, t.kernel_size, t.dilation, t.head_dim, self.dtype)

    def run(self, config: dict, fill: bool = True) -> dict:
        """The kernel's outputs with `config`; fill=True poisons the output buffers with NaN first."""
        return self._launch(config, fill)

    def time(self, config: dict) -> float | None:
        """Median milliseconds of run(config) (do_bench); None off CUDA (the interpreter: nothing timed)."""
        if self.device.type != "cuda":
            return None
        from triton.testing import do_bench
        result = do_bench(lambda: self.run(config, fill=False), warmup=BENCH_WARMUP_MS, rep=BENCH_REP_MS,
                          quantiles=[0.5])
        return float(result[0] if isinstance(result, (list, tuple)) else result)

    def _setup(self):
        raise NotImplementedError

    def _launch(self, config, fill):
        raise NotImplementedError

    # Shared by the op families: self.op has _fwd(*self.args, y=, lse=, config=); a backward
    # key's _setup ran the forward at its default and set self.dy and self.grads.

    def _forward(self, config, fill) -> dict:
        if fill:
            _nan(self.y), _nan(self.lse)
        self.op._fwd(*self.args, y=self.y, lse=self.lse, config=config)
        return {"y": self.y, "lse": self.lse}

    def _backward_configs(self, config, fill) -> tuple[dict, dict]:
        """(dq config, dk/dv config): `config` for the kernel being tuned, the default for the
        other one; the gradient buffers poisoned first when fill."""
        if fill:
            for g in self.grads:
                _nan(g)
        prefix = self.task.kernel.rsplit("_bwd_", 1)[0]
        dq, dkdv = (config if self.task.kernel.endswith(suffix) else self.default(f"{prefix}_bwd{suffix}")
                    for suffix in ("_dq", "_dkdv"))
        return dq, dkdv


class LocalProblem(Problem):
    """local_fwd / local_bwd_dq / local_bwd_dkdv: "zeros" padding with shared relative tables, and
    "mask" padding with per-head tables."""

    def _setup(self):
        from .ops import local_attention as op
        self.op = op
        B, H, W, heads, D = self.task.shape
        k = self.task.kernel_size
        self.q, self.k, self.v = (self.randn(B, H, W, heads, D) for _ in range(3))
        tables = () if self.variant == "zeros" else (heads,)
        self.rel_rows = self.randn(*tables, k, D // 2, dtype=torch.float32)
        self.rel_cols = self.randn(*tables, k, D - D // 2, dtype=torch.float32)
        self.args = (self.q, self.k, self.v, self.rel_rows, self.rel_cols, k, self.task.dilation, D ** -0.5,
                     self.variant)
        self.y, self.lse = torch.empty_like(self.q), torch.empty((B, heads, H, W), device=self.device)
        if self.task.kernel != "local_fwd":
            op._fwd(*self.args, y=self.y, lse=self.lse, config=self.default("local_fwd"))
            self.dy = self.randn(B, H, W, heads, D)
            self.inputs += [self.y, self.lse]
            self.grads = tuple(torch.empty_like(t) for t in (self.q, self.k, self.v))

    def _launch(self, config, fill):
        if self.task.kernel == "local_fwd":
            return self._forward(config, fill)
        dq_config, dkdv_config = self._backward_configs(config, fill)
        q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding = self.args
        dq, dk, dv, drel_rows, drel_cols = self.op._bwd(q, k, v, rel_rows, rel_cols, self.y, self.lse, self.dy,
                                                        kernel_size, dilation, scale, padding, grads=self.grads,
                                                        config_dq=dq_config, config_dkdv=dkdv_config)
        return {"dq": dq, "dk": dk, "dv": dv, "drel_rows": drel_rows, "drel_cols": drel_cols}


class StemProblem(Problem):
    """spatial_{block|sliding}_{fwd|bwd_dq|bwd_dkdv}: STEM_MIXTURES value maps, both paddings."""

    def _setup(self):
        from .ops import spatial_attention as op
        self.op = op
        B, H, W, heads, D = self.task.shape
        bs, M = self.task.kernel_size, STEM_MIXTURES
        self.window = self.task.kernel.split("_")[1]
        self.q, self.k = self.randn(B, H, W, heads, D), self.randn(B, H, W, heads, D)
        self.values = self.randn(B, H, W, M, heads, D)
        self.mix = torch.softmax(self.randn(bs, bs, M, dtype=torch.float32), dim=-1)
        self.inputs.append(self.mix)
        self.args = (self.q, self.k, self.values, self.mix, bs, D ** -0.5, self.window, self.variant)
        self.y, self.lse = torch.empty_like(self.q), torch.empty((B, heads, H, W), device=self.device)
        if not self.task.kernel.endswith("_fwd"):
            op._fwd(*self.args, y=self.y, lse=self.lse, config=self.default(f"spatial_{self.window}_fwd"))
            self.dy = self.randn(B, H, W, heads, D)
            self.inputs += [self.y, self.lse]
            self.grads = tuple(torch.empty_like(t) for t in (self.q, self.k, self.values))

    def _launch(self, config, fill):
        if self.task.kernel.endswith("_fwd"):
            return self._forward(config, fill)
        dq_config, dkdv_config = self._backward_configs(config, fill)
        q, k, values, mix, bs, scale, window, padding = self.args
        dq, dk, dvalues, dmix = self.op._bwd(q, k, values, mix, self.y, self.lse, self.dy, bs, scale, window,
                                             padding, grads=self.grads, config_dq=dq_config,
                                             config_dkdv=dkdv_config)
        return {"dq": dq, "dk": dk, "dvalues": dvalues, "dmix": dmix}


PROBLEMS = {"local": LocalProblem, "spatial": StemProblem}


def problem_class(kernel: str) -> type:
    try:
        return PROBLEMS[tuning.family_name(kernel)]
    except KeyError:
        raise ValueError(f"kernel must be one of the families {sorted(PROBLEMS)} (local_*, spatial_*), "
                         f"got {kernel!r}") from None


# ----------------------------------------------------------------------------------------------
# Compiling ahead (child, CUDA only): every candidate at once, then prune on the compiled facts
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _compile_only(kernels):
    """Inside the block, launches of `kernels` (@triton.jit functions) compile exactly as a real
    launch would (same arguments, same specialization) but run nothing; each compiled (or, under
    AsyncCompileMode, future) kernel is appended to the yielded list."""
    record = []

    def compile_only(fn):
        def run(*args, grid, warmup, **kwargs):
            kernel = type(fn).run(fn, *args, grid=grid, warmup=True, **kwargs)
            record.append(kernel)
            return kernel
        return run

    for fn in kernels:
        fn.run = compile_only(fn)  # the instance attribute shadows JITFunction.run
    try:
        yield record
    finally:
        for fn in kernels:
            vars(fn).pop("run", None)


@contextlib.contextmanager
def _parallel_compiles(workers: int):
    """Triton's AsyncCompileMode on a thread pool (compiles run in parallel: ptxas is a subprocess
    and the compiler passes release the GIL); serial compiles on a Triton without it. Compile
    errors are the callers' to record per candidate: the mode's exit does not raise them again,
    and the mode never outlives the block (Triton 3.6 leaves it active when its exit raises)."""
    try:
        from triton.runtime import _async_compile
    except ImportError:
        yield
        return
    from concurrent.futures import ThreadPoolExecutor
    executor = ThreadPoolExecutor(max_workers=workers)
    try:
        mode = _async_compile.AsyncCompileMode(executor, ignore_errors=True)
    except TypeError:  # a Triton whose mode has no ignore_errors
        mode = _async_compile.AsyncCompileMode(executor)
    mode.__enter__()
    try:
        yield
    finally:
        try:
            mode.__exit__(None, None, None)
        except Exception:
            pass  # a candidate that does not compile: already recorded by the caller
        finally:
            _async_compile.active_mode.set(None)
            executor.shutdown(wait=True)


def _one_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1][:300] if lines else ''}".rstrip(": ")


def kernel_facts(kernel) -> dict:
    """{"registers", "spills", "shared_mem"} of a compiled (or future) kernel, loading it on the
    device (where ptxas's n_regs/n_spills come from); raises what compiling or loading raised."""
    if hasattr(kernel, "result"):  # FutureKernel
        kernel = kernel.result()
    kernel._init_handles()
    return {"registers": int(kernel.n_regs), "spills": int(kernel.n_spills), "shared_mem": int(kernel.metadata.shared)}


def prune_reason(facts: dict) -> str | None:
    """Why compiled facts drop a candidate before it runs: a compile or load failure, or spills."""
    if "error" in facts:
        return f"does not compile or load: {facts['error']}"
    if facts.get("spills"):
        return f"spills {facts['spills']} bytes per thread ({facts.get('registers')} registers)"
    return None


def compile_candidates(problems: list, configs: list, indices: list, workers: int) -> dict:
    """{index: facts} for configs[indices]: every launch of every problem (variant) compiled in
    parallel, without running; facts of the kernels a candidate adds to the default's (the other
    kernels of a backward step run at their defaults), the worst over the variants, or
    {"error": ...}."""
    module = importlib.import_module(tuning.family(problems[0].task.kernel).module)
    calls: dict = {}
    errors: dict = {}
    with _compile_only(tuning.jit_functions(module)) as record, _parallel_compiles(workers):
        for i in [0, *[i for i in indices if i != 0]]:
            start = len(record)
            try:
                for problem in problems:
                    problem.run(configs[i], fill=False)
            except Exception as error:  # a launcher that rejects the config, a synchronous compile error
                errors[i] = _one_line(error)
            calls[i] = record[start:]
        facts_of: dict = {}
        for i, kernels in calls.items():
            for kernel in kernels:
                if id(kernel) not in facts_of:
                    try:
                        facts_of[id(kernel)] = kernel_facts(kernel)
                    except Exception as error:
                        facts_of[id(kernel)] = {"error": _one_line(error)}
    default_ids = {id(k) for k in calls[0]}
    out = {}
    for i in indices:
        if i in errors:
            out[i] = {"error": errors[i]}
            continue
        own = [facts_of[id(k)] for k in calls[i] if id(k) not in default_ids] if i != 0 else \
            [facts_of[id(k)] for k in calls[0]]
        failed = [f for f in own if "error" in f]
        if failed:
            out[i] = failed[0]
        elif own:
            out[i] = {field: max(f[field] for f in own) for field in ("registers", "spills", "shared_mem")}
        else:
            out[i] = {}
    return out


# ----------------------------------------------------------------------------------------------
# The child process
# ----------------------------------------------------------------------------------------------

def _context_ok(device: torch.device) -> bool:
    """False when the CUDA context is broken (a faulting kernel poisons it for good)."""
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize()
        (torch.ones(1, device=device) + 1).item()
        return True
    except Exception:
        return False


class _Guard:
    """Copies of tensors a candidate must not write (inputs, reference outputs)."""

    def __init__(self, named: dict):
        self.named = {name: (t, t.clone()) for name, t in named.items()}

    def changed(self) -> str | None:
        bad = [name for name, (t, copy) in self.named.items() if not torch.equal(t, copy)]
        for name in bad:
            self.named[name][0].copy_(self.named[name][1])
        return f"wrote outside its outputs (changed {', '.join(bad)})" if bad else None


def _child_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not interpreter_enabled() else "cpu")


def _tune_in_child(conn, jobs: list, options: dict) -> None:
    """Child process: for each (task index, task, configs, done indices, problem class), compile,
    validate and time the candidates not done yet, sending progress to the parent."""
    global BENCH_WARMUP_MS, BENCH_REP_MS
    BENCH_WARMUP_MS, BENCH_REP_MS = options["warmup"], options["rep"]
    device = _child_device()
    budget = options.get("candidates_per_child")
    ran = 0
    for index, task, configs, done, problem_cls in jobs:
        conn.send(("begin", index))
        try:
            cls = problem_cls or problem_class(task.kernel)
            problems = [cls(task, device, variant) for variant in cls.VARIANTS]
            todo = [i for i in range(len(configs)) if i not in done]
            facts = {}
            if device.type == "cuda" and options["compile"]:
                conn.send(("phase", index, f"compiling {len(todo)} candidates"))
                facts = compile_candidates(problems, configs, todo, options["compile_workers"])
                if options["prune"]:
                    for i in list(todo):
                        reason = prune_reason(facts.get(i, {})) if i != 0 else None
                        if reason is not None:
                            conn.send(("result", index, i, {"status": "pruned", "reason": reason, **facts[i]}))
                            todo.remove(i)
            references = [problem.run(configs[0]) for problem in problems]
            for variant, reference in zip(cls.VARIANTS, references):
                for name, t in reference.items():
                    if not bool(torch.isfinite(t).all()):
                        raise RuntimeError(f"the default config's {name} ({variant} variant) is not finite")
            references = [{name: t.clone() for name, t in reference.items()} for reference in references]
            guard = _Guard({f"{v}.{kind}{j}": t for v, p, ref in zip(cls.VARIANTS, problems, references)
                            for kind, tensors in (("input", p.inputs), ("reference", list(ref.values())))
                            for j, t in enumerate(tensors)})
        except Exception as error:
            if not _context_ok(device):
                conn.send(("error", index, f"the CUDA context broke preparing the key: {_one_line(error)}"))
                conn.send(("yield",))  # the rest goes on in a fresh child
                conn.close()
                os._exit(FAULT_EXIT_CODE)
            conn.send(("error", index, f"{_one_line(error)}\n{traceback.format_exc(limit=4)}"))
            continue
        for i in todo:
            if budget is not None and ran >= budget:
                conn.send(("yield",))
                conn.close()
                return
            ran += 1
            conn.send(("start", index, i))
            result = {"status": "accepted", "reason": None, "ms": None, "errors": {}, **facts.get(i, {})}
            try:
                if i != 0:
                    for problem, reference in zip(problems, references):
                        reason, errors = compare_outputs(problem.run(configs[i]), reference, task.dtype)
                        result["errors"].update({f"{problem.variant}.{k}": v for k, v in errors.items()})
                        if reason is not None:
                            result.update(status="mismatch", reason=f"{problem.variant}: {reason}")
                            break
                    changed = guard.changed()
                    if changed is not None and result["status"] == "accepted":
                        result.update(status="mismatch", reason=changed)
                if result["status"] == "accepted" and options["time"]:
                    result["ms"] = problems[0].time(configs[i])
                    changed = guard.changed()  # the timed launches reuse the inputs
                    if changed is not None:
                        result.update(status="mismatch", reason=f"{changed} while timed", ms=None)
            except Exception as error:
                if not _context_ok(device):
                    conn.send(("fault", index, i, f"the CUDA context broke: {_one_line(error)}"))
                    conn.close()
                    os._exit(FAULT_EXIT_CODE)
                result.update(status="error", reason=_one_line(error))
            conn.send(("result", index, i, result))
        conn.send(("end", index))
    conn.send(("bye",))
    conn.close()


# ----------------------------------------------------------------------------------------------
# The parent
# ----------------------------------------------------------------------------------------------

def _describe(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def tune(tasks: list[Task], *, time_candidates: bool = True, prune: bool = True, compile_ahead: bool = True,
         problem: type | None = None, timeout: float = SILENCE_TIMEOUT_S, candidates_per_child: int | None = None,
         compile_workers: int | None = None, log=None, verbose: bool = False,
         on_key=None) -> list[KeyResult]:
    """Tune every task in child processes; returns a KeyResult per task, in order.

    time_candidates: time the accepted candidates (False: validation only, as the candidate
    sweep). prune: drop candidates whose compiled kernel spills or does not compile (CUDA).
    compile_ahead: compile every candidate in parallel first (CUDA). problem: a Problem subclass
    to use instead of the family's (picklable: tests inject faulty launchers with it).
    timeout: seconds a child may stay silent before it is killed (its candidate: a fault).
    candidates_per_child: start a fresh child after this many candidates (1: each candidate alone).
    log(line): progress lines (default: stderr). on_key(result): called with each KeyResult as
    its key finishes (the command writes it to the tuned file then, so an interrupted run keeps
    the keys it finished).
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    on_key = on_key or (lambda result: None)
    results = [KeyResult(task, task.configs()) for task in tasks]
    pending = list(range(len(tasks)))
    options = {"time": time_candidates, "prune": prune, "compile": compile_ahead,
               "warmup": BENCH_WARMUP_MS, "rep": BENCH_REP_MS, "candidates_per_child": candidates_per_child,
               "compile_workers": compile_workers or min(16, os.cpu_count() or 4)}
    context = multiprocessing.get_context("spawn")
    start = time.time()
    finished = 0
    while pending:
        jobs = [(i, results[i].task, results[i].configs, set(results[i].results), problem) for i in pending]
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=_tune_in_child, args=(sender, jobs, options), daemon=True)
        child.start()
        sender.close()
        current, in_flight, expected_exit, key_start = None, None, False, time.time()
        while True:
            ready = wait([receiver, child.sentinel], timeout=timeout)
            message = None
            if receiver in ready:
                try:
                    message = receiver.recv()
                except EOFError:
                    message = None
            if message is None:
                if not ready:  # silent for too long: a hung candidate
                    child.kill()
                child.join()
                break
            kind = message[0]
            if kind == "begin":
                current, key_start = message[1], time.time()
                if results[current].results:
                    log(f"    continuing in a fresh child process ({len(results[current].results)} done)")
                else:
                    log(f"[{finished + 1}/{len(tasks)}] {results[current].task.describe()}: "
                        f"{len(results[current].configs)} candidates{_time_left(start, finished, len(tasks))}")
            elif kind == "phase" and verbose:
                log(f"    {message[2]}")
            elif kind == "start":
                in_flight = message[2]
            elif kind == "result":
                _, index, i, result = message
                results[index].results[i] = result
                in_flight = None
                if verbose or result["status"] not in ("accepted", "pruned"):
                    _log_result(log, results[index].configs[i], result)
            elif kind == "fault":
                _, index, i, reason = message
                results[index].results[i] = {"status": "fault", "reason": reason, "ms": None, "errors": {}}
                _log_result(log, results[index].configs[i], results[index].results[i])
                in_flight, expected_exit = None, True
            elif kind in ("end", "error"):
                index = message[1]
                if kind == "error":
                    results[index].error = message[2]
                    log(f"    key failed, keeps its default: {message[2].splitlines()[0]}")
                results[index].seconds += time.time() - key_start
                pending.remove(index)
                finished += 1
                if kind == "end":
                    _log_key(log, results[index])
                on_key(results[index])
                current, in_flight = None, None
            elif kind == "yield":
                expected_exit = True
            elif kind == "bye":
                child.join()
                break
        if not pending or expected_exit:
            if current is not None:
                results[current].seconds += time.time() - key_start
            continue
        # The child died (or hung) unexpectedly.
        code = child.exitcode
        why = "stopped responding (killed)" if code is not None and code < 0 and not ready else \
            f"died (exit code {code})"
        if current is None:
            index = pending.pop(0)  # died before it began a key: blame the next one, so we progress
            results[index].error = f"the child process {why} before tuning it"
            finished += 1
            log(f"[{finished}/{len(tasks)}] {results[index].key}: {results[index].error}; keeps its default")
            on_key(results[index])
        elif in_flight is not None:
            results[current].results[in_flight] = {"status": "fault", "ms": None, "errors": {},
                                                   "reason": f"the child process {why} running it"}
            results[current].seconds += time.time() - key_start
            _log_result(log, results[current].configs[in_flight], results[current].results[in_flight])
        else:
            results[current].error = f"the child process {why} preparing the key"
            results[current].seconds += time.time() - key_start
            pending.remove(current)
            finished += 1
            log(f"    key failed, keeps its default: {results[current].error}")
            on_key(results[current])
    return results


def _time_left(start: float, finished: int, total: int) -> str:
    if not finished:
        return ""
    elapsed = time.time() - start
    return f" ({elapsed:.0f} s elapsed, about {elapsed / finished * (total - finished):.0f} s left)"


def _log_result(log, config: dict, result: dict) -> None:
    text = f"    {result['status']:<8} {_describe(config)}"
    if result.get("ms") is not None:
        text += f"  {result['ms']:.4f} ms"
    if result.get("registers") is not None:
        text += f"  {result['registers']} regs"
    if result.get("reason"):
        text += f"  ({result['reason']})"
    log(text)


def _log_key(log, result: KeyResult) -> None:
    best = result.best()
    counts = {}
    for r in result.results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if best is None:
        log(f"    no config: {summary}")
        return
    ms = result.results[best].get("ms")
    timing = f" {ms:.4f} ms (default {result.results[0]['ms']:.4f} ms)" if ms is not None else ""
    log(f"    best: {_describe(result.configs[best])}{timing}; {summary}; {result.seconds:.1f} s")


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

LOCAL_KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")


def stem_kernels(window: str) -> tuple:
    return tuple(f"spatial_{window}_{kind}" for kind in ("fwd", "bwd_dq", "bwd_dkdv"))


def _parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shapes wants B,H,W,heads,D (five positive ints), got {text!r}")
    return shape


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m sasa_triton.autotune",
        description="Tune the sasa_triton kernels on this GPU (each key in a child process, every candidate "
                    "checked against the default config's outputs) and write the winners to the JSON file "
                    "the package reads.")
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", metavar="B,H,W,heads,D",
                        help="local-attention shapes to tune (default: the ResNet-50 stages at batch 32: "
                             "56x56x64, 28x28x128, 14x14x256, 7x7x512 with 8 heads)")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                        help=f"window sizes (default {PAPER_KERNEL_SIZE}; {TINY_KERNEL_SIZE} under the interpreter)")
    parser.add_argument("--dilation", type=int, default=1, help="window dilation (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="batch of the default shapes (default 32)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes to tune (default bf16; fp32 under the interpreter)")
    parser.add_argument("--no-stem", action="store_true", help="skip the attention stem's kernels")
    parser.add_argument("--stem-windows", nargs="+", choices=("block", "sliding"), default=["block"],
                        help="stem windows to tune at 224x224, block 4 (default: block, the paper's)")
    parser.add_argument("--output", default=None,
                        help="file to write (default: <cache dir>/<GPU name>.json, cache dir from "
                             "SASA_TRITON_CACHE_DIR or ~/.cache/sasa_triton)")
    parser.add_argument("--force", action="store_true",
                        help="tune keys the output file already has (default: skip them)")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help=f"try at most this many configs per key, the default included "
                             f"(default all; {TINY_MAX_CANDIDATES} under the interpreter)")
    parser.add_argument("--warmup", type=float, default=BENCH_WARMUP_MS, help="do_bench warmup per candidate, ms")
    parser.add_argument("--rep", type=float, default=BENCH_REP_MS, help="do_bench repetition time per candidate, ms")
    parser.add_argument("--timeout", type=float, default=SILENCE_TIMEOUT_S,
                        help="seconds a child may stay silent before it is killed (its candidate: a fault)")
    parser.add_argument("--dry-run", action="store_true", help="list the keys and their candidate counts, run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every candidate's result")
    return parser


def default_tasks(args, interpret: bool) -> list[Task]:
    """The tasks of the command line (see build_parser)."""
    dtypes = args.dtypes or (["fp32"] if interpret else ["bf16"])
    sizes = args.kernel_sizes or [TINY_KERNEL_SIZE if interpret else PAPER_KERNEL_SIZE]
    batch = 1 if interpret else args.batch
    shapes = args.shapes or [(batch, *s) for s in (TINY_LOCAL if interpret else PAPER_LOCAL)]
    cap = args.max_candidates or (TINY_MAX_CANDIDATES if interpret else None)
    tasks = [Task(kernel, k, args.dilation, tuple(shape), dtype, max_candidates=cap)
             for dtype in dtypes for shape in shapes for k in sizes for kernel in LOCAL_KERNELS]
    if not args.no_stem and not args.shapes:
        stem = (batch, *(TINY_STEM if interpret else PAPER_STEM))
        tasks += [Task(kernel, STEM_BLOCK, 1, stem, dtype, max_candidates=cap)
                  for dtype in dtypes for window in args.stem_windows for kernel in stem_kernels(window)]
    return tasks


def main(argv=None, prog=None) -> int:
    args = build_parser(prog).parse_args(argv)
    interpret = interpreter_enabled()
    tasks = default_tasks(args, interpret)
    if args.dry_run:
        for task in tasks:
            print(f"{task.key}: {len(task.configs())} candidates")
        return 0
    if not interpret and not torch.cuda.is_available():
        print("sasa_triton.autotune: no CUDA GPU found (torch.cuda.is_available() is False), nothing to tune. "
              "Run it on the GPU the configs are for, or set TRITON_INTERPRET=1 to test the flow on tiny "
              "shapes with Triton's CPU interpreter.", file=sys.stderr)
        return 2
    global BENCH_WARMUP_MS, BENCH_REP_MS
    BENCH_WARMUP_MS, BENCH_REP_MS = args.warmup, args.rep
    path = args.output or tuning.tuned_file()
    if not args.force and os.path.exists(path):
        existing = tuning.read_tuned_file(path)
        have = set(existing["configs"]) if existing else set()
        skipped = [t for t in tasks if t.key in have]
        tasks = [t for t in tasks if t.key not in have]
        if skipped:
            print(f"sasa_triton.autotune: {len(skipped)} keys already in {path} (--force tunes them again)",
                  file=sys.stderr)
    where = "Triton interpreter (CPU): nothing timed" if interpret else tuning.device_name()
    print(f"sasa_triton.autotune: {where}, Triton {tuning.triton_version()}, {len(tasks)} keys, "
          f"each in a child process", file=sys.stderr, flush=True)
    start = time.time()
    written = []

    def save(result: KeyResult) -> None:
        """Each key is written as it finishes: a run stopped midway (Ctrl-C, a time limit) keeps
        the keys it finished, and a rerun without --force goes on from there."""
        if result.entry() is not None:
            written.append(tuning.save_tuned(path, {result.key: result.entry()}))

    results = tune(tasks, timeout=args.timeout, verbose=args.verbose, on_key=save)
    failed = [r for r in results if r.entry() is None]
    for r in failed:
        print(f"sasa_triton.autotune: {r.key} keeps its default config: {r.error or 'no accepted config'}",
              file=sys.stderr)
    if not written:
        print("sasa_triton.autotune: nothing was tuned", file=sys.stderr)
        return 1 if failed else 0
    path = written[-1]
    print(f"sasa_triton.autotune: {len(written)} configs written to {path} ({time.time() - start:.0f} s)",
          file=sys.stderr)
    print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
