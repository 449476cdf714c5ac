"""Compile kernels for a GPU that is not present and read their resource use.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` builds PTX and a cubin for an
H100 without a GPU; the ptxas Triton compiled with (`-v`, see `triton_ptxas`) reports registers,
spills and shared memory, and cuobjdump's SASS shows whether tensor-core instructions (HGMMA on sm_90,
HMMA on sm_80+) are there and how many instructions the main loop and the rest of the kernel
hold (the instruction-count proxy of sasa_triton.inspect). Needs compiled (not interpreted)
kernels: with TRITON_INTERPRET=1 the @triton.jit functions are interpreter objects, so callers
run this in a subprocess without it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import torch

TRITON_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass
class KernelSpec:
    """One kernel at one configuration: what `triton.compile` needs, without tensors.

    arg_types maps each runtime argument to a Triton type string ("*fp16", "i32", "fp32");
    constexprs holds the meta-parameters, and also runtime ints that a real launch specializes
    (strides equal to 1); divisible names the arguments a real launch sees as multiples of 16.
    """
    name: str
    kernel: object
    arg_types: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()

    def config(self) -> dict:
        keys = ("BLOCK_H", "BLOCK_W", "BLOCK_M", "BLOCK_N")
        cfg = {k: self.constexprs[k] for k in keys if k in self.constexprs}
        if self.constexprs.get("HEADS_PER_PROGRAM", 1) != 1:  # the local forward's head pairs
            cfg["HEADS_PER_PROGRAM"] = self.constexprs["HEADS_PER_PROGRAM"]
        cfg.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return cfg


def _bin_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> str | None:
    path = os.path.join(_bin_dir(), name)
    return path if os.path.exists(path) else shutil.which(name)


def triton_ptxas(arch: int = 90) -> str | None:
    """The ptxas that triton.compile runs for sm_<arch>: the PTX it emits carries the .version of
    that ptxas's CUDA release, which an older ptxas rejects. Which one that is depends on the Triton
    release (3.3 and 3.6-3.8: `ptxas` below sm_100, `ptxas-blackwell` from it; 3.4-3.5: `ptxas`
    for every arch; 3.9+: `ptxas-blackwell` from sm_90) and on TRITON_PTXAS_PATH /
    TRITON_PTXAS_BLACKWELL_PATH (torch's inductor points the former at the ptxas of torch's CUDA
    wheels, e.g. CUDA 13.0 with torch 2.11+cu130)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(arch)
        except TypeError:  # Triton 3.4-3.5: get_ptxas() takes no arch
            tool = get_ptxas()
    except Exception:  # not a Triton with the NVIDIA backend's get_ptxas, or no ptxas found
        return None
    return tool[0] if isinstance(tool, tuple) else getattr(tool, "path", None)  # 3.3: (path, version)


def _ptxas_candidates(arch: int) -> list[str]:
    """Triton's own ptxas for the arch first, then the others it ships, then the one on PATH."""
    paths = [triton_ptxas(arch), _tool("ptxas-blackwell" if arch >= 90 else "ptxas"), _tool("ptxas"),
             _tool("ptxas-blackwell")]
    return list(dict.fromkeys(p for p in paths if p))


def _cuobjdump_candidates(arch: int = 90) -> list[str]:
    """cuobjdump of the ptxas's CUDA release first (a newer cubin than the bundled tool knows)."""
    ptxas = triton_ptxas(arch)
    paths = [os.environ.get("TRITON_CUOBJDUMP_PATH"),
             os.path.join(os.path.dirname(ptxas), "cuobjdump") if ptxas else None, _tool("cuobjdump")]
    return list(dict.fromkeys(p for p in paths if p and os.path.exists(p)))


def toolchain_missing(arch: int = 90) -> str | None:
    """Why static reports cannot be made here (no ptxas or cuobjdump), or None."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton does not import: {e}"
    missing = [name for name, found in (("ptxas", _ptxas_candidates(arch)), ("cuobjdump", _cuobjdump_candidates(arch)))
               if not found]
    return f"no {' or '.join(missing)} (the triton wheel ships them for the NVIDIA backend)" if missing else None


def compile_spec(spec: KernelSpec, arch: int = 90):
    """triton.compile the spec for sm_<arch>; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._library import LAUNCH_OPTIONS

    if not hasattr(spec.kernel, "arg_names") or type(spec.kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("static compilation needs TRITON_INTERPRET unset when triton is imported")
    signature, constexprs = {}, {}
    for name in spec.kernel.arg_names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
            constexprs[name] = spec.constexprs[name]
        else:
            signature[name] = spec.arg_types[name]
    attrs = {(spec.kernel.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in spec.divisible if n not in spec.constexprs}
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **LAUNCH_OPTIONS}
    try:
        src = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target, options=options)
    except Exception:
        # Older Triton releases spell attrs differently; divisibility hints only refine the code.
        src = ASTSource(fn=spec.kernel, signature=signature, constexprs=constexprs)
        return triton.compile(src, target=target, options=options)


