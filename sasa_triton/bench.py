"""Benchmarks: the SASA op and layer against convolution, FlexAttention and the reference.

    python -m sasa_triton.bench [--quick] [--dtype bf16] [--batch 32] [--kernel-sizes 3 5 7 9 11]
                                [--providers ...] [--models/--no-models] [--out bench_out]

Layer benchmark: the paper's ResNet-50 bottleneck widths (56x56x64, 28x28x128, 14x14x256,
7x7x512, 8 heads) for each window size k, forward and forward+backward, of every provider:

    sasa        the fused Triton op alone (q, k, v views of a channels_last qkv tensor)
    sasa_layer  SelfAttention2d: fused 1x1 qkv projection + the op
    conv3x3     nn.Conv2d(C, C, 3), the layer SASA replaces (cudnn.benchmark, channels_last)
    conv_kxk    nn.Conv2d(C, C, k)
    dwconv_kxk  depthwise nn.Conv2d(C, C, k, groups=C)
    reference   the PyTorch reference op (sasa_triton.reference)
    flex        the op in torch FlexAttention (torch.compile'd; CUDA only)

Model benchmark: training and inference images/s of SASA-ResNet-26/50 (conv and attention
stems) and the conv ResNet-26/50 at the same batch, dtype (autocast) and layout.

Each row: median time with p20/p80 (triton.testing.do_bench on CUDA, a wall-clock timer on
CPU), images/s, useful TFLOP/s (multiply-add = 2; forward+backward counts 3x the forward),
GB/s of the minimal traffic and its fraction of the copy bandwidth measured in the same run,
peak memory (CUDA). Writes results.csv, PNG plots and a text table under --out.

Without CUDA the same harness runs on the CPU (reference path against CPU convolutions) at a
small batch and few shapes, clearly labelled: those are not the GPU numbers.
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
# (model builder, stem) pairs; the builder names are functions of sasa_triton.models.
MODELS = (("resnet26", "conv"), ("sasa_resnet26", "conv"), ("sasa_resnet26", "attention"),
          ("resnet50", "conv"), ("sasa_resnet50", "conv"), ("sasa_resnet50", "attention"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

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
    """Median and p20/p80 of a callable: do_bench on CUDA, wall clock on CPU."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick

    def __call__(self, fn, grad_to_none=None, min_reps=3, rep_ms=None):
        if self.device.type == "cuda":
            import triton.testing
            warmup, rep = (10, 40) if self.quick else (25, 200)
            rep = rep_ms or rep
            med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                    quantiles=[0.5, 0.2, 0.8])
            return med, p20, p80
        budget = 0.15 if self.quick else 0.5
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
    """The memory roof: GB/s (read + write) of a large device-to-device fp32 copy."""
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
    n = 8192 if device.type == "cuda" else (512 if timer.quick else 1024)
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


# ----------------------------------------------------------------------------------------------
# Layer benchmark
# ----------------------------------------------------------------------------------------------

