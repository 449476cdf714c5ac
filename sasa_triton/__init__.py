"""sasa-triton: Stand-Alone Self-Attention in Vision Models (Ramachandran et al., NeurIPS 2019)
as fused Triton kernels for PyTorch."""
from . import models, reference
from .modules import SelfAttention2d
from .ops.attention_stem import attention_stem2d
from .ops.local_attention import local_attention2d
from .ops.spatial_attention import spatial_attention2d
from .stem import AttentionStem, SpatialAttention2d

__version__ = "0.1.0"

__all__ = [
    "local_attention2d", "spatial_attention2d", "attention_stem2d", "SelfAttention2d", "SpatialAttention2d", "AttentionStem",
    "models", "reference", "__version__",
]
