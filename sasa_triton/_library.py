"""Registration of the fused ops with torch.library, so torch.compile traces them without graph
breaks and fake tensors (torch.export, shape propagation) work.

Default: `torch.library.custom_op` with a registered fake kernel and autograd. Inductor treats it
as one opaque extern call, which is all the fused kernels need (there is nothing to fuse into
them). SASA_TRITON_TRITON_OP=1 registers them as `torch.library.triton_op` + `wrap_triton`
instead, so Inductor sees the Triton launches; that path is opt-in until it has been verified on
a GPU (it cannot be exercised here: tracing wrap_triton needs a CUDA driver). Under
TRITON_INTERPRET=1 it is never used (wrap_triton rejects interpreted kernels on some versions).
"""
from __future__ import annotations

import os

import torch

from ._utils import interpreter_enabled

_INTERPRET = interpreter_enabled()
_wrap_triton = getattr(torch.library, "wrap_triton", None) or getattr(torch.library, "capture_triton", None)
_USE_TRITON_OP = (os.environ.get("SASA_TRITON_TRITON_OP", "0") == "1" and not _INTERPRET
                  and hasattr(torch.library, "triton_op") and _wrap_triton is not None)


def define_op(name: str):
    """Decorator registering a functional (non-mutating) op under `name`."""
    def decorator(fn):
        if _USE_TRITON_OP:
            return torch.library.triton_op(name, mutates_args=())(fn)
        return torch.library.custom_op(name, mutates_args=())(fn)
    return decorator


# Options every launch of the package's kernels passes (and the static compiles in _compile.py).
# Fused multiply-adds: the default of Triton 3.3-3.9, under which the kernels were validated and
# their instruction counts measured; Triton 3.9 warns that its default turns them off in 3.10
# (measured: 3-4 % more SASS instructions without). Not on the opt-in triton_op path, whose
# wrap_triton takes only num_warps/num_stages-like options beside the kernel's arguments.
LAUNCH_OPTIONS = {} if _USE_TRITON_OP else {"enable_fp_fusion": True}


def launchable(kernel):
    """The kernel as the registered op must launch it (wrapped for tracing when compiled)."""
    return _wrap_triton(kernel) if _USE_TRITON_OP else kernel


def attention_outputs(q: torch.Tensor, y=None, lse=None):
    """The forward outputs of an attention op with queries q (B, H, W, heads, D): y, contiguous
    like q, and one fp32 log-sum-exp per (pixel, head) as (B, heads, H, W). Given buffers (the
    tests poison them) are returned as they are."""
    B, H, W, heads, _ = q.shape
    if y is None:
        y = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = q.new_empty((B, heads, H, W), dtype=torch.float32)
    return y, lse


def autocast_inputs(*tensors):
    """Under autocast, float32 activations go to the autocast dtype (the relative tables, being
    parameters, stay as they are: the kernels read them in fp32)."""
    if not tensors:
        return tensors
    device_type = tensors[0].device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)
