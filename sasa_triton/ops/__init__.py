"""Fused Triton ops, one per file: kernels, launchers, autograd Function and public function."""
from .local_attention import local_attention2d
from .spatial_attention import spatial_attention2d

__all__ = ["local_attention2d", "spatial_attention2d"]
