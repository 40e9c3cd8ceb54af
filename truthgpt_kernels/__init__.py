"""truthgpt_kernels: attention, rotary, SwiGLU and RMSNorm kernels (Triton, CUDA C++, C++ CPU)
as autograd-aware torch.library ops, nn.Modules and a configurable transformer."""
from . import _ext, logs
from .backends import BackendError, available_backends, use_backend

logs.configure()     # TRUTHGPT_LOG_LEVEL, if set

_ext.load("_C")      # registers the C++ CPU kernels (if built)
_ext.load("_cuda")   # registers the CUDA C++ kernels (if built)

from .ops import (add_rms_norm, alibi_slopes, apply_rotary, apply_rotary_qk, attention, attention_varlen,  # noqa: E402
                  attention_with_kvcache, cross_entropy, embedding, geglu, grouped_linear, layer_norm, linear,
                  linear_cross_entropy, rms_norm, rotary_cos_sin, swiglu)

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "alibi_slopes", "apply_rotary",
           "apply_rotary_qk", "rotary_cos_sin",
           "swiglu", "rms_norm", "add_rms_norm", "geglu", "layer_norm", "linear", "grouped_linear",
           "linear_cross_entropy", "cross_entropy", "embedding", "use_backend",
           "available_backends", "BackendError"]

# Modules and the configurable transformer (pure Python on the ops above; cheap to import).
from .config import ConfigError, TransformerConfig  # noqa: E402
from .modules import (Attention, GeGLU, KVCache, LayerNorm, MoE, MLP, MultiheadAttention,  # noqa: E402
                      RelativePositionBias, RMSNorm, RotaryEmbedding, SwiGLU, Transformer,
                      TransformerBlock)
from .modules import CrossEntropyLoss, FusedLinearCrossEntropyLoss  # noqa: E402
from .patch import replace_modules  # noqa: E402
from .explain import explain  # noqa: E402

__all__ += ["TransformerConfig", "ConfigError", "Attention", "KVCache", "RotaryEmbedding", "RelativePositionBias",
            "SwiGLU", "GeGLU", "MLP", "MoE", "RMSNorm", "LayerNorm", "TransformerBlock", "Transformer",
            "MultiheadAttention", "replace_modules", "explain", "FusedLinearCrossEntropyLoss",
            "CrossEntropyLoss"]
