"""Static kernel report: compile every kernel for a GPU architecture (no GPU needed) and show
its resource use next to the roofline that bounds it.

    python -m sasa_triton.inspect --arch sm_90 [--dtype bf16 fp16] [--kernel-sizes 3 5 7 9 11]
                                  [--head-dims 8 16 32 64] [--configs default|tuned|candidates]
                                  [--tuned-file FILE.json]
                                  [--config KERNEL=JSON ...]
                                  [--bandwidth 3.0] [--peak-tflops 790] [--json [PATH]]
    python -m sasa_triton.inspect --write-instruction-baseline [PATH]

Per kernel and config: registers per thread, spill stores/loads (bytes), shared memory, whether
the SASS has tensor-core instructions (HGMMA: Hopper wgmma, HMMA: mma.sync), and the FLOPs and
bytes per pixel and head that define its roofline, with the predicted time for a shape:

    t_mem     = minimal bytes / bandwidth          (the floor: q, k, v, y ... moved once)
    t_mma     = tensor-core FLOPs executed / peak  (the dots cover the whole haloed tile, so they
                                                    execute more than the useful FLOPs)
    t_roof    = max(t_mem, t_mma)

and an instruction-count proxy (the forward kernel is bound by instruction issue, so its time
tracks it): warp-instructions executed per (pixel, head),

    num_warps * (outside + trips * body) / (BLOCK_H * BLOCK_W)

with body the static SASS instructions of the kernel's main loop (the key-row walk), outside
those of the rest of the kernel, and trips the loop's trip count from the launch meta
(BLOCK_H + 2 * dilation * (k // 2) key rows, or query rows for dk/dv). Static counts: branches
in the loop body count as taken. `local_instruction_report()` gives it for explicit configs;
tests/instruction_baseline.json holds today's values (tests/test_inspect.py fails when one grows
by more than 2%); after a kernel improves, rewrite it with --write-instruction-baseline.

Static compilation needs compiled (not interpreted) @triton.jit functions: under
TRITON_INTERPRET=1 this command re-runs itself in a subprocess without it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LOCAL_KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")
# ResNet-50 stage per head dim at 8 heads (D = width / 8): (H = W) of the stage, for the default shape.
PAPER_STAGE = {8: 56, 16: 28, 32: 14, 64: 7}
STEM_SHAPE = (32, 224, 224, 4, 16)  # the attention stem: 3 -> 64 channels, 4 heads of 16, at 224 x 224
STEM_BLOCK, STEM_MIXTURES = 4, 4
STEM_WINDOWS = ("block", "sliding")  # the paper's non-overlapping blocks, and the sliding variant
FIELDS = ("kernel", "arch", "dtype", "kernel_size", "head_dim", "source", "config", "registers", "spill_stores",
          "spill_loads", "stack_frame", "shared_mem", "HGMMA", "HMMA", "flops_per_pixel", "bytes_per_pixel",
          "intensity", "mma_flops_per_pixel", "shape", "t_mem_us", "t_mma_us", "t_roofline_us",
          "sass_instructions", "sass_loop_body", "sass_outside", "sass_loops", "loop_trips", "ttgir_loop_trips",
          "warp_instructions_per_pixel_head", "error")
INSTRUCTION_BASELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                                    "instruction_baseline.json")
BASELINE_KERNEL_SIZE, BASELINE_DTYPE = 7, "bf16"  # the ResNet-50 stages (PAPER_STAGE) at batch 32, 8 heads


def parse_arch(text: str) -> int:
    match = re.fullmatch(r"(?:sm_?)?(\d{2,3})a?", str(text).strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"--arch must look like sm_90 (or 90, sm_80, sm_100), got {text!r}")
    return int(match.group(1))


def parse_shape(text: str) -> tuple:
    parts = re.split(r"[x,]", text.lower())
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape must be BxHxWxHEADS, e.g. 32x56x56x8; got {text!r}")
    return tuple(int(p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Roofline model per kernel (per pixel and head; multiply-add = 2 FLOPs)
# ----------------------------------------------------------------------------------------------

def local_cost(kernel: str, kernel_size: int, head_dim: int, elt: int, config: dict) -> dict:
    """Useful FLOPs, minimal bytes and executed tensor-core FLOPs per pixel and head.

    local_fwd: q.k and p.v over the k*k window (2 * 2k^2 D) + the 2k relative dots of D/2 (2kD);
      reads q, k, v, writes y (4 D elements) and one fp32 log-sum-exp.
    local_bwd_dq: recomputes q.k and q.rel, dp = dy.v, dq = ds.k (+ its rel part and the table
      gradient): 6k^2 D + 6kD; reads q, k, v, y, dy and the lse, writes dq and delta.
    local_bwd_dkdv: recomputes q.k and q.rel, dv = p^T dy, dp = v.dy, dk = ds^T q: 8k^2 D + 2kD;
      reads q, k, v, dy, lse, delta, writes dk, dv.
    Executed MMA FLOPs: a program's dots pair each of its queries with every key of the haloed
    strip, (BLOCK_H + 2r) rows (rounded up to a multiple of STEP_ROWS, the rows per step) of HALO_W
    (BLOCK_W + 2r padded to a power of two) columns, in
    BLOCK_D-wide (D padded) products: 2 dots (fwd), 3 (dq) or 4 (dk/dv) of 2 * pairs * BLOCK_D.
    """
    from .ops.local_attention import channel_tile, computed_keys

    k, D = kernel_size, head_dim
    d_pad = channel_tile(D)
    # (query, key) pairs each query's dots cover
    keys_per_query = computed_keys({"BLOCK_H": config.get("BLOCK_H", 1), "BLOCK_W": config.get("BLOCK_W", 1),
                                    "STEP_ROWS": config.get("STEP_ROWS", 1)}, k, 1)
    if kernel == "local_fwd":
        flops, dots = 4 * k * k * D + 2 * k * D, 2
        nbytes = 4 * D * elt + 4
    elif kernel == "local_bwd_dq":
        flops, dots = 6 * k * k * D + 6 * k * D, 3
        nbytes = 6 * D * elt + 8
    else:
        flops, dots = 8 * k * k * D + 2 * k * D, 4
        nbytes = 6 * D * elt + 8
    return {"flops_per_pixel": flops, "bytes_per_pixel": nbytes, "mma_flops_per_pixel": 2 * dots * keys_per_query * d_pad}


def local_loop_trips(kernel: str, meta: dict) -> int:
    """Trip count of a local kernel's main loop, from its launch meta-parameters: the fwd and dq
    kernels walk the BLOCK_H + 2r haloed key rows, dk/dv as many haloed query rows
    (r = dilation * (k // 2)), STEP_ROWS rows a step (1 when the meta has none).
    tests/test_inspect.py checks it against the trip count of the compiled loop (TTGIR)."""
    if kernel not in LOCAL_KERNELS:
        raise ValueError(f"kernel must be one of {LOCAL_KERNELS}, got {kernel!r}")
    halo_rows = meta["BLOCK_H"] + 2 * meta["DILATION"] * (meta["KSIZE"] // 2)
    return -(-halo_rows // meta.get("STEP_ROWS", 1))


def stem_cost(kernel: str, block_size: int, mixtures: int, head_dim: int, elt: int) -> dict:
    """The attention stem (bs x bs keys, M value maps), per pixel and head.

    Block window: a key's mixing weight depends on the key only, so its M value rows are mixed
    once (2 M D) and p @ vmix is one dot: fwd 2 bs^2 D (q.k) + 2 bs^2 D (p.v) + 2 M D. Sliding
    window: the weight depends on the (query, key) pair: fwd 2 bs^2 D + 2 bs^2 M D. The backward
    kernels recompute q.k and add dp and dq (dq kernel), or dp, dk and the value gradients
    (dk/dv kernel). Bytes: q, k, the M value maps, y (fwd); + y, dy, dq (dq); + dy, dk, dV_m (dk/dv);
    fp32 lse/delta.
    """
    bs2, D, M = block_size * block_size, head_dim, mixtures
    sliding = "_sliding_" in kernel
    if kernel.endswith("_fwd"):
        flops = 2 * bs2 * D + (2 * bs2 * M * D if sliding else 2 * bs2 * D + 2 * M * D)
        nbytes = (3 + M) * D * elt + 4
    elif kernel.endswith("_dq"):
        flops = 4 * bs2 * D + (2 * bs2 * M * D if sliding else 2 * bs2 * D + 2 * M * D)
        nbytes = (5 + M) * D * elt + 8
    else:
        flops = 4 * bs2 * D + (4 * bs2 * M * D if sliding else 4 * bs2 * D + 4 * M * D)
        nbytes = (4 + 2 * M) * D * elt + 8
    return {"flops_per_pixel": flops, "bytes_per_pixel": nbytes, "mma_flops_per_pixel": None}


def add_roofline(record: dict, shape: tuple, bandwidth_tbps: float, peak_tflops: float) -> dict:
    B, H, W, heads = shape[:4]
    units = B * H * W * heads  # (pixel, head) pairs
    record["shape"] = "x".join(str(s) for s in shape)
    record["intensity"] = record["flops_per_pixel"] / record["bytes_per_pixel"]
    record["t_mem_us"] = units * record["bytes_per_pixel"] / (bandwidth_tbps * 1e12) * 1e6
    mma = record.get("mma_flops_per_pixel") or record["flops_per_pixel"]
    record["t_mma_us"] = units * mma / (peak_tflops * 1e12) * 1e6
    record["t_roofline_us"] = max(record["t_mem_us"], record["t_mma_us"])
    return record


# ----------------------------------------------------------------------------------------------
# Which kernels and configs
# ----------------------------------------------------------------------------------------------

TUNED_KEY = re.compile(r"^(?P<kernel>[a-z_]+)/k(?P<k>\d+)/d(?P<d>\d+)/D(?P<D>\d+)/(?P<dtype>\w+)/H(?P<H>\d+)/W(?P<W>\d+)$")


def read_tuned_files(paths) -> tuple[dict, list[str]]:
    """{(kernel, k, D, dtype): [(source, config)]} from tuned-config JSON files (the format of
    sasa_triton/configs/README.md), whatever GPU they were tuned on, and a note per file."""
    table, notes = {}, []
    for path in paths or ():
        with open(path) as f:
            data = json.load(f)
        configs = data.get("configs") if isinstance(data, dict) else None
        if not isinstance(configs, dict):
            raise SystemExit(f"--tuned-file {path}: not a sasa_triton tuned-config file (no 'configs')")
        notes.append(f"tuned configs from {path}: tuned on {data.get('gpu')!r} with Triton {data.get('triton')}")
        for key, entry in configs.items():
            match = TUNED_KEY.match(key)
            if not match or int(match["d"]) != 1:
                continue
            config = {k: v for k, v in entry.items() if k in ("num_warps", "num_stages") or k.isupper()}
            source = f"tuned H{match['H']}/W{match['W']}"
            table.setdefault((match["kernel"], int(match["k"]), int(match["D"]), match["dtype"]), []).append(
                (source, config))
    return table, notes


def _configs_for(kernel, mode, kernel_size, head_dim, dtype, H, W, tuned_table=None, explicit=None):
    """[(source, config)] for one kernel: the default, plus tuned or candidate configs, plus the
    explicit ones ({kernel: [config]}, from --config)."""
    from . import tuning
    default = tuning.default_config(kernel, kernel_size, 1, head_dim, dtype)
    out = [("default", default)]
    if mode == "tuned":
        tuned = tuning.get_config(kernel, kernel_size, 1, head_dim, dtype, H, W)  # no run: cache/file only
        if tuned != default:
            out.append(("tuned", tuned))
    elif mode == "candidates":
        candidates = getattr(tuning, "candidate_configs", None)
        if candidates is None:
            raise RuntimeError("this sasa_triton.tuning has no candidate_configs()")
        out += [("candidate", c) for c in candidates(kernel, kernel_size, 1, head_dim, dtype, H, W) if c != default]
    extra = (tuned_table or {}).get((kernel, kernel_size, head_dim, DTYPE_NAMES[dtype]), [])
    extra += [("explicit", config) for config in (explicit or {}).get(kernel, [])]
    for source, config in extra:
        if all(config != c for _, c in out):
            out.append((source, config))
    return out


def local_jobs(args) -> list[dict]:
    jobs = []
    for dtype_name in args.dtype:
        for k in args.kernel_sizes:
            for D in args.head_dims:
                shape = args.shape or (32, PAPER_STAGE.get(D, 56), PAPER_STAGE.get(D, 56), 8)
                for kernel in LOCAL_KERNELS:
                    for source, config in _configs_for(kernel, args.configs, k, D, DTYPES[dtype_name], shape[1],
                                                       shape[2], args.tuned_table, args.explicit):
                        jobs.append(dict(family="local", kernel=kernel, dtype=dtype_name, kernel_size=k, head_dim=D,
                                         shape=(*shape, D), source=source, config=config))
    return jobs


def stem_jobs(args) -> tuple[list[dict], str | None]:
    """Jobs for the attention stem's kernels, or ([], why not)."""
    try:
        from .ops import spatial_attention
    except ImportError as e:
        return [], f"stem kernels not covered: sasa_triton.ops.spatial_attention is not available ({e})"
    if not hasattr(spatial_attention, "static_specs"):
        return [], "stem kernels not covered: sasa_triton.ops.spatial_attention has no static_specs()"
    jobs = []
    for dtype_name in args.dtype:
        for window in STEM_WINDOWS:
            try:
                specs = spatial_attention.static_specs(shape=STEM_SHAPE, dtype=DTYPES[dtype_name],
                                                       block_size=STEM_BLOCK, mixtures=STEM_MIXTURES, window=window)
            except Exception as e:  # keep the local-attention report when the stem's specs break
                return [], f"stem kernels not covered: static_specs failed: {type(e).__name__}: {e}"
            for index, spec in enumerate(specs):
                job = dict(family="stem", kernel=spec.name, dtype=dtype_name, kernel_size=STEM_BLOCK,
                           head_dim=STEM_SHAPE[-1], shape=STEM_SHAPE, source="default", config=spec.config(),
                           window=window, index=index, override=None)
                jobs.append(job)
                tuned = (args.tuned_table or {}).get((spec.name, STEM_BLOCK, STEM_SHAPE[-1], dtype_name), [])
                for source, config in tuned:
                    jobs.append(dict(job, source=source, config=config, override=config))
    return jobs, None


def _spec(job):
    dtype = DTYPES[job["dtype"]]
    if job["family"] == "local":
        from .ops.local_attention import static_specs
        specs = static_specs(shape=job["shape"], dtype=dtype, kernel_size=job["kernel_size"],
                             configs={job["kernel"]: job["config"]})
        return next(s for s in specs if s.name == job["kernel"])
    from .ops import spatial_attention
    configs = {job["kernel"]: job["override"]} if job.get("override") else None
    return spatial_attention.static_specs(shape=job["shape"], dtype=dtype, block_size=STEM_BLOCK,
                                          mixtures=STEM_MIXTURES, window=job["window"],
                                          configs=configs)[job["index"]]


def run_job(job: dict, arch: int, bandwidth_tbps: float, peak_tflops: float) -> dict:
    """Compile one kernel at one config for sm_<arch>; the report plus its roofline numbers."""
    from ._compile import instructions_per_pixel_head, static_report
    elt = torch.empty((), dtype=DTYPES[job["dtype"]]).element_size()
    record = {"kernel": job["kernel"], "arch": f"sm_{arch}", "dtype": job["dtype"], "kernel_size": job["kernel_size"],
              "head_dim": job["head_dim"], "source": job["source"], "config": dict(job["config"]), "error": None}
    try:
        spec = _spec(job)
        report = static_report(spec, arch)
        for key in ("registers", "spill_stores", "spill_loads", "stack_frame", "shared_mem", "HGMMA", "HMMA",
                    "sass_instructions", "sass_loop_body", "sass_outside", "sass_loops", "ttgir_loop_trips"):
            record[key] = report.get(key)
        if job["family"] == "local" and report.get("sass_loop_body") is not None:
            record["loop_trips"] = local_loop_trips(job["kernel"], spec.constexprs)
            record["warp_instructions_per_pixel_head"] = instructions_per_pixel_head(report, record["loop_trips"])
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
    if job["family"] == "local":
        record.update(local_cost(job["kernel"], job["kernel_size"], job["head_dim"], elt, job["config"]))
    else:
        record.update(stem_cost(job["kernel"], STEM_BLOCK, STEM_MIXTURES, job["head_dim"], elt))
    return add_roofline(record, job["shape"], bandwidth_tbps, peak_tflops)


def _run_job_star(payload):
    return run_job(*payload)


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _config_text(config: dict) -> str:
    parts, shown = [], {"num_warps", "num_stages"}
    if "BLOCK_H" in config:
        parts.append(f"{config['BLOCK_H']}x{config.get('BLOCK_W', '?')}")
        shown |= {"BLOCK_H", "BLOCK_W"}
    elif "BLOCK_M" in config:
        parts.append(f"M{config['BLOCK_M']}/N{config.get('BLOCK_N', '?')}")
        shown |= {"BLOCK_M", "BLOCK_N"}
    parts += [f"{k}={v}" for k, v in config.items() if k not in shown]
    parts.append(f"w{config.get('num_warps', '?')} s{config.get('num_stages', '?')}")
    return " ".join(parts)


def format_table(records: list[dict], header: str) -> str:
    columns = ("dtype", "k", "D", "kernel", "source", "config", "regs", "spill st/ld", "smem", "HGMMA", "HMMA",
               "SASS out+loop x trips", "warp-instr/px", "FLOP/px", "B/px", "FLOP/B", "MMA use", "shape", "t_mem us",
               "t_roof us")
    table = [list(columns)]
    for r in records:
        if r.get("error"):
            table.append([r["dtype"], str(r["kernel_size"]), str(r["head_dim"]), r["kernel"], r["source"],
                          _config_text(r["config"]), "ERROR: " + r["error"]] + [""] * (len(columns) - 7))
            continue
        use = (f"{r['flops_per_pixel'] / r['mma_flops_per_pixel']:.0%}" if r.get("mma_flops_per_pixel") else "-")
        sass = "-" if r.get("sass_loop_body") is None else (
            f"{r['sass_outside']}+{r['sass_loop_body']}x{r['loop_trips'] if r.get('loop_trips') is not None else '?'}")
        per_pixel = r.get("warp_instructions_per_pixel_head")
        table.append([
            r["dtype"], str(r["kernel_size"]), str(r["head_dim"]), r["kernel"], r["source"], _config_text(r["config"]),
            str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared_mem"]),
            "yes" if r.get("HGMMA") else ("no" if r.get("HGMMA") == 0 else "?"),
            "yes" if r.get("HMMA") else ("no" if r.get("HMMA") == 0 else "?"),
            sass, "-" if per_pixel is None else f"{per_pixel:.1f}", str(r["flops_per_pixel"]),
            str(r["bytes_per_pixel"]), f"{r['intensity']:.1f}", use, r["shape"],
            f"{r['t_mem_us']:.1f}", f"{r['t_roofline_us']:.1f}",
        ])
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(columns))]
    lines = [header, ""]
    for i, row in enumerate(table):
        if row[6].startswith("ERROR"):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:6], widths)) + "  " + row[6])
        else:
            lines.append("  ".join(c.rjust(w) if j >= 6 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(records: list[dict]) -> list[str]:
    """Predicted forward and backward floors per op, (dtype, k, D) and shape, default configs."""
    lines = []
    groups = {}
    for r in records:
        if r["source"] != "default" or r.get("error"):
            continue
        op, _, part = r["kernel"].partition("_bwd_") if "_bwd_" in r["kernel"] else r["kernel"].rpartition("_")
        part = "fwd" if part == "fwd" else f"bwd_{part}"
        groups.setdefault((op, r["dtype"], r["kernel_size"], r["head_dim"], r["shape"]), {})[part] = r
    for (op, dtype, k, D, shape), parts in groups.items():
        if set(parts) != {"fwd", "bwd_dq", "bwd_dkdv"}:
            continue
        size = "k" if op == "local" else "block"
        bwd = parts["bwd_dq"]["t_roofline_us"] + parts["bwd_dkdv"]["t_roofline_us"]
        lines.append(f"  {op} {dtype} {size}={k} D={D} shape {shape}: forward >= "
                     f"{parts['fwd']['t_roofline_us']:.1f} us, backward >= {bwd:.1f} us")
    return lines


# ----------------------------------------------------------------------------------------------
# Instruction-count proxy: explicit configs, and the baseline the tests hold the kernels to
# ----------------------------------------------------------------------------------------------

def check_local_config(kernel, config) -> dict:
    """A local kernel's launch config: tile sizes in upper case, num_warps and num_stages, all
    positive ints (which tile fields a kernel needs is its launcher's business)."""
    if kernel not in LOCAL_KERNELS:
        raise ValueError(f"configs: kernel must be one of {LOCAL_KERNELS}, got {kernel!r}")
    if (not isinstance(config, dict) or not {"num_warps", "num_stages", "BLOCK_H", "BLOCK_W"} <= set(config)
            or not all((k.isupper() or k in ("num_warps", "num_stages")) and isinstance(v, int)
                       and not isinstance(v, bool) and v > 0 for k, v in config.items())):
        raise ValueError(f"configs[{kernel!r}] must map BLOCK_H, BLOCK_W, num_warps, num_stages (and any other "
                         f"upper-case tile fields) to positive ints, got {config!r}")
    return dict(config)


def _kernels_are_interpreted() -> bool:
    from .ops.local_attention import _local_attn_fwd_kernel
    return not hasattr(_local_attn_fwd_kernel, "arg_names") or \
        type(_local_attn_fwd_kernel).__name__ == "InterpretedFunction"


def _clean_env() -> dict:
    """This environment without TRITON_INTERPRET, with this package importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    return env


def local_instruction_report(shape, dtype=torch.bfloat16, kernel_size=7, configs=None, arch=90) -> list[dict]:
    """The three local kernels compiled for sm_<arch> (no GPU needed) as a launch on contiguous
    tensors of `shape` (B, H, W, heads, D) would compile them: one record per kernel (the fields
    of `python -m sasa_triton.inspect --json`), with warp_instructions_per_pixel_head, the SASS
    counts (sass_outside, sass_loop_body, loop_trips), registers and spills.

    configs: {kernel: {"BLOCK_H", "BLOCK_W", "num_warps", "num_stages"}} for any of local_fwd,
    local_bwd_dq, local_bwd_dkdv; the others get tuning.default_config. Compiles in a subprocess
    when this process imported triton under TRITON_INTERPRET=1.

        >>> for r in local_instruction_report((32, 56, 56, 8, 8), torch.bfloat16, 7,
        ...                                   {"local_fwd": dict(BLOCK_H=2, BLOCK_W=16, num_warps=1, num_stages=1)}):
        ...     print(r["kernel"], r["config"], r["warp_instructions_per_pixel_head"])
    """
    from . import tuning

    if (not isinstance(shape, (tuple, list)) or len(shape) != 5
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"shape must be 5 positive ints (B, H, W, heads, D), got {shape!r}")
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {sorted(DTYPES)} as torch dtypes, got {dtype!r}")
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    configs = {kernel: check_local_config(kernel, config) for kernel, config in (configs or {}).items()}
    if _kernels_are_interpreted():
        request = json.dumps({"shape": list(shape), "dtype": DTYPE_NAMES[dtype], "k": kernel_size,
                              "configs": configs, "arch": arch})
        code = ("import json, sys; from sasa_triton import inspect as i; a = json.loads(sys.argv[1]); "
                "print(json.dumps(i.local_instruction_report(tuple(a['shape']), i.DTYPES[a['dtype']], a['k'], "
                "a['configs'], a['arch'])))")
        proc = subprocess.run([sys.executable, "-c", code, request], env=_clean_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compilation subprocess failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    records = []
    for kernel in LOCAL_KERNELS:
        config = configs.get(kernel) or tuning.default_config(kernel, kernel_size, 1, shape[-1], dtype)
        job = dict(family="local", kernel=kernel, dtype=DTYPE_NAMES[dtype], kernel_size=kernel_size,
                   head_dim=shape[-1], shape=tuple(shape), source="explicit" if kernel in configs else "default",
                   config=config)
        record = run_job(job, arch, 3.0, 790.0)
        records.append({k: record.get(k) for k in FIELDS})
    return records


def instruction_baseline_key(record: dict) -> str:
    return f"{record['kernel']}/{record['shape']}"


def triton_minor_version() -> str:
    """The running Triton as "major.minor" (the instruction baseline's and the tests' key)."""
    from ._library import TRITON_VERSION
    return "%d.%d" % TRITON_VERSION


def write_instruction_baseline(records: list[dict], path: str) -> dict:
    """Store the default configs' warp-instructions per (pixel, head) under this Triton's
    major.minor version in the baseline file (other versions' entries are kept)."""
    import datetime
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["about"] = ("Warp-instructions executed per (pixel, head) of the local kernels at their default configs, "
                     f"{BASELINE_DTYPE}, k = {BASELINE_KERNEL_SIZE}, the ResNet-50 stages (batch 32, 8 heads), "
                     "compiled for sm_90, per Triton major.minor. tests/test_inspect.py fails when one grows by more "
                     "than 2%. Rewrite after a kernel improves: python -m sasa_triton.inspect "
                     "--write-instruction-baseline, run by the Python of each Triton listed (e.g. a venv with "
                     "--system-site-packages and pip install triton==3.6.0; the entry of another Triton is kept)")
    values = {instruction_baseline_key(r): round(r["warp_instructions_per_pixel_head"], 2) for r in records
              if r["source"] == "default" and r["kernel"] in LOCAL_KERNELS and not r.get("error")}
    if len(values) != len(LOCAL_KERNELS) * len(PAPER_STAGE):
        raise RuntimeError(f"expected {len(LOCAL_KERNELS) * len(PAPER_STAGE)} baseline values, got {len(values)}")
    data.setdefault("triton", {})[triton_minor_version()] = {
        "date": datetime.date.today().isoformat(), "warp_instructions_per_pixel_head": dict(sorted(values.items()))}
    data["triton"] = dict(sorted(data["triton"].items()))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_config(text: str) -> tuple[str, dict]:
    kernel, sep, body = text.partition("=")
    try:
        config = json.loads(body) if sep else None
        return kernel, check_local_config(kernel, config)
    except (ValueError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(
            f"--config must be KERNEL=JSON, e.g. 'local_fwd={{\"BLOCK_H\": 2, \"BLOCK_W\": 16, \"num_warps\": 1, "
            f"\"num_stages\": 1}}'; got {text!r} ({e})")

def parse_args(argv=None, prog=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog or "python -m sasa_triton.inspect",
        description="Compile every SASA kernel for a GPU architecture (no GPU needed) and report registers, "
                    "spills, shared memory, tensor-core instructions and the roofline of each.")
    p.add_argument("--arch", type=parse_arch, default=90, help="target architecture, e.g. sm_90 (default), sm_80")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES), help="element types (default bf16)")
    p.add_argument("--kernel-sizes", type=int, nargs="+", default=[3, 5, 7, 9, 11], help="window sizes k")
    p.add_argument("--head-dims", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="head dims D (default: the paper's ResNet-50 stages at 8 heads)")
    p.add_argument("--shape", type=parse_shape, default=None,
                   help="BxHxWxHEADS for the predicted times (default: 32 x the ResNet-50 stage of each D x 8 heads)")
    p.add_argument("--configs", choices=("default", "tuned", "candidates"), default="default",
                   help="default configs only; plus tuned ones (autotune cache / tuned files); or every "
                        "autotuning candidate that survives pruning")
    p.add_argument("--tuned-file", nargs="+", default=None, metavar="JSON",
                   help="also compile the configs of these tuned-config files (python -m sasa_triton.autotune "
                        "output), whatever GPU they were tuned on")
    p.add_argument("--config", type=parse_config, action="append", default=[], metavar="KERNEL=JSON",
                   help="also compile a local kernel at this config, e.g. "
                        "'local_fwd={\"BLOCK_H\": 2, \"BLOCK_W\": 16, \"num_warps\": 1, \"num_stages\": 1}' "
                        "(repeatable)")
    p.add_argument("--write-instruction-baseline", nargs="?", const=INSTRUCTION_BASELINE, default=None,
                   metavar="PATH", help="compile the local kernels at the baseline shapes (bf16, k = 7, the ResNet-50 "
                                        "stages, default configs) and store their warp-instructions per (pixel, head) "
                                        "for this Triton version in PATH (default tests/instruction_baseline.json)")
    p.add_argument("--bandwidth", type=float, default=3.0, help="memory bandwidth in TB/s (H100 SXM copy: 3.0)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="tensor-core peak in TFLOP/s (H100 bf16: 790)")
    p.add_argument("--no-stem", dest="stem", action="store_false", help="leave out the attention-stem kernels")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compilations")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the records as JSON to PATH (or stdout with no PATH, instead of the table)")
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 when a default config spills registers")
    args = p.parse_args(argv)
    if any(k < 1 or k % 2 == 0 for k in args.kernel_sizes):
        p.error("--kernel-sizes must be positive odd integers")
    if any(d < 2 for d in args.head_dims):
        p.error("--head-dims must be >= 2")
    if args.bandwidth <= 0 or args.peak_tflops <= 0:
        p.error("--bandwidth and --peak-tflops must be positive")
    args.explicit = {}
    for kernel, config in args.config:
        args.explicit.setdefault(kernel, []).append(config)
    if args.write_instruction_baseline:
        args.dtype, args.kernel_sizes, args.head_dims = [BASELINE_DTYPE], [BASELINE_KERNEL_SIZE], sorted(PAPER_STAGE)
        args.shape, args.configs, args.tuned_file, args.explicit, args.stem = None, "default", None, {}, False
    return args


def _reexec(argv) -> int:
    cmd = [sys.executable, "-m", "sasa_triton.inspect", *argv]
    return subprocess.run(cmd, env=_clean_env()).returncode


def main(argv=None, prog=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces the @triton.jit functions; compile in a clean process.
        return _reexec(argv)
    import triton

    args.tuned_table, notes = read_tuned_files(args.tuned_file)
    jobs = local_jobs(args)
    if args.stem:
        stem, why_not = stem_jobs(args)
        jobs += stem
        if why_not:
            notes.append(why_not)
    payloads = [(job, args.arch, args.bandwidth, args.peak_tflops) for job in jobs]
    print(f"compiling {len(jobs)} kernels for sm_{args.arch} ...", file=sys.stderr, flush=True)
    if args.jobs > 1 and len(jobs) > 1:
        import concurrent.futures
        import multiprocessing

        from sasa_triton import inspect as this  # pickled by its package name, also under python -m
        # fork is cheap (torch already imported); after CUDA was initialised, spawn fresh workers.
        method = "spawn" if torch.cuda.is_initialized() else "fork"
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context(method)) as pool:
            records = list(pool.map(this._run_job_star, payloads))
    else:
        records = [_run_job_star(p) for p in payloads]

    if args.write_instruction_baseline:
        errors = [r for r in records if r.get("error")]
        if errors:
            print("\n".join(f"{r['kernel']} {r['shape']}: {r['error']}" for r in errors), file=sys.stderr)
            return 1
        write_instruction_baseline(records, args.write_instruction_baseline)
        for r in records:
            print(f"{r['kernel']:15s} {r['shape']:16s} {_config_text(r['config']):14s} "
                  f"{r['warp_instructions_per_pixel_head']:8.1f} warp-instructions per (pixel, head)")
        print(f"wrote {args.write_instruction_baseline} (triton {triton.__version__})", file=sys.stderr)
        return 0
    mismatched = [r for r in records if r.get("loop_trips") is not None
                  and (r.get("ttgir_loop_trips") or r["sass_loops"]) and r["ttgir_loop_trips"] != [r["loop_trips"]]]
    for r in mismatched:
        notes.append(f"{r['kernel']} {_config_text(r['config'])}: loop trips {r['loop_trips']} from the launch meta, "
                     f"but the compiled TTGIR's outermost loops run {r['ttgir_loop_trips']}: the instruction count "
                     f"assumes the former")
    spills = [r for r in records if r["source"] == "default" and not r.get("error")
              and (r.get("spill_stores") or r.get("spill_loads"))]
    errors = [r for r in records if r.get("error")]
    if args.json is not None:
        doc = {"arch": f"sm_{args.arch}", "triton": triton.__version__, "torch": torch.__version__,
               "bandwidth_tbps": args.bandwidth, "peak_tflops": args.peak_tflops, "notes": notes,
               "records": [{k: r.get(k) for k in FIELDS} for r in records]}
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(f"wrote {args.json}", file=sys.stderr)
    if args.json != "-":
        header = (f"Static kernel report for sm_{args.arch} (triton {triton.__version__}); roofline at "
                  f"{args.bandwidth:g} TB/s and {args.peak_tflops:g} TFLOP/s. Per pixel and head: FLOP/px useful "
                  f"FLOPs, B/px minimal bytes; MMA use = useful / executed tensor-core FLOPs; times for the whole "
                  f"shape (B x H x W x heads x D). Instruction proxy: static SASS instructions outside the main "
                  f"loop + in its body x its trips; warp-instr/px = num_warps * that / tile pixels (branches "
                  f"count as taken).")
        print(format_table(records, header))
        lines = summary(records)
        if lines:
            print("\nPredicted floors (default configs):")
            print("\n".join(lines))
        for note in notes:
            print(f"\nnote: {note}")
        print(f"\n{len(records)} kernels: {len(spills)} default configs spill, {len(errors)} failed to compile")
    if errors:
        return 1
    if args.fail_on_spill and spills:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
