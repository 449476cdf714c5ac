"""PyTorch reference implementations: the CPU path and the oracle of every test."""
from .attention_stem import attention_stem2d
from .local_attention import local_attention2d
from .spatial_attention import spatial_attention2d

__all__ = ["attention_stem2d", "local_attention2d", "spatial_attention2d"]
