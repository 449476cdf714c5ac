"""Shared helpers: input validation, backend selection and interpreter detection.

Every public op validates its arguments here so that bad input raises a ValueError/TypeError that
names the argument, before anything reaches a kernel.
"""
from __future__ import annotations

import math
import os

import torch
from torch.autograd import forward_ad as _forward_ad

PADDINGS = ("zeros", "mask")
BACKENDS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1 before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(name: str, t, rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got dtype {t.dtype}"
        )
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)} (rank {t.dim()})")


def check_kernel_size(kernel_size, name: str = "kernel_size") -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"{name} must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {kernel_size}")
    return kernel_size


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):  # every logit, and so every output, would be NaN
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all inputs must share a device")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map backend="auto"|"triton"|"reference" to "triton" or "reference" for tensors on `device`."""
    check_choice(backend, "backend", BACKENDS)
    if backend == "reference":
        return "reference"
    runnable = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if backend == "auto":
        return "triton" if runnable else "reference"
    if not runnable:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}"
        )
    return "triton"


def transforms_active() -> bool:
    """Whether forward-mode AD (a dual level of torch.autograd.forward_ad) or a torch.func transform
    (grad, vmap, jvp, jacrev, ...) is active. The kernels have no rules for either (a dual input's
    tangent was dropped without an error; the transforms raised obscure errors): the ops then run
    their PyTorch reference, which has them, whatever the backend."""
    return _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for the kernels: fp32 inputs follow torch's matmul precision
    setting ("highest" -> exact "ieee" products); half inputs feed their fp32 side products (the
    relative and mixture tables) through tf32, more precise than the inputs themselves."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def check_kernel_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the Triton kernels support float16, bfloat16 and float32 "
            f"(use backend='reference' for float64)"
        )


def check_local_attention_args(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding):
    """Validate the arguments of local_attention2d (both backends share these checks)."""
    check_tensor("q", q, rank=5)
    check_tensor("k", k, rank=5)
    check_tensor("v", v, rank=5)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_kernel_size(kernel_size)
    check_positive_int(dilation, "dilation")
    check_scale(scale)
    check_choice(padding, "padding", PADDINGS)
    heads, head_dim = q.shape[3], q.shape[4]
    if (rel_rows is None) != (rel_cols is None):
        raise ValueError("rel_rows and rel_cols must be given together (both tensors or both None)")
    if head_dim < 2 and (rel_rows is not None or rel_cols is not None):
        raise ValueError(f"the relative embeddings need a head dim D >= 2, got D={head_dim}")
    for name, rel, width in (("rel_rows", rel_rows, head_dim // 2), ("rel_cols", rel_cols, head_dim - head_dim // 2)):
        if rel is None:
            continue
        check_tensor(name, rel)
        shared = (kernel_size, width)
        per_head = (heads, kernel_size, width)
        if tuple(rel.shape) not in (shared, per_head):
            raise ValueError(
                f"{name} must have shape {shared} (shared across heads) or {per_head} (per head) "
                f"for kernel_size={kernel_size}, heads={heads}, D={head_dim}; got {tuple(rel.shape)}"
            )
    check_same_device(q=q, k=k, v=v, rel_rows=rel_rows, rel_cols=rel_cols)


WINDOWS = ("block", "sliding")


def check_spatial_attention_args(q, k, values, mix, block_size, scale, window, padding):
    """Validate the arguments of spatial_attention2d (both backends share these checks)."""
    check_tensor("q", q, rank=5)
    check_tensor("k", k, rank=5)
    check_tensor("values", values, rank=6)
    check_tensor("mix", mix, rank=3)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    B, H, W, heads, D = q.shape
    M = values.shape[3]
    if values.shape[:3] != q.shape[:3] or values.shape[4:] != q.shape[3:] or M < 1:
        raise ValueError(
            f"values must have shape (B, H, W, M, heads, D) = ({B}, {H}, {W}, M, {heads}, {D}) with M >= 1, "
            f"got {tuple(values.shape)}"
        )
    if k.dtype != q.dtype or values.dtype != q.dtype:
        raise TypeError(f"q, k and values must share a dtype, got {q.dtype}, {k.dtype}, {values.dtype}")
    check_positive_int(block_size, "block_size")
    if tuple(mix.shape) != (block_size, block_size, M):
        raise ValueError(
            f"mix must have shape (block_size, block_size, M) = ({block_size}, {block_size}, {M}), "
            f"got {tuple(mix.shape)}"
        )
    check_scale(scale)
    check_choice(window, "window", WINDOWS)
    check_choice(padding, "padding", PADDINGS)
    check_same_device(q=q, k=k, values=values, mix=mix)
