"""The paper's spatially-aware attention stem (SPEC section 2): thin modules around the fused ops.

With few input channels (the stem's image: C_in <= 8) on the Triton path, SpatialAttention2d runs
`attention_stem2d`, which reads x and writes y and nothing else per pixel: the 1x1 projections
and the value mixture happen inside the kernels. `spatial_attention2d` (a 1x1 conv writes q, k and
the M value maps, 384 channels per pixel for the paper's stem, and the kernel reads them back)
still serves wider inputs (C_in > 8, where the fused op's per-key reads of every input channel
stop paying); the PyTorch reference serves the CPU without the interpreter. The parameters are
the same on every route: one fused 1x1 conv weight [W_Q | W_K | W_V^0 .. W_V^{M-1}], emb_row,
emb_col and nu.
"""
from __future__ import annotations

import torch
from torch import nn

from ._utils import BACKENDS, PADDINGS, WINDOWS, check_choice, check_positive_int, check_scale, resolve_backend
from .modules import _check_channels, check_image_input
from .ops.attention_stem import attention_stem2d
from .ops.spatial_attention import spatial_attention2d
from .reference.attention_stem import MAX_IN_CHANNELS


class SpatialAttention2d(nn.Module):
    """Spatially-aware attention (paper section 3.2): block-local attention whose values are mixed
    per position inside the block. Keeps the spatial size.

    Bias-free 1x1 projections W_Q, W_K and M value projections W_V^m (one fused conv producing
    (2 + M) * out_channels channels, viewed as q, k and the M value maps), and the mixture
    p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . nu[m]), computed in PyTorch each forward and
    shared across heads: v_ab = sum_m p(a, b, m) W_V^m x_ab.

    Args:
        in_channels, out_channels: channels of x and of the output.
        block_size: side of the attention block (paper: 4). heads: D = out_channels // heads (paper: 4).
        mixtures: M, the number of value projections (paper: 4).
        window: "block" (the paper: non-overlapping blocks) or "sliding" (a block_size x block_size
            window around each pixel); see spatial_attention2d.
        padding: "zeros" or "mask", for blocks/windows that leave the image.
        scale: logit scale; None means the paper's 1.0.
        embed_dim: E, the width of emb_row, emb_col and nu; None means D = out_channels // heads.
        backend: "auto", "triton" or "reference" (see spatial_attention2d).

    Shapes: x (B, in_channels, H, W) -> (B, out_channels, H, W), a channels_last tensor.

    Route (`route(x)`): "fused" (attention_stem2d, in_channels <= fuse_max_in_channels = 8 on
    the Triton path), "unfused" (1x1 conv + spatial_attention2d kernels, wider inputs) or
    "reference" (the PyTorch reference: backend="reference", or CPU without the interpreter).
    """

    fuse_max_in_channels = MAX_IN_CHANNELS  # set to 0 on an instance to force the unfused kernels

    def __init__(self, in_channels: int, out_channels: int, block_size: int = 4, heads: int = 4,
                 mixtures: int = 4, window: str = "block", padding: str = "zeros", scale: float | None = None,
                 embed_dim: int | None = None, backend: str = "auto"):
        super().__init__()
        _check_channels(in_channels, out_channels, heads)
        check_positive_int(block_size, "block_size")
        check_positive_int(mixtures, "mixtures")
        check_choice(window, "window", WINDOWS)
        check_choice(padding, "padding", PADDINGS)
        check_choice(backend, "backend", BACKENDS)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        self.head_dim = out_channels // heads
        embed_dim = self.head_dim if embed_dim is None else check_positive_int(embed_dim, "embed_dim")
        self.in_channels, self.out_channels, self.block_size = in_channels, out_channels, block_size
        self.heads, self.mixtures, self.embed_dim = heads, mixtures, embed_dim
        self.window, self.padding, self.backend = window, padding, backend
        self.scale = 1.0 if scale is None else check_scale(scale)  # finite
        # Output channels: [q | k | v_0 | ... | v_{M-1}], out_channels each.
        self.qkv = nn.Conv2d(in_channels, (2 + mixtures) * out_channels, kernel_size=1, bias=False)
        self.emb_row = nn.Parameter(torch.empty(block_size, embed_dim))
        self.emb_col = nn.Parameter(torch.empty(block_size, embed_dim))
        self.nu = nn.Parameter(torch.empty(mixtures, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.qkv.reset_parameters()
        for p in (self.emb_row, self.emb_col, self.nu):
            nn.init.normal_(p, std=self.embed_dim ** -0.5)

    def mixture_weights(self) -> torch.Tensor:
        """p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . nu[m]), shape (block_size, block_size, M)."""
        position = self.emb_row[:, None, :] + self.emb_col[None, :, :]  # (bs, bs, E)
        return torch.softmax(position @ self.nu.t(), dim=-1)

    def route(self, x: torch.Tensor) -> str:
        """"fused", "unfused" or "reference": the path forward(x) takes (see the class docstring)."""
        if resolve_backend(self.backend, x.device) == "reference":
            return "reference"
        return "fused" if self.in_channels <= self.fuse_max_in_channels else "unfused"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.in_channels)
        if self.route(x) == "fused":
            C = self.out_channels
            w = self.qkv.weight[:, :, 0, 0]  # ((2 + M) * C, C_in): [W_Q | W_K | W_V^0 .. W_V^{M-1}]
            y = attention_stem2d(x, w[:C], w[C:2 * C], w[2 * C:].unflatten(0, (self.mixtures, C)),
                                 self.mixture_weights(), self.heads, block_size=self.block_size, scale=self.scale,
                                 window=self.window, padding=self.padding, backend="triton")
            B, H, W = y.shape[:3]
            return y.reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels_last NCHW view
        qkv = self.qkv(x)
        B, _, H, W = qkv.shape
        # (B, (2+M)C, H, W) -> (B, H, W, 2+M, heads, D): a view; free of copies for channels_last x.
        qkv = qkv.permute(0, 2, 3, 1).unflatten(-1, (2 + self.mixtures, self.heads, self.head_dim))
        q, k, values = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2:]
        y = spatial_attention2d(q, k, values, self.mixture_weights(), block_size=self.block_size, scale=self.scale,
                                window=self.window, padding=self.padding, backend=self.backend)
        return y.reshape(B, H, W, self.out_channels).permute(0, 3, 1, 2)  # channels_last NCHW view

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, block_size={self.block_size}, heads={self.heads}, "
                f"mixtures={self.mixtures}, window={self.window!r}, padding={self.padding!r}, scale={self.scale}, "
                f"embed_dim={self.embed_dim}, backend={self.backend!r}")


class AttentionStem(nn.Module):
    """The full-attention ResNet stem: SpatialAttention2d -> BatchNorm2d -> ReLU -> MaxPool2d(pool, pool).

    With the defaults (3 -> 64 channels, 4x4 blocks, 4 heads, 4 mixtures, pool 4) it maps
    (B, 3, 224, 224) to (B, 64, 56, 56), as ResNet's conv stem. Other arguments as SpatialAttention2d.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, block_size: int = 4, heads: int = 4,
                 mixtures: int = 4, pool: int = 4, window: str = "block", padding: str = "zeros",
                 scale: float | None = None, embed_dim: int | None = None, backend: str = "auto"):
        super().__init__()
        check_positive_int(pool, "pool")
        self.pool_size = pool
        self.attention = SpatialAttention2d(in_channels, out_channels, block_size=block_size, heads=heads,
                                            mixtures=mixtures, window=window, padding=padding, scale=scale,
                                            embed_dim=embed_dim, backend=backend)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(pool, pool) if pool > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.attention(x))))

    def extra_repr(self) -> str:
        return f"pool={self.pool_size}"
