"""The public functional ops, each a torch.library op in namespace `truthgpt`."""
from .add_rms_norm import add_rms_norm
from .attention import alibi_slopes, attention
from .attention_varlen import attention_varlen
from .attention_with_kvcache import attention_with_kvcache
from .embedding import embedding
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .geglu import geglu
from .grouped_linear import grouped_linear
from .layer_norm import layer_norm
from .linear import linear
from .rms_norm import rms_norm
from .rotary import apply_rotary, apply_rotary_qk, rotary_cos_sin
from .swiglu import swiglu

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "alibi_slopes", "apply_rotary",
           "apply_rotary_qk", "rotary_cos_sin",
           "swiglu", "rms_norm", "add_rms_norm", "geglu", "layer_norm", "linear", "grouped_linear",
           "linear_cross_entropy", "cross_entropy", "embedding"]
