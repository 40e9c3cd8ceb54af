"""nn.Modules on the truthgpt_kernels ops, and the configurable Transformer."""
from .attention import Attention, CacheFullError, KVCache
from .embeddings import (AlibiSlopes, LearnedPositionalEmbedding, RelativePositionBias, RotaryEmbedding,
                         SinusoidalPositionalEmbedding, sinusoidal_table)
from .feed_forward import MLP, GeGLU, MoE, SwiGLU
from .linear import Linear
from .loss import CrossEntropyLoss, FusedLinearCrossEntropyLoss
from .multihead import MultiheadAttention
from .norm import LayerNorm, RMSNorm, make_norm
from .transformer import ModelCache, Transformer, TransformerBlock, sample

__all__ = ["Attention", "KVCache", "CacheFullError", "RotaryEmbedding", "AlibiSlopes", "RelativePositionBias",
           "SinusoidalPositionalEmbedding", "LearnedPositionalEmbedding", "sinusoidal_table",
           "SwiGLU", "GeGLU", "MLP", "MoE", "Linear", "RMSNorm", "LayerNorm", "make_norm", "TransformerBlock",
           "Transformer", "ModelCache", "sample", "MultiheadAttention", "FusedLinearCrossEntropyLoss",
           "CrossEntropyLoss"]
