"""Thin nn.Module wrappers around the fused ops (drop-in replacements for nn.Conv2d)."""
from __future__ import annotations

import torch
from torch import nn

from ._utils import check_choice, check_kernel_size, check_positive_int, check_scale, resolve_backend, BACKENDS, PADDINGS
from .ops.local_attention import local_attention2d


def _check_channels(in_channels, out_channels, heads):
    check_positive_int(in_channels, "in_channels")
    check_positive_int(out_channels, "out_channels")
    check_positive_int(heads, "heads")
    if out_channels % heads != 0:
        raise ValueError(f"heads ({heads}) must divide out_channels ({out_channels})")


def check_image_input(x, in_channels: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the layer expects in_channels={in_channels}")


class SelfAttention2d(nn.Module):
    """Stand-alone self-attention layer (SPEC section 1), a drop-in for a k x k nn.Conv2d.

    Dense bias-free 1x1 projections to q, k, v (one fused 3 * out_channels conv), local attention
    over a kernel_size x kernel_size window with learned relative row/column embeddings, then a
    stride x stride average pool when stride > 1 (the paper's stride-2 recipe).

    Args:
        in_channels, out_channels: channels of x and of the output.
        kernel_size: odd window size (paper: 7). stride: 1, or 2 for the paper's downsampling
            (attention, then a 2x2 average pool); other values raise ValueError.
        heads: attention heads; D = out_channels // heads (paper: 8 heads).
        dilation: step between window taps. padding: "zeros" or "mask" (see local_attention2d).
        scale: logit scale; None means the paper's formula (1.0, no 1/sqrt(D)).
        rel_per_head: one set of relative embeddings per head instead of one shared set.
        backend: "auto", "triton" or "reference" (see local_attention2d).

    Shapes: x (B, in_channels, H, W) -> (B, out_channels, H // stride, W // stride) (an odd side
    with stride 2 drops its last row/column, as nn.AvgPool2d(2)). The output is a channels_last
    tensor; channels_last input keeps the q/k/v views free of copies.

    Input (as nn.Conv2d, with messages that name x): a floating-point tensor on the parameters'
    device, in the parameters' dtype (float32 by default; layer.half(), .bfloat16() or .double()
    change it); under torch.autocast any of float16, bfloat16, float32 for x and the parameters
    (the layer then runs in the autocast dtype; autocast never casts float64). H and W must be
    at least stride. The Triton kernels take float16, bfloat16 and float32: a float64 layer
    (e.g. for gradcheck) needs backend="reference", which is what "auto" picks on a CPU unless
    TRITON_INTERPRET=1. Anything else raises TypeError (type, dtype) or ValueError (shape,
    channels, size, device).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, stride: int = 1,
                 heads: int = 8, dilation: int = 1, padding: str = "zeros", scale: float | None = None,
                 rel_per_head: bool = False, backend: str = "auto"):
        super().__init__()
        _check_channels(in_channels, out_channels, heads)
        check_kernel_size(kernel_size)
        check_positive_int(stride, "stride")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2 (2 = attention, then a 2x2 average pool), got {stride}")
        check_positive_int(dilation, "dilation")
        check_choice(padding, "padding", PADDINGS)
        check_choice(backend, "backend", BACKENDS)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.heads, self.dilation = kernel_size, stride, heads, dilation
        self.padding, self.backend, self.rel_per_head = padding, backend, rel_per_head
        self.scale = 1.0 if scale is None else check_scale(scale)  # finite
        head_dim = out_channels // heads
        if head_dim < 2:
            raise ValueError(f"out_channels // heads must be >= 2 for the row/column embeddings, got {head_dim}")
        self.head_dim = head_dim
        self.qkv = nn.Conv2d(in_channels, 3 * out_channels, kernel_size=1, bias=False)
        lead = (heads,) if rel_per_head else ()
        self.rel_rows = nn.Parameter(torch.empty(*lead, kernel_size, head_dim // 2))
        self.rel_cols = nn.Parameter(torch.empty(*lead, kernel_size, head_dim - head_dim // 2))
        self.pool = nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        # The paper's embeddings: normal with std D**-0.5 (as transformer embeddings).
        nn.init.normal_(self.rel_rows, std=self.head_dim ** -0.5)
        nn.init.normal_(self.rel_cols, std=self.head_dim ** -0.5)

    def _check_input(self, x, weight) -> None:
        check_image_input(x, self.in_channels)
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                            f"got dtype {x.dtype}")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {weight.device}")
        H, W = x.shape[-2:]
        if H < self.stride or W < self.stride:
            raise ValueError(f"x must have height and width >= stride ({self.stride}), got {H}x{W}")
        # Autocast casts x and the weights to its dtype, except float64 tensors (as for nn.Conv2d).
        autocast = (x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
                    and torch.float64 not in (x.dtype, weight.dtype))
        if not autocast and x.dtype != weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {weight.dtype}: convert x, or the "
                            f"layer (e.g. layer.to({x.dtype})), as for nn.Conv2d (autocast never casts float64)")
        if x.dtype == torch.float64 and resolve_backend(self.backend, x.device) == "triton":
            raise TypeError(f"x is float64, which the Triton kernels do not take (float16, bfloat16, float32); "
                            f"use backend='reference' for float64 (backend is {self.backend!r})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projection = self.qkv  # (a submodule's lookup goes through nn.Module.__getattr__: once)
        self._check_input(x, projection.weight)
        qkv = projection(x)
        B, _, H, W = qkv.shape
        # (B, 3C, H, W) -> (B, H, W, 3, heads, D): a view; free of copies for channels_last x,
        # strided (the kernels take strides) for NCHW x.
        qkv = qkv.permute(0, 2, 3, 1).view(B, H, W, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(dim=3)
        y = local_attention2d(q, k, v, self.rel_rows, self.rel_cols, kernel_size=self.kernel_size,
                              dilation=self.dilation, scale=self.scale, padding=self.padding,
                              backend=self.backend)
        y = y.reshape(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last NCHW view
        return y if self.stride == 1 else self.pool(y)  # (nn.Identity's call costs a few us)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"heads={self.heads}, dilation={self.dilation}, padding={self.padding!r}, scale={self.scale}, "
                f"rel_per_head={self.rel_per_head}, backend={self.backend!r}")
