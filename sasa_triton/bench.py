"""Benchmarks: the SASA op and layer against convolution, FlexAttention and the reference.

    python -m sasa_triton.bench [--full] [--quick] [--dtype bf16] [--batch 32] [--kernel-sizes 7]
                                [--providers ...] [--models/--no-models] [--out DIR]

Default plan (what a user wants first; a few minutes on a GPU): the paper's ResNet-50
bottleneck widths (56x56x64, 28x28x128, 14x14x256, 7x7x512, 8 heads) at k = 7:

    sasa        the fused op alone, fwd and fwd+bwd (q, k, v views of a channels_last qkv tensor;
                on the CPU its reference path, labelled so)
    sasa_layer  SelfAttention2d (fused 1x1 qkv projection + the op), fwd+bwd
    conv3x3     nn.Conv2d(C, C, 3), the layer SASA replaces (cudnn.benchmark, channels_last), fwd+bwd
    flex        the op in torch FlexAttention (torch.compile'd; CUDA only), fwd
    reference   the PyTorch reference op (sasa_triton.reference), fwd and fwd+bwd where cheap

then SASA-ResNet-50 against ResNet-50, training and inference images/s. `--full` sweeps
k in {3, 5, 7, 9, 11}, both passes of every provider (adding conv_kxk, nn.Conv2d(C, C, k), and
dwconv_kxk, its depthwise form) and ResNet-26/50 with conv and attention stems.

Each row: median time with p20/p80 (triton.testing.do_bench on CUDA, a wall-clock timer on
CPU), images/s, useful TFLOP/s (multiply-add = 2; forward+backward counts 3x the forward),
GB/s of the minimal traffic and its fraction of the copy bandwidth measured in the same run,
peak memory (CUDA). Then the issue-12 target ratios. Writes results.csv, table.txt and PNG plots
under --out (default bench_out, bench_out_full or bench_out_quick by plan, so runs of different
plans never overwrite each other).

The benchmark tunes nothing: the kernels use whatever configs sasa_triton.tuning resolves
(tuned files, else defaults), named in the header.

Without CUDA the same harness runs on the CPU (reference path against CPU convolutions) at a
small batch, clearly labelled: those are not the GPU numbers.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import math
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

CPU_LABEL = "CPU (reference path) — not the GPU numbers the package is judged by"

# (name, H = W, bottleneck width C) of ResNet-50's four stages at 224x224.
STAGES = (("56x56x64", 56, 64), ("28x28x128", 28, 128), ("14x14x256", 14, 256), ("7x7x512", 7, 512))
HEADS = 8
PROVIDERS = ("sasa", "sasa_layer", "conv3x3", "conv_kxk", "dwconv_kxk", "reference", "flex")
PASSES = ("fwd", "fwd+bwd")
GRAPH_SUFFIX = " (CUDA graph)"
# Layer rows timed again as CUDA-graph replays (on CUDA): the op, the layer and the conv it replaces.
GRAPHED_PROVIDERS = ("sasa", "sasa_layer", "conv3x3")
# The default plan: the passes a user wants first of each provider (--full runs both of all).
DEFAULT_PASSES = {"sasa": PASSES, "sasa_layer": ("fwd+bwd",), "conv3x3": ("fwd+bwd",), "flex": ("fwd",),
                  "reference": PASSES}
# (model builder, stem) pairs; the builder names are functions of sasa_triton.models.
MODELS = (("resnet26", "conv"), ("sasa_resnet26", "conv"), ("sasa_resnet26", "attention"),
          ("resnet50", "conv"), ("sasa_resnet50", "conv"), ("sasa_resnet50", "attention"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# A reference row is skipped when one call is estimated to take longer than this (seconds).
REFERENCE_MAX_SECONDS = 0.5

FIELDS = ("section", "device", "dtype", "provider", "backend", "shape", "batch", "H", "W", "C", "heads", "D", "k",
          "pass", "ms_median", "ms_p20", "ms_p80", "images_per_s", "gflop", "tflops", "mbytes", "gbps",
          "roofline_frac", "peak_mem_mb", "note")


@dataclasses.dataclass
class Row:
    section: str  # "layer" or "model"
    device: str
    dtype: str
    provider: str
    backend: str
    shape: str
    batch: int
    H: int
    W: int
    C: int
    heads: int | str
    D: int | str
    k: int | str
    pass_: str  # "fwd", "fwd+bwd" (layers); "inference", "training" (models)
    ms_median: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    images_per_s: float | None = None
    gflop: float | None = None
    tflops: float | None = None
    mbytes: float | None = None
    gbps: float | None = None
    roofline_frac: float | None = None
    peak_mem_mb: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return {k: _fmt(d[k]) for k in FIELDS}


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class Timer:
    """Median and p20/p80 of a callable: do_bench on CUDA, wall clock on CPU.

    mode: "quick" (smoke run), "default" or "full"; the default plan keeps warm-up and repetitions
    short, since its budget is a few minutes for about forty rows from a cold cache."""

    # do_bench (warmup ms, rep ms) on CUDA; wall-clock budget (s) per row on CPU.
    CUDA_MS = {"quick": (2, 10), "default": (10, 50), "full": (25, 200)}
    CPU_S = {"quick": 0.1, "default": 0.3, "full": 0.5}

    def __init__(self, device: torch.device, mode: str = "default"):
        self.device = device
        self.mode = mode

    def __call__(self, fn, grad_to_none=None, min_reps=3, rep_ms=None):
        if self.device.type == "cuda":
            import triton.testing
            warmup, rep = self.CUDA_MS[self.mode]
            med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep_ms or rep, grad_to_none=grad_to_none,
                                                    quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80
        budget = self.CPU_S[self.mode]
        fn()  # warm-up (allocator, one-time dispatch)
        times, start = [], time.perf_counter()
        while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 30):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        qs = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        return tuple(float(x) for x in qs)

    def peak_memory_mb(self, fn):
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20


def measure_bandwidth(device: torch.device, timer: Timer, device_name: str) -> Row:
    """The memory roof: GB/s (read + write) of a large device-to-device fp32 copy (1 GiB on CUDA,
    past any L2; 64 MiB on CPU, past most last-level caches)."""
    mib = 1024 if device.type == "cuda" else 64
    src = torch.ones(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    row = Row("roofline", device_name, "fp32", "copy", "torch", f"{mib} MiB", 1, 0, 0, 0, "", "", "", "-")
    row.ms_median, row.ms_p20, row.ms_p80 = timer(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    row.mbytes, row.gbps, row.roofline_frac = nbytes / 1e6, nbytes / (row.ms_median * 1e-3) / 1e9, 1.0
    return row


def measure_matmul(device: torch.device, dtype: torch.dtype, timer: Timer, device_name: str) -> Row:
    """The compute roof: dense n x n matmul TFLOP/s (in `dtype` on CUDA, fp32 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu":
        dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    row = Row("roofline", device_name, DTYPE_NAMES[dtype], "matmul", "torch", f"{n}^3", 1, 0, 0, 0, "", "", "",
              "-")
    row.ms_median, row.ms_p20, row.ms_p80 = timer(lambda: a @ b)
    row.gflop = 2 * n ** 3 / 1e9
    row.tflops = 2 * n ** 3 / (row.ms_median * 1e-3) / 1e12
    return row


# ----------------------------------------------------------------------------------------------
# FLOPs and bytes (multiply-add = 2 FLOPs; minimal traffic, each tensor read or written once)
# ----------------------------------------------------------------------------------------------

def op_flops(B, H, W, C, k, heads=HEADS) -> int:
    """Forward FLOPs of the op: per pixel and head 2k^2 D (q.k) + 2k^2 D (p.v) + 2k D (q.rel)."""
    D = C // heads
    return B * H * W * heads * (4 * k * k * D + 2 * k * D)


def cost(provider: str, B, H, W, C, k, elt: int, backward: bool) -> tuple[int, int]:
    """(useful FLOPs, minimal bytes) of one forward (+ backward) of a provider's layer.

    Forward+backward FLOPs are 3x the forward (the usual convention). Bytes: the op reads q, k, v
    and writes y (forward), then reads q, k, v, y, dy and writes dq, dk, dv (backward); a conv
    reads x and w and writes y, then reads dy, x, w and writes dx, dw. The SASA layer adds its
    projection's traffic (x, w read, qkv written; backward: dqkv, x, w read, dx, dw written).
    """
    act = B * H * W * C * elt
    if provider in ("sasa", "reference", "flex"):
        flops = op_flops(B, H, W, C, k)
        nbytes = 4 * act + (8 * act if backward else 0)
    elif provider == "sasa_layer":
        w = 3 * C * C * elt
        flops = op_flops(B, H, W, C, k) + 2 * B * H * W * C * 3 * C
        nbytes = (act + w + 3 * act) + 4 * act
        if backward:
            nbytes += 8 * act + (3 * act + act + w + act + w)
    else:
        taps = 3 if provider == "conv3x3" else k
        cin = 1 if provider.startswith("dw") else C
        w = C * cin * taps * taps * elt
        flops = 2 * B * H * W * C * cin * taps * taps
        nbytes = 2 * act + w + ((3 * act + 2 * w) if backward else 0)
    return flops * (3 if backward else 1), nbytes


def reference_seconds(B, H, W, C, k, backward: bool, bandwidth_gbps: float) -> float:
    """Rough time of one call of the reference op, to skip rows that would take long: per window
    tap it makes about 9 fp32 activation-sized passes over memory (shifted product, channel sum,
    weighted value, accumulation) forward, about 3x that with the backward, at the copy
    bandwidth measured in the same run."""
    passes = 9 * k * k * (3 if backward else 1)
    return passes * B * H * W * C * 4 / (bandwidth_gbps * 1e9)


# ----------------------------------------------------------------------------------------------
# The plan: which rows to time
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """One row to time. Layers: provider, stage, k, pass (fwd, fwd+bwd); models: builder name,
    stem, image size, pass (inference, training)."""
    section: str
    provider: str
    shape: str
    H: int
    C: int
    k: int | str
    pass_: str
    stem: str = ""

    @property
    def setup_key(self) -> tuple:
        """Cases with the same key share one setup (inputs, module, torch.compile)."""
        return self.section, self.provider, self.stem, self.shape, self.k

    @property
    def name(self) -> str:
        if self.section == "model":
            return _model_label(self.provider, self.stem)
        return self.provider

    def describe(self) -> str:
        if self.section == "model":
            return f"{self.shape} model {self.name} {self.pass_}"
        return f"{self.shape} k={self.k} {self.provider} {self.pass_}"


def _model_label(name: str, stem: str) -> str:
    return name if name.startswith("resnet") else f"{name}({stem} stem)"


def provider_skip_reason(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (one row with this note replaces its rows), or None."""
    if provider == "flex":
        from ._bench_flex import flex_available
        if not flex_available():
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device.type != "cuda":
            return "FlexAttention is benchmarked compiled on CUDA only (tests check it against the reference on CPU)"
    return None


def make_plan(args, device, device_name: str, bandwidth_gbps: float) -> tuple[list[Case], list[Row]]:
    """(cases to time, rows that say why a provider or row was left out)."""
    cases, left_out = [], []
    dtype = args.dtype

    def leave_out(provider, note, shape="-", H=0, C=0, k="", pass_="-"):
        log(f"{provider} {shape} {pass_}: left out: {note}")
        left_out.append(Row("layer", device_name, dtype, provider, "-", shape, args.batch, H, H, C, HEADS,
                            C // HEADS if C else "", k, pass_, note=note))

    providers = []
    for provider in args.providers:
        reason = provider_skip_reason(provider, device)
        if provider == "reference" and device.type != "cuda" and "sasa" in args.providers:
            reason = "on the CPU the sasa rows already run the reference path"
        if reason is None:
            providers.append(provider)
        else:
            leave_out(provider, reason)
    for name, H, C in (STAGES[i - 1] for i in args.stages):
        for provider in providers:
            passes = PASSES if args.full else DEFAULT_PASSES.get(provider, PASSES)
            for k in ([3] if provider == "conv3x3" else args.kernel_sizes):
                if provider == "conv_kxk" and k == 3 and "conv3x3" in providers:
                    continue  # the same layer as conv3x3
                for pass_ in passes:
                    if provider == "reference":
                        seconds = reference_seconds(args.batch, H, H, C, k, pass_ == "fwd+bwd", bandwidth_gbps)
                        if seconds > REFERENCE_MAX_SECONDS:
                            leave_out(provider, f"skipped: one call would take about {seconds:.1f} s "
                                                f"(estimated from its memory traffic)", name, H, C, k, pass_)
                            continue
                    cases.append(Case("layer", provider, name, H, C, k, pass_))
    # The op and the layers it is compared with once more, each call captured in a CUDA graph and
    # replayed: the kernels' own time, without the per-call host time that an eager call costs
    # (tens of us, more than the kernels from 28x28 down), for the targets that are the kernels'.
    graphed = [c for c in cases if c.section == "layer" and c.provider in GRAPHED_PROVIDERS]
    if device.type == "cuda":
        cases += [Case(c.section, c.provider, c.shape, c.H, c.C, c.k, c.pass_ + GRAPH_SUFFIX) for c in graphed]
    elif graphed:
        note = "CUDA graphs: CUDA only"
        log(f"layers (CUDA graph): left out: {note}")
        left_out.append(Row("layer", device_name, dtype, "layers", "-", "-", args.batch, 0, 0, 0, "", "", "",
                            "fwd/fwd+bwd" + GRAPH_SUFFIX, note=note))
    if args.models:
        S = args.image_size
        for name, stem in MODELS:  # the default plan: conv stems only
            if int(name.rsplit("resnet", 1)[1]) in args.model_depths and (args.full or stem == "conv"):
                for pass_ in ("inference", "training"):
                    cases.append(Case("model", name, f"{S}x{S}", S, 3, 7 if name.startswith("sasa") else "", pass_,
                                      stem))
        # Eager training with the backward on the calling thread: PyTorch hands a CUDA backward to
        # a device thread, a hand-over its developers describe as costing cache misses and context
        # switches for a one-device graph (pytorch/pytorch#192004); then the same steps captured in
        # CUDA graphs: the kernels without the per-call host cost that dominates the small stages
        # in eager mode. Graphs last: a failed capture cannot spoil other rows.
        models = [c for c in cases if c.section == "model"]
        variants = [(" training" + CALLER_SUFFIX, [c for c in models if c.pass_ == "training"], CALLER_SUFFIX,
                     "on the CPU the backward runs on the calling thread already"),
                    (" inference/training" + GRAPH_SUFFIX, models, GRAPH_SUFFIX, "CUDA graphs: CUDA only")]
        for label, base, suffix, cpu_note in variants:
            if device.type == "cuda":
                cases += [Case(c.section, c.provider, c.shape, c.H, c.C, c.k, c.pass_ + suffix, c.stem) for c in base]
            elif base:
                log(f"models{label}: left out: {cpu_note}")
                left_out.append(Row("model", device_name, dtype, "models", "-", "-", args.batch, 0, 0, 3, "", "", "",
                                    label.strip(), note=cpu_note))
    return cases, left_out


# ----------------------------------------------------------------------------------------------
# Timing the cases
# ----------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """One stderr line per row, `[ 12/40] 14x14x256 k=7 sasa_layer fwd+bwd  elapsed 42s  eta 1m20s`,
    the time left estimated from the mean time of the rows done."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.start_time = time.perf_counter()

    def begin(self, label: str) -> None:
        elapsed = time.perf_counter() - self.start_time
        eta = _duration(elapsed / self.done * (self.total - self.done)) if self.done else "?"
        width = len(str(self.total))
        log(f"[{self.done + 1:>{width}}/{self.total}] {label}  elapsed {_duration(elapsed)}  eta {eta}")

    def end(self, row: Row) -> None:
        self.done += 1
        if row.ms_median is None:
            log(f"    {row.note}")
        elif row.section == "model":
            log(f"    {row.ms_median:.1f} ms  {row.images_per_s:.1f} img/s")
        else:
            log(f"    {row.ms_median:.3f} ms  {row.images_per_s:.0f} img/s  {row.tflops:.3g} TFLOP/s  "
                f"{row.gbps:.3g} GB/s")


def _grad_fn(fn, inputs):
    """fn() -> y; returns a callable running forward + backward to `inputs` with a fixed dy."""
    y = fn()
    dy = torch.randn_like(y)

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, dy)
    return run


def _make_layer_case(case: Case, args, device, dtype):
    """(fwd callable, inputs needing grads, backend label, note) for one provider and shape."""
    B, H, C, k = args.batch, case.H, case.C, case.k
    D = C // HEADS
    cuda = device.type == "cuda"
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    if case.provider in ("sasa", "reference", "flex"):
        # q, k, v as views of a channels_last (B, H, W, 3, heads, D) qkv tensor, as the layer sees them.
        qkv = randn(B, H, H, 3, HEADS, D, std=D ** -0.25).requires_grad_()
        rel_rows = randn(k, D // 2, std=D ** -0.5).requires_grad_()
        rel_cols = randn(k, D - D // 2, std=D ** -0.5).requires_grad_()
        inputs = [qkv, rel_rows, rel_cols]
        if case.provider == "sasa":
            from .ops.local_attention import local_attention2d
            backend = "triton" if cuda else "reference"

            def fwd():
                q, kk, v = qkv.unbind(3)
                return local_attention2d(q, kk, v, rel_rows, rel_cols, kernel_size=k, backend=backend)
            note = "" if cuda else "CPU: local_attention2d's reference path (the Triton kernel needs CUDA)"
            return fwd, inputs, backend, note
        if case.provider == "reference":
            from .reference import local_attention2d as reference_op

            def fwd():
                q, kk, v = qkv.unbind(3)
                return reference_op(q, kk, v, rel_rows, rel_cols, kernel_size=k)
            return fwd, inputs, "pytorch", ""
        # flex
        from . import _bench_flex
        from torch import _dynamo
        _dynamo.reset()  # a fresh compile per shape (the recompile limit would fall back to eager)
        block_mask = _bench_flex.window_block_mask(H, H, k, 1, "zeros", device)

        def flex_op(qkv, rel_rows, rel_cols, block_mask):
            q, kk, v = qkv.unbind(3)
            return _bench_flex.flex_local_attention2d(q, kk, v, rel_rows, rel_cols, kernel_size=k,
                                                      block_mask=block_mask, min_head_dim=16)
        compiled = torch.compile(flex_op, dynamic=False)
        note = "head dim zero-padded to 16 (flex needs D >= 16)" if D < 16 else ""
        return (lambda: compiled(qkv, rel_rows, rel_cols, block_mask)), inputs, "flex+compile", note

    x = randn(B, C, H, H).contiguous(memory_format=torch.channels_last).requires_grad_()
    if case.provider == "sasa_layer":
        from .modules import SelfAttention2d
        label = "triton" if cuda else "reference"
        layer = SelfAttention2d(C, C, kernel_size=k, heads=HEADS, backend=label)
    else:
        taps = 3 if case.provider == "conv3x3" else k
        groups = C if case.provider.startswith("dw") else 1
        layer = nn.Conv2d(C, C, taps, padding=taps // 2, groups=groups, bias=False)
        label = "cudnn" if cuda else "aten-cpu"
    layer = layer.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return (lambda: layer(x)), [x, *layer.parameters()], label, ""


def _time_layer(row: Row, case: Case, setup, args, timer: Timer, dtype, bandwidth_gbps: float) -> None:
    fwd, inputs, row.backend, row.note = setup
    graphed = case.pass_.endswith(GRAPH_SUFFIX)
    backward = case.pass_.removesuffix(GRAPH_SUFFIX) == "fwd+bwd"
    if backward:
        fn = _grad_fn(fwd, inputs)
    else:
        def fn():
            with torch.no_grad():
                return fwd()
    if graphed:
        fn = _captured(fn)
    row.ms_median, row.ms_p20, row.ms_p80 = timer(fn)
    row.peak_mem_mb = timer.peak_memory_mb(fn)
    elt = torch.empty((), dtype=dtype).element_size()
    flops, nbytes = cost(case.provider, args.batch, case.H, case.H, case.C, case.k, elt, backward)
    seconds = row.ms_median * 1e-3
    row.images_per_s = args.batch / seconds
    row.gflop = flops / 1e9
    row.tflops = flops / seconds / 1e12
    row.mbytes = nbytes / 1e6
    row.gbps = nbytes / seconds / 1e9
    row.roofline_frac = row.gbps / bandwidth_gbps


def _make_model(case: Case, args, device, dtype):
    """(model, input, target, autocast context, FLOPs of one forward) of a model case."""
    from . import models
    S = args.image_size
    kwargs = {}
    if case.provider.startswith("sasa"):
        kwargs = dict(stem=case.stem, backend="triton" if device.type == "cuda" else "reference")
    model = getattr(models, case.provider)(**kwargs).to(device=device, memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, S, S, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (args.batch,), device=device)
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    return model, x, target, autocast, models.count_flops(model, (args.batch, 3, S, S))


CALLER_SUFFIX = " (backward on the calling thread)"  # torch.autograd.set_multithreading_enabled(False)


def _captured(step, prepare=lambda: None, warmup: int = 3):
    """step() captured in a CUDA graph, as PyTorch's whole-network capture recipe does: warm-up
    steps on a side stream, prepare() before each of them and before the capture (a training step
    sets the gradients to None there, so the captured backward allocates them in the graph's pool
    and each replay overwrites them). Returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            prepare()
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _time_model(row: Row, case: Case, setup, args, timer: Timer) -> None:
    model, x, target, autocast, forward_flops = setup
    graphed = case.pass_.endswith(GRAPH_SUFFIX)
    if graphed and isinstance(autocast, torch.autocast):
        # autocast's cast cache must be off while capturing (PyTorch's CUDA-graph notes).
        autocast = torch.autocast(device_type=x.device.type, dtype=autocast.fast_dtype, cache_enabled=False)
    prepare = lambda: None  # noqa: E731
    if case.pass_.startswith("inference"):
        model.eval()

        def fn():
            with torch.no_grad(), autocast:
                return model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def prepare():
            opt.zero_grad(set_to_none=True)

        def step():
            with autocast:
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        def fn():
            prepare()
            step()
    if graphed:
        fn = _captured(step if case.pass_.startswith("training") else fn, prepare)
    # Model steps take tens of ms: a longer do_bench budget gives the quantiles enough samples.
    rep_ms = {"quick": 100, "default": 300, "full": 1500}[timer.mode]
    # (the flag is the calling thread's own: set around the timing, it holds for every step timed)
    caller_thread = case.pass_.endswith(CALLER_SUFFIX)
    with torch.autograd.set_multithreading_enabled(False) if caller_thread else contextlib.nullcontext():
        row.ms_median, row.ms_p20, row.ms_p80 = timer(fn, min_reps=2 if timer.mode == "quick" else 3, rep_ms=rep_ms)
        row.peak_mem_mb = timer.peak_memory_mb(fn)
    seconds = row.ms_median * 1e-3
    row.images_per_s = args.batch / seconds
    flops = forward_flops * (3 if case.pass_.startswith("training") else 1)
    row.gflop = flops / 1e9
    row.tflops = flops / seconds / 1e12


def _row_of(case: Case, args, device, device_name: str) -> Row:
    if case.section == "model":
        sasa = case.provider.startswith("sasa")
        backend = ("triton" if device.type == "cuda" else "reference") if sasa else \
                  ("cudnn" if device.type == "cuda" else "aten-cpu")
        autocast = "-autocast" if args.dtype != "fp32" else ""
        return Row("model", device_name, args.dtype + autocast, case.name, backend, case.shape, args.batch, case.H,
                   case.H, 3, "", "", case.k, case.pass_)
    return Row("layer", device_name, args.dtype, case.provider, "", case.shape, args.batch, case.H, case.H, case.C,
               HEADS, case.C // HEADS, case.k, case.pass_)


def run_cases(cases: list[Case], args, device, dtype, timer: Timer, bandwidth_gbps: float, device_name: str,
              progress: Progress) -> list[Row]:
    """Time every case in order; cases with the same setup_key share one setup. A failing case
    (OOM, compile error) becomes a row with the reason and does not end the run."""
    rows = []
    setup_key = setup = failure = None
    for case in cases:
        if case.setup_key != setup_key:
            setup_key, setup, failure = case.setup_key, None, None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        progress.begin(case.describe())
        row = _row_of(case, args, device, device_name)
        try:
            if failure is not None:
                raise failure  # the setup failed: the other passes would fail the same way
            if setup is None:
                try:
                    setup = (_make_layer_case if case.section == "layer" else _make_model)(case, args, device, dtype)
                except Exception as error:
                    failure = error
                    raise
            if case.section == "layer":
                _time_layer(row, case, setup, args, timer, dtype, bandwidth_gbps)
            else:
                _time_model(row, case, setup, args, timer)
        except Exception as e:
            kind = "skipped" if isinstance(e, ImportError) else "failed"
            row.note = f"{kind}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            row.ms_median = row.ms_p20 = row.ms_p80 = row.peak_mem_mb = None
            row.images_per_s = row.gflop = row.tflops = row.mbytes = row.gbps = row.roofline_frac = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        progress.end(row)
    return rows


# ----------------------------------------------------------------------------------------------
# The issue-12 targets, read off one run
# ----------------------------------------------------------------------------------------------

# Target ratios (issue 12): op fwd share of the roofline, op fwd+bwd / fwd, layer fwd+bwd / conv3x3
# fwd+bwd, SASA-ResNet / ResNet images/s in training and inference.
TARGETS = {"fwd_roofline": 0.35, "bwd_over_fwd": 3.0, "layer_over_conv": 2.0, "training": 0.75, "inference": 0.6}


def _verdict(value, target, higher_is_better) -> str:
    if value is None:
        return ""
    return "ok" if (value >= target if higher_is_better else value <= target) else "miss"


def target_summary(rows: list[Row], cpu: bool) -> str:
    """The ratios of the issue-12 targets in this run: op forward share of the copy-bandwidth
    roofline (>= 35 %), op fwd+bwd / fwd (<= 3x), layer fwd+bwd / conv3x3 fwd+bwd (<= 2x) per
    stage and k; SASA-ResNet / ResNet training (>= 0.75x) and inference (>= 0.6x) images/s."""
    timed = {(r.section, r.provider, r.shape, r.k, r.pass_): r for r in rows if r.ms_median is not None}

    def ms(provider, shape, k, pass_):
        r = timed.get(("layer", provider, shape, k, pass_))
        return r.ms_median if r else None

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    lines = ["Issue-12 targets (set for k = 7; ratios within this run; ok = target met):"]
    if cpu:
        lines.append("(CPU run: the op here is the reference path; the targets are for the GPU kernels)")
    stages = list(dict.fromkeys(r.shape for r in rows if r.section == "layer" and r.provider in ("sasa", "sasa_layer")))
    for suffix in ("", GRAPH_SUFFIX):
        table = [("stage", "k", "op fwd GB/s", "fwd / roofline (>= 35 %)", "op fwd+bwd / fwd (<= 3x)",
                  "layer fwd+bwd / conv3x3 fwd+bwd (<= 2x)")]
        for shape in stages:
            ks = sorted({r.k for r in rows if r.section == "layer" and r.shape == shape and isinstance(r.k, int)
                         and r.provider in ("sasa", "sasa_layer")})
            for k in ks:
                fwd = timed.get(("layer", "sasa", shape, k, "fwd" + suffix))
                share = fwd.roofline_frac if fwd else None
                bwd = ratio(ms("sasa", shape, k, "fwd+bwd" + suffix), ms("sasa", shape, k, "fwd" + suffix))
                layer = ratio(ms("sasa_layer", shape, k, "fwd+bwd" + suffix),
                              ms("conv3x3", shape, 3, "fwd+bwd" + suffix))
                if share is None and bwd is None and layer is None:
                    continue
                table.append((shape, str(k), _cell(fwd.gbps) if fwd else "-",
                              f"{100 * share:.1f} % {_verdict(share, TARGETS['fwd_roofline'], True)}" if share else "-",
                              f"{bwd:.2f}x {_verdict(bwd, TARGETS['bwd_over_fwd'], False)}" if bwd else "-",
                              f"{layer:.2f}x {_verdict(layer, TARGETS['layer_over_conv'], False)}" if layer else "-"))
        if len(table) > 1:
            if suffix:
                lines.append("Each call replayed from a CUDA graph (the kernels without the per-call host time):")
            widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    for depth in (26, 50):
        for suffix in ("", CALLER_SUFFIX, GRAPH_SUFFIX):
            parts = []
            for pass_ in ("training", "inference"):
                sasa = next((r for r in rows if r.section == "model"
                             and r.provider == f"sasa_resnet{depth}(conv stem)"
                             and r.pass_ == pass_ + suffix and r.ms_median is not None), None)
                conv = next((r for r in rows if r.section == "model" and r.provider == f"resnet{depth}"
                             and r.pass_ == pass_ + suffix and r.ms_median is not None), None)
                if sasa and conv:
                    value = sasa.images_per_s / conv.images_per_s
                    parts.append(f"{pass_} {value:.2f}x (>= {TARGETS[pass_]}x: "
                                 f"{_verdict(value, TARGETS[pass_], True)})")
            if parts:
                lines.append(f"SASA-ResNet-{depth} (conv stem) / ResNet-{depth} images/s{suffix}: "
                             + ", ".join(parts))
    if len(lines) == 1 + cpu:
        lines.append("(no rows for them in this run)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _cell(value, digits=3):
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = math.floor(math.log10(abs(value)))
        return f"{value:.{max(0, digits - 1 - magnitude)}f}" if magnitude < digits else f"{value:.0f}"
    return str(value)


def format_table(rows: list[Row], header: str) -> str:
    columns = [("section", "section"), ("shape", "shape"), ("k", "k"), ("provider", "provider"),
               ("backend", "backend"), ("pass", "pass_"), ("ms", "ms_median"), ("p20", "ms_p20"),
               ("p80", "ms_p80"), ("img/s", "images_per_s"), ("TFLOP/s", "tflops"), ("GB/s", "gbps"),
               ("roofline", "roofline_frac"), ("peak MB", "peak_mem_mb")]
    table = [[title for title, _ in columns]]
    notes = {}
    for row in rows:
        cells = [_cell(getattr(row, attr)) for _, attr in columns]
        if row.note:
            mark = notes.setdefault(row.note, f"[{len(notes) + 1}]")
            cells[columns.index(("provider", "provider"))] += " " + mark
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = [header, ""]
    for i, cells in enumerate(table):
        lines.append("  ".join(c.rjust(w) if j >= 6 else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if notes:
        lines.append("")
        lines.extend(f"{mark} {note}" for note, mark in notes.items())
    return "\n".join(lines)


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_dict())


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        card = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        card = f"CPU {platform.processor() or platform.machine()} ({threads} thread{'' if threads == 1 else 's'})"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"card": card, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "commit": _git_commit(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog or "python -m sasa_triton.bench",
        description="SASA op/layer vs convolution (layer benchmark) and SASA-ResNets vs ResNets (model benchmark). "
                    "By default the four ResNet-50 stages at k = 7 and ResNet-50 (a few minutes on a GPU); --full "
                    "sweeps window sizes, providers and models. Without CUDA runs a small CPU version of the same "
                    "harness (reference path). Tunes nothing: the kernels use the configs the header names.")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: k in 3 5 7 9 11, every provider with both passes, ResNet-26/50 with conv "
                        "and attention stems, longer timing")
    p.add_argument("--quick", action="store_true",
                   help="short timing and fewer shapes on CPU (a smoke run); writes to its own folder")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="element type (default: bf16 on CUDA, fp32 on CPU); models use autocast for half types")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on CUDA, 2 on CPU, 1 with --quick on CPU)")
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                   help="window sizes k (default: 7; with --full 3 5 7 9 11, or 3 7 11 with --quick)")
    p.add_argument("--providers", nargs="+", default=None, choices=PROVIDERS, metavar="PROVIDER",
                   help=f"layer providers, of {', '.join(PROVIDERS)} (default: "
                        f"{' '.join(DEFAULT_PASSES)}; every one with --full)")
    p.add_argument("--stages", type=int, nargs="+", default=None, choices=(1, 2, 3, 4),
                   help="ResNet-50 stages to benchmark, 1 = 56x56x64 ... 4 = 7x7x512 (default: all; 3 4 on CPU with --quick)")
    p.add_argument("--models", dest="models", action="store_true", default=True, help="run the model benchmark (default)")
    p.add_argument("--no-models", dest="models", action="store_false", help="skip the model benchmark")
    p.add_argument("--model-depths", type=int, nargs="+", default=None, choices=(26, 50),
                   help="ResNet depths of the model benchmark (default: 50; 26 50 with --full; 26 on CPU with --quick)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input resolution, a multiple of 32 (default: 224 on CUDA, 64 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--out", default=None,
                   help="output folder for results.csv, table.txt and the PNGs (default: bench_out, bench_out_full "
                        "with --full; --quick adds _quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads on the CPU path (default 1: small ops stay fast and timings stable when "
                        "the machine is shared)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    args = p.parse_args(argv)
    if args.batch is not None and args.batch < 1:
        p.error("--batch must be >= 1")
    if args.kernel_sizes and any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
        p.error("--kernel-sizes must be positive odd integers")
    if args.image_size is not None and (args.image_size < 32 or args.image_size % 32):
        p.error("--image-size must be a positive multiple of 32")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def default_out(full: bool, quick: bool) -> str:
    """bench_out, bench_out_full, bench_out_quick or bench_out_full_quick: one folder per plan."""
    return "bench_out" + ("_full" if full else "") + ("_quick" if quick else "")


def _resolve_defaults(args, device) -> None:
    cuda = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.batch is None:
        args.batch = 32 if cuda else (1 if args.quick else 2)
    if args.providers is None:
        args.providers = list(PROVIDERS if args.full else DEFAULT_PASSES)
    if args.kernel_sizes is None:
        args.kernel_sizes = ([3, 7, 11] if args.quick else [3, 5, 7, 9, 11]) if args.full else [7]
    if args.stages is None:
        args.stages = [1, 2, 3, 4] if (cuda or not args.quick) else [3, 4]
    if args.model_depths is None:
        args.model_depths = [26, 50] if args.full else ([26] if args.quick and not cuda else [50])
    if args.image_size is None:
        args.image_size = 224 if cuda else 64
    if args.threads is None and not cuda:
        args.threads = 1
    if args.out is None:
        args.out = default_out(args.full, args.quick)


LOCAL_KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")


def config_source(device: torch.device, cases=(), dtype=torch.bfloat16) -> str:
    """Which launch configs the Triton kernels get in this run, for the header. The benchmark
    itself sets nothing that enables tuning: it times whatever sasa_triton.tuning resolves."""
    if device.type != "cuda":
        return "kernel configs: none (no Triton kernel runs on the CPU path)"
    try:
        from . import tuning
        if not getattr(tuning, "tuned_configs_enabled", lambda: True)():
            source = "default configs only (SASA_TRITON_AUTOTUNE=0: tuned files ignored)"
        else:
            found = [path for path in tuning.config_files()
                     if os.path.exists(path) and tuning.read_tuned_file(path) is not None]
            source = (f"default configs (no tuned file for {tuning.device_name()!r}; "
                      f"python -m sasa_triton.autotune writes one)")
            if found:
                source = f"tuned file {', '.join(found)}, else default configs"
                if hasattr(tuning, "tuned_entries"):
                    keys = {tuning.config_key(kernel, case.k, 1, case.C // HEADS, dtype, case.H, case.H)
                            for case in cases if case.provider in ("sasa", "sasa_layer") for kernel in LOCAL_KERNELS}
                    if keys:
                        tuned = len(keys & set(tuning.tuned_entries()))
                        source += f" ({tuned} of the {len(keys)} local-attention keys of the layer rows tuned)"
        # Tuners that still time candidates on first use say so through autotune_mode().
        in_process = getattr(tuning, "autotune_mode", lambda: "off")()
    except Exception as e:  # the tuning module's API is not the benchmark's to pin down
        return f"kernel configs: unknown ({type(e).__name__}: {e})"
    if in_process == "off":
        return f"kernel configs: {source}; nothing is tuned in this process"
    return (f"kernel configs: {source}; autotuning in this process is ON "
            f"(SASA_TRITON_AUTOTUNE={os.environ.get('SASA_TRITON_AUTOTUNE', '<unset>')}): each new key is tuned "
            f"on its first call, outside the timed runs but inside the run time")


def main(argv=None, prog=None) -> int:
    """The `python -m sasa_triton.bench` CLI; `prog` is the command name shown in --help."""
    args = parse_args(argv, prog)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    _resolve_defaults(args, device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device, argv, prog or "python -m sasa_triton.bench")
    finally:
        torch.set_num_threads(threads)


def _run(args, device, argv, prog) -> int:
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    device_name = env["card"] if device.type == "cuda" else "cpu"
    label = env["card"] if device.type == "cuda" else f"{CPU_LABEL}; {env['card']}"
    command = f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:])
    plan_name = ("full" if args.full else "default") + (" (quick)" if args.quick else "")
    log(f"sasa_triton.bench on {label}")
    timer = Timer(device, "quick" if args.quick else ("full" if args.full else "default"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        roofs = [measure_bandwidth(device, timer, device_name), measure_matmul(device, dtype, timer, device_name)]
        bandwidth, matmul = roofs[0].gbps, roofs[1].tflops
        log(f"copy bandwidth {bandwidth:.1f} GB/s, {roofs[1].dtype} matmul {matmul:.3g} TFLOP/s")
        cases, left_out = make_plan(args, device, device_name, bandwidth)
        configs = config_source(device, cases, dtype)
        log(f"{plan_name} plan, {len(cases)} rows; {configs}")
        progress = Progress(len(cases))
        rows = roofs + left_out + run_cases(cases, args, device, dtype, timer, bandwidth, device_name, progress)
        seconds = time.perf_counter() - start

    header = "\n".join([
        f"SASA benchmark — {label}",
        f"date {env['date']}  commit {env['commit']}  torch {env['torch']}  triton {env['triton']}",
        f"command: {command.strip()}",
        f"{plan_name} plan, {len(cases)} rows in {_duration(seconds)}; {configs}",
        f"dtype {args.dtype}, batch {args.batch}, heads {HEADS}; copy bandwidth {bandwidth:.1f} GB/s "
        f"(roofline = GB/s / this), {roofs[1].dtype} matmul {matmul:.3g} TFLOP/s",
        "times in ms: median (p20, p80); TFLOP/s useful (multiply-add = 2, fwd+bwd = 3x fwd); "
        "GB/s of the minimal traffic",
    ])
    table = format_table(rows, header) + "\n\n" + target_summary(rows, cpu=device.type != "cuda")
    print(table)
    csv_path = os.path.join(args.out, "results.csv")
    write_csv(rows, csv_path)
    with open(os.path.join(args.out, "table.txt"), "w") as f:
        f.write(table + "\n")
    written = [csv_path, os.path.join(args.out, "table.txt")]
    if args.plots:
        from ._bench_plot import plot_all
        written += plot_all(rows, args.out, label)
    log("wrote " + ", ".join(written))
    if args.quick:
        log(f"(a --quick run: its results are in {args.out}/, apart from the full-timing runs' folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