def ptxas_report(ptx: str, arch: int = 90) -> dict:
    """Registers, spill bytes and shared memory from `ptxas -v` on the PTX."""
    gpu = f"sm_{arch}a" if arch in (90, 100) else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        text, errors = None, []
        for exe in _ptxas_candidates(arch):
            proc = subprocess.run([exe, "-v", f"--gpu-name={gpu}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                text = proc.stdout + proc.stderr
                break
            errors.append(f"{exe}: {proc.stderr.strip()[-300:]}")
        if text is None:
            raise RuntimeError("ptxas failed: " + ("; ".join(errors) or "no ptxas found"))
    regs = re.search(r"Used (\d+) registers", text)
    smem = re.search(r"(\d+) bytes smem", text)
    spill_stores = re.search(r"(\d+) bytes spill stores", text)
    spill_loads = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill_stores.group(1)) if spill_stores else 0,
        "spill_loads": int(spill_loads.group(1)) if spill_loads else 0,
        "stack_frame": int(stack.group(1)) if stack else 0,
        "ptxas_smem": int(smem.group(1)) if smem else 0,
    }


def dump_sass(cubin: bytes, arch: int = 90) -> str | None:
    """cuobjdump --dump-sass of the cubin, or None without cuobjdump."""
    tools = _cuobjdump_candidates(arch)
    if not tools:
        return None
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        for exe in tools:
            proc = subprocess.run([exe, "--dump-sass", path], capture_output=True, text=True)
            if proc.returncode == 0:
                return proc.stdout
            errors.append(f"{exe}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("cuobjdump failed: " + "; ".join(errors))


def sass_tensor_core_counts(sass: str | None) -> dict:
    """Counts of tensor-core instructions in SASS (HGMMA: Hopper wgmma; HMMA: mma.sync) and of fused
    multiply-adds (FFMA: the kernels compile with fp fusion, _library.LAUNCH_OPTIONS)."""
    names = ("HGMMA", "HMMA", "FFMA")
    if sass is None:
        return dict.fromkeys(names)
    return {name: len(re.findall(rf"\b{name}\b", sass)) for name in names}


SASS_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+([^;]*);", re.M)
SASS_BRANCH = re.compile(r"\b(?:BRA|JMP)\b.*\b0x([0-9a-f]+)\s*$")  # the target is the last operand


def sass_instruction_profile(sass_or_cubin) -> dict:
    """Static SASS instruction counts of a kernel: in total, per loop, and outside its hot loop.

    A loop is a backward branch (BRA to an address at or before its own; several back edges to
    one target are one loop, up to the last of them). Loops inside another loop are nested; the
    hot loop is the outermost loop with the most instructions. Counts are static: every
    instruction counts once, branches inside a loop body as if every path were taken, inner loops
    once per iteration of the loop around them. The end-of-code `BRA self` and the NOP padding
    after it are left out.

    Returns {"total", "loops": [{"start", "end", "instructions", "depth"}] (in address order, depth
    0 outermost), "hot_loop" (index into loops, or None), "body" (instructions of the hot loop),
    "outside" (total - body)}.
    """
    sass = dump_sass(sass_or_cubin) if isinstance(sass_or_cubin, (bytes, bytearray)) else sass_or_cubin
    if sass is None:
        raise RuntimeError("no cuobjdump: cannot read the SASS (the triton wheel ships one for the NVIDIA backend)")
    functions = re.split(r"^\s*Function : ", sass, flags=re.M)
    if len(functions) != 2:
        raise ValueError(f"expected the SASS of one kernel function, found {len(functions) - 1}")
    addresses, back_edges = [], {}
    for match in SASS_INSTRUCTION.finditer(functions[1]):
        address, text = int(match.group(1), 16), match.group(2).strip()
        branch = SASS_BRANCH.search(text)
        target = int(branch.group(1), 16) if branch else None
        if target == address and not text.startswith("@"):
            break  # the trap at the end of the code; NOP padding follows
        addresses.append(address)
        if target is not None and target <= address:
            back_edges[target] = max(back_edges.get(target, address), address)
    spans = sorted(back_edges.items())

    def count(start, end):
        return sum(start <= a <= end for a in addresses)

    loops = []
    for start, end in spans:
        depth = sum(s <= start and end <= e and (s, e) != (start, end) for s, e in spans)
        loops.append({"start": hex(start), "end": hex(end), "instructions": count(start, end), "depth": depth})
    outermost = [i for i, loop in enumerate(loops) if loop["depth"] == 0]
    hot = max(outermost, key=lambda i: loops[i]["instructions"]) if outermost else None
    body = loops[hot]["instructions"] if hot is not None else 0
    return {"total": len(addresses), "loops": loops, "hot_loop": hot, "body": body, "outside": len(addresses) - body}


def ttgir_loop_trips(ttgir: str) -> list:
    """Trip counts of the outermost scf.for loops of a TTGIR module, in order (None where a bound
    is not a constant): what the compiled code runs, after Triton's pipelining."""
    constants = {m.group(1): int(m.group(2))
                 for m in re.finditer(r"(%[\w.]+) = arith.constant (-?\d+) : i(?:32|64)\b", ttgir)}
    loops = [(len(m.group(1)), m.group(2), m.group(3), m.group(4))
             for m in re.finditer(r"^( *)\S.*?scf\.for %[\w.]+ = (%[\w.]+) to (%[\w.]+) step (%[\w.]+)",
                                  ttgir, re.M)]
    if not loops:
        return []
    indent = min(loop[0] for loop in loops)
    trips = []
    for depth, lower, upper, step in loops:
        if depth != indent:
            continue
        lo, hi, st = (constants.get(x) for x in (lower, upper, step))
        trips.append(None if None in (lo, hi, st) or st <= 0 else max(0, -(-(hi - lo) // st)))
    return trips


def instructions_per_pixel_head(report: dict, trips: int) -> float:
    """Warp-instructions a program executes per (pixel, head), from a static_report:
    num_warps * (outside + trips * body) / (BLOCK_H * BLOCK_W * HEADS_PER_PROGRAM). Approximate: static counts, so
    every branch in the loop body counts as taken (see sass_instruction_profile). A loop the
    compiler unrolled whole has no body (its copies count in `outside`, once each, as they run);
    one that ptxas unrolled partly would be overcounted (its body holds several iterations; not
    detected: the TTGIR trip count is from before ptxas)."""
    if not isinstance(trips, int) or isinstance(trips, bool) or trips < 0:
        raise ValueError(f"trips must be a non-negative int, got {trips!r}")
    pixel_heads = report["BLOCK_H"] * report["BLOCK_W"] * report.get("HEADS_PER_PROGRAM", 1)
    return report["num_warps"] * (report["sass_outside"] + trips * report["sass_loop_body"]) / pixel_heads


def static_report(spec: KernelSpec, arch: int = 90) -> dict:
    """Compile `spec` for sm_<arch> and report registers, spills, shared memory, tensor-core use and
    the static SASS instruction counts (sass_instructions, sass_loop_body: the hot loop's,
    sass_outside, sass_loops: every loop's, ttgir_loop_trips: the outermost loops' trip counts)."""
    compiled = compile_spec(spec, arch)
    report = {"kernel": spec.name, "arch": f"sm_{arch}", **spec.config()}
    report.update(ptxas_report(compiled.asm["ptx"], arch))
    metadata = compiled.metadata
    report["shared_mem"] = getattr(metadata, "shared", None) if not isinstance(metadata, dict) else metadata.get("shared")
    sass = dump_sass(compiled.asm["cubin"], arch)
    report.update(sass_tensor_core_counts(sass))
    if sass is not None:
        profile = sass_instruction_profile(sass)
        report.update(sass_instructions=profile["total"], sass_loop_body=profile["body"],
                      sass_outside=profile["outside"], sass_loops=[loop["instructions"] for loop in profile["loops"]],
                      ttgir_loop_trips=ttgir_loop_trips(compiled.asm.get("ttgir", "")))
    return report


def spec_from_launch(name: str, kernel, args, meta: dict) -> KernelSpec:
    """A KernelSpec from a launcher's positional args and meta-parameters, typed and specialized as
    a real launch would be: ints equal to 1 become constants, multiples of 16 get divisibility."""
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps"), meta.pop("num_stages")
    runtime_names = [n for n in kernel.arg_names if n not in meta]
    if len(runtime_names) != len(args):
        raise ValueError(f"{name}: {len(args)} args for {len(runtime_names)} runtime parameters")
    arg_types, constexprs, divisible = {}, dict(meta), []
    for arg_name, value in zip(runtime_names, args):
        if isinstance(value, torch.Tensor):
            arg_types[arg_name] = "*" + TRITON_DTYPE_NAMES[value.dtype]
            divisible.append(arg_name)  # allocations are 16-byte aligned
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: unsupported argument {arg_name}={value!r}")
        elif isinstance(value, float):
            arg_types[arg_name] = "fp32"
        elif value == 1:
            constexprs[arg_name] = 1
        else:
            arg_types[arg_name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(arg_name)
    return KernelSpec(name, kernel, arg_types, constexprs, num_warps, num_stages, tuple(divisible))