def provider_skip_reason(provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run on `device` (one row with this note replaces its rows), or None."""
    if provider == "sasa" and device.type != "cuda":
        return "the Triton kernel needs CUDA (its CPU interpreter is not a benchmark); see sasa_layer/reference"
    if provider == "flex":
        from ._bench_flex import flex_available
        if not flex_available():
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
        if device.type != "cuda":
            return "FlexAttention is benchmarked compiled on CUDA only (tests check it against the reference on CPU)"
    return None


def _grad_fn(fn, inputs):
    """fn() -> y; returns a callable running forward + backward to `inputs` with a fixed dy."""
    y = fn()
    dy = torch.randn_like(y)

    def run():
        out = fn()
        torch.autograd.grad(out, inputs, dy)
    return run


def _make_layer_case(provider, B, H, C, k, dtype, device, backend):
    """(fwd callable, inputs needing grads, backend label, note) for one provider and shape."""
    D = C // HEADS
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype)

    if provider in ("sasa", "reference", "flex"):
        # q, k, v as views of a channels_last (B, H, W, 3, heads, D) qkv tensor, as the layer sees them.
        qkv = randn(B, H, H, 3, HEADS, D, std=D ** -0.25).requires_grad_()
        rel_rows = randn(k, D // 2, std=D ** -0.5).requires_grad_()
        rel_cols = randn(k, D - D // 2, std=D ** -0.5).requires_grad_()
        inputs = [qkv, rel_rows, rel_cols]
        if provider == "sasa":
            from .ops.local_attention import local_attention2d

            def fwd():
                q, kk, v = qkv.unbind(3)
                return local_attention2d(q, kk, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
            return fwd, inputs, "triton", ""
        if provider == "reference":
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
    if provider == "sasa_layer":
        from .modules import SelfAttention2d
        layer = SelfAttention2d(C, C, kernel_size=k, heads=HEADS, backend=backend)
        label = backend
    else:
        taps = 3 if provider == "conv3x3" else k
        groups = C if provider.startswith("dw") else 1
        layer = nn.Conv2d(C, C, taps, padding=taps // 2, groups=groups, bias=False)
        label = "cudnn" if device.type == "cuda" else "aten-cpu"
    layer = layer.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return (lambda: layer(x)), [x, *layer.parameters()], label, ""


def bench_layers(args, device, dtype, timer, bandwidth_gbps, device_name) -> list[Row]:
    rows = []
    elt = torch.empty((), dtype=dtype).element_size()
    backend = "triton" if device.type == "cuda" else "reference"
    stages = [STAGES[i - 1] for i in args.stages]
    cases = []
    providers = []
    for provider in args.providers:
        reason = provider_skip_reason(provider, device)
        if reason is None:
            providers.append(provider)
        else:
            log(f"layer provider {provider} skipped: {reason}")
            rows.append(Row("layer", device_name, DTYPE_NAMES[dtype], provider, "-", "-", args.batch, 0, 0, 0, HEADS,
                            "", "", "-", note=reason))
    for name, H, C in stages:
        for provider in providers:
            for k in ([3] if provider == "conv3x3" else args.kernel_sizes):
                cases.append((name, H, C, provider, k))
    total = 2 * len(cases)
    for index, (name, H, C, provider, k) in enumerate(cases):
        # One setup (and, for flex, one torch.compile) serves both passes.
        case, failure = None, None
        for backward in (False, True):
            pass_ = "fwd+bwd" if backward else "fwd"
            row = Row("layer", device_name, DTYPE_NAMES[dtype], provider, "", name, args.batch, H, H, C, HEADS,
                      C // HEADS, k, pass_)
            log(f"[{2 * index + 1 + backward}/{total}] layer {name} k={k} {provider} {pass_} ...")
            try:
                if failure is not None:
                    raise failure
                if case is None:
                    case = _make_layer_case(provider, args.batch, H, C, k, dtype, device, backend)
                fwd, inputs, row.backend, row.note = case
                if backward:
                    fn = _grad_fn(fwd, inputs)
                else:
                    def fn(fwd=fwd):
                        with torch.no_grad():
                            return fwd()
                row.ms_median, row.ms_p20, row.ms_p80 = timer(fn)
                row.peak_mem_mb = timer.peak_memory_mb(fn)
            except Exception as e:  # a provider failing (OOM, compile error) must not end the run
                if case is None:
                    failure = e  # the setup failed: the other pass would fail the same way
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                row.ms_median = row.ms_p20 = row.ms_p80 = row.peak_mem_mb = None
                rows.append(row)
                log(f"    {row.note}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            flops, nbytes = cost(provider, args.batch, H, H, C, k, elt, backward)
            seconds = row.ms_median * 1e-3
            row.images_per_s = args.batch / seconds
            row.gflop = flops / 1e9
            row.tflops = flops / seconds / 1e12
            row.mbytes = nbytes / 1e6
            row.gbps = nbytes / seconds / 1e9
            row.roofline_frac = row.gbps / bandwidth_gbps
            rows.append(row)
            log(f"    {row.ms_median:.3f} ms  {row.images_per_s:.0f} img/s  {row.tflops:.3g} TFLOP/s  "
                f"{row.gbps:.3g} GB/s")
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# Model benchmark
# ----------------------------------------------------------------------------------------------

def bench_models(args, device, dtype, timer, device_name) -> list[Row]:
    rows = []
    try:
        from . import models
    except ImportError as e:
        log(f"model benchmark skipped: sasa_triton.models is not available ({e})")
        return [Row("model", device_name, DTYPE_NAMES[dtype], "-", "", "-", args.batch, args.image_size,
                    args.image_size, 3, "", "", "", "-", note=f"sasa_triton.models not available: {e}")]
    backend = "triton" if device.type == "cuda" else "reference"
    wanted = [(n, s) for n, s in MODELS if any(n.endswith(f"resnet{d}") for d in args.model_depths)]
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    S = args.image_size
    cases = [(n, s, p) for n, s in wanted for p in ("inference", "training")]
    for index, (name, stem, pass_) in enumerate(cases, 1):
        provider = name if name.startswith("resnet") else f"{name}({stem} stem)"
        row = Row("model", device_name, DTYPE_NAMES[dtype] + ("-autocast" if dtype != torch.float32 else ""),
                  provider, backend if name.startswith("sasa") else ("cudnn" if device.type == "cuda" else "aten-cpu"),
                  f"{S}x{S}", args.batch, S, S, 3, "", "", 7 if name.startswith("sasa") else "", pass_)
        log(f"[{index}/{len(cases)}] model {provider} {pass_} ...")
        try:
            builder = getattr(models, name)
            kwargs = dict(stem=stem, backend=backend) if name.startswith("sasa") else {}
            model = builder(**kwargs).to(device=device, memory_format=torch.channels_last)
            x = torch.randn(args.batch, 3, S, S, device=device).contiguous(memory_format=torch.channels_last)
            target = torch.randint(0, 1000, (args.batch,), device=device)
            if pass_ == "inference":
                model.eval()

                def fn():
                    with torch.no_grad(), autocast:
                        return model(x)
            else:
                model.train()
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

                def fn():
                    opt.zero_grad(set_to_none=True)
                    with autocast:
                        loss = F.cross_entropy(model(x), target)
                    loss.backward()
                    opt.step()
            # Model steps take tens of ms: a longer do_bench budget gives the quantiles enough samples.
            row.ms_median, row.ms_p20, row.ms_p80 = timer(fn, min_reps=2 if args.quick else 3,
                                                          rep_ms=300 if args.quick else 1500)
            row.peak_mem_mb = timer.peak_memory_mb(fn)
            flops = models.count_flops(model, (args.batch, 3, S, S)) * (3 if pass_ == "training" else 1)
        except ImportError as e:
            row.note = f"skipped: {e}"
            rows.append(row)
            log(f"    {row.note}")
            continue
        except Exception as e:
            row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
            log(f"    {row.note}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        seconds = row.ms_median * 1e-3
        row.images_per_s = args.batch / seconds
        row.gflop = flops / 1e9
        row.tflops = flops / seconds / 1e12
        rows.append(row)
        log(f"    {row.ms_median:.1f} ms  {row.images_per_s:.1f} img/s")
    return rows


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

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sasa_triton.bench",
        description="SASA op/layer vs convolution (layer benchmark) and SASA-ResNets vs ResNets (model benchmark). "
                    "Without CUDA runs a small CPU version of the same harness (reference path).")
    p.add_argument("--dtype", default=None, choices=tuple(DTYPES),
                   help="element type (default: bf16 on CUDA, fp32 on CPU); models use autocast for half types")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 on CUDA, 2 on CPU, 1 with --quick on CPU)")
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                   help="window sizes k (default: 3 5 7 9 11 on CUDA; fewer on CPU or with --quick)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS, metavar="PROVIDER",
                   help=f"layer providers (default: all of {', '.join(PROVIDERS)})")
    p.add_argument("--stages", type=int, nargs="+", default=None, choices=(1, 2, 3, 4),
                   help="ResNet-50 stages to benchmark, 1 = 56x56x64 ... 4 = 7x7x512 (default: all; 3 4 on CPU with --quick)")
    p.add_argument("--models", dest="models", action="store_true", default=True, help="run the model benchmark (default)")
    p.add_argument("--no-models", dest="models", action="store_false", help="skip the model benchmark")
    p.add_argument("--model-depths", type=int, nargs="+", default=None, choices=(26, 50),
                   help="ResNet depths of the model benchmark (default: 26 50; 26 on CPU)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model input resolution, a multiple of 32 (default: 224 on CUDA, 64 on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--out", default="bench_out", help="output folder for results.csv, table.txt and the PNGs")
    p.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (smoke run, < 1 min on CPU)")
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


def _resolve_defaults(args, device) -> None:
    cuda = device.type == "cuda"
    if args.dtype is None:
        args.dtype = "bf16" if cuda else "fp32"
    if args.batch is None:
        args.batch = 32 if cuda else (1 if args.quick else 2)
    if args.kernel_sizes is None:
        args.kernel_sizes = ([3, 7, 11] if args.quick else [3, 5, 7, 9, 11]) if cuda else \
                            ([3, 7] if args.quick else [3, 5, 7])
    if args.stages is None:
        args.stages = [1, 2, 3, 4] if (cuda or not args.quick) else [3, 4]
    if args.model_depths is None:
        args.model_depths = [26, 50] if cuda else [26]
    if args.image_size is None:
        args.image_size = 224 if cuda else 64
    if args.threads is None and not cuda:
        args.threads = 1


def main(argv=None) -> int:
    args = parse_args(argv)
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
        return _run(args, device, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, argv) -> int:
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(args.out, exist_ok=True)
    env = environment(device)
    device_name = env["card"] if device.type == "cuda" else "cpu"
    label = env["card"] if device.type == "cuda" else f"{CPU_LABEL}; {env['card']}"
    command = "python -m sasa_triton.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"sasa_triton.bench on {label}")
    timer = Timer(device, args.quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roofs = [measure_bandwidth(device, timer, device_name), measure_matmul(device, dtype, timer, device_name)]
        bandwidth, matmul = roofs[0].gbps, roofs[1].tflops
        log(f"copy bandwidth {bandwidth:.1f} GB/s, {roofs[1].dtype} matmul {matmul:.3g} TFLOP/s")
        rows = roofs + bench_layers(args, device, dtype, timer, bandwidth, device_name)
        if args.models:
            rows += bench_models(args, device, dtype, timer, device_name)

    header = "\n".join([
        f"SASA benchmark — {label}",
        f"date {env['date']}  commit {env['commit']}  torch {env['torch']}  triton {env['triton']}",
        f"command: {command.strip()}",
        f"dtype {args.dtype}, batch {args.batch}, heads {HEADS}; copy bandwidth {bandwidth:.1f} GB/s "
        f"(roofline = GB/s / this), {roofs[1].dtype} matmul {matmul:.3g} TFLOP/s",
        "times in ms: median (p20, p80); TFLOP/s useful (multiply-add = 2, fwd+bwd = 3x fwd); "
        "GB/s of the minimal traffic",
    ])
    table = format_table(rows, header)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
