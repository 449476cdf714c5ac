"""Compile kernels for a GPU that is not present and read their resource use.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` builds PTX and a cubin for an
H100 without a GPU; the ptxas shipped in the triton wheel (`-v`) reports registers, spills and
shared memory, and cuobjdump's SASS shows whether tensor-core instructions (HGMMA on sm_90,
HMMA on sm_80+) are there. Needs compiled (not interpreted) kernels: with TRITON_INTERPRET=1 the
@triton.jit functions are interpreter objects, so callers run this in a subprocess without it.
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
        cfg.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return cfg


def _bin_dir() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _tool(name: str) -> str | None:
    path = os.path.join(_bin_dir(), name)
    return path if os.path.exists(path) else shutil.which(name)


def compile_spec(spec: KernelSpec, arch: int = 90):
    """triton.compile the spec for sm_<arch>; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
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
        text, last_error = None, ""
        for tool in ("ptxas", "ptxas-blackwell"):
            exe = _tool(tool)
            if exe is None:
                continue
            proc = subprocess.run([exe, "-v", f"--gpu-name={gpu}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                text = proc.stdout + proc.stderr
                break
            last_error = proc.stderr.strip()
        if text is None:
            raise RuntimeError(f"ptxas failed: {last_error}")
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


def sass_tensor_core_counts(cubin: bytes) -> dict:
    """Counts of tensor-core instructions in the cubin's SASS (HGMMA: Hopper wgmma; HMMA: mma.sync)."""
    exe = _tool("cuobjdump")
    if exe is None:
        return {"HGMMA": None, "HMMA": None}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([exe, "--dump-sass", path], capture_output=True, text=True)
    sass = proc.stdout
    return {"HGMMA": len(re.findall(r"\bHGMMA\b", sass)), "HMMA": len(re.findall(r"\bHMMA\b", sass))}


def static_report(spec: KernelSpec, arch: int = 90) -> dict:
    """Compile `spec` for sm_<arch> and report registers, spills, shared memory and tensor-core use."""
    compiled = compile_spec(spec, arch)
    report = {"kernel": spec.name, "arch": f"sm_{arch}", **spec.config()}
    report.update(ptxas_report(compiled.asm["ptx"], arch))
    metadata = compiled.metadata
    report["shared_mem"] = getattr(metadata, "shared", None) if not isinstance(metadata, dict) else metadata.get("shared")
    report.update(sass_tensor_core_counts(compiled.asm["cubin"]))
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
