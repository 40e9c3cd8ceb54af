"""tk.embedding: F.embedding (a lookup of rows of `weight`) whose CPU backward writes the
(num_embeddings, d) weight gradient through the C++ kernels' cached huge-page allocator
(truthgpt::embedding_bwd) instead of zero-filling a freshly allocated tensor: for an LM's
vocabulary the fresh allocation costs more in page faults than the gradient itself (V 32000,
d 512, 2048 tokens, float32: 16.5 ms -> ~2 ms fwd+bwd). Same values as F.embedding: the rows
of the gradient are summed in token order; padding_idx rows get no gradient. Other devices and
dtypes, and the options max_norm / scale_grad_by_freq / sparse, use torch's own backward."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends

_FAST_DTYPES = (torch.float32, torch.float64)


@torch.library.custom_op("truthgpt::embedding", mutates_args=())
def embedding_op(weight: Tensor, indices: Tensor, padding_idx: int) -> Tensor:
    return F.embedding(indices, weight)


@embedding_op.register_fake
def _(weight, indices, padding_idx):
    return weight.new_empty((*indices.shape, weight.shape[1]))


def _cpu_kernel(grad: Tensor, weight_shape) -> bool:
    return (grad.device.type == "cpu" and grad.dtype in _FAST_DTYPES and weight_shape[1] > 0
            and not backends.unavailable_reason("cpu"))


def _setup(ctx, inputs, output):
    weight, indices, padding_idx = inputs
    ctx.save_for_backward(*backends.saveable(indices))
    ctx.weight_shape = tuple(weight.shape)
    ctx.padding_idx = padding_idx


def _backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    num_weights = ctx.weight_shape[0]
    # create_graph (double backward): torch's backward, which is differentiable in grad
    if _cpu_kernel(grad, ctx.weight_shape) and not torch.is_grad_enabled():
        dw = torch.ops.truthgpt.embedding_bwd(grad, indices, num_weights, ctx.padding_idx)
    else:
        dw = torch.ops.aten.embedding_dense_backward(grad, indices, num_weights, ctx.padding_idx, False)
    return dw, None, None


backends.register_autograd(embedding_op, _backward, _setup)


def _register_kernel_fake():
    if backends.unavailable_reason("cpu"):
        return

    @torch.library.register_fake("truthgpt::embedding_bwd")
    def _(grad, indices, num_weights, padding_idx):
        return grad.new_empty((num_weights, grad.shape[-1]))


_register_kernel_fake()


def embedding(indices: Tensor, weight: Tensor, padding_idx: Optional[int] = None) -> Tensor:
    """F.embedding(indices, weight, padding_idx) (indices int64/int32 of any shape, values in
    [0, num_embeddings); weight (num_embeddings, d)): returns (*indices.shape, d)."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (num_embeddings, d), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 or int32 tensor, got "
                        f"{indices.dtype if isinstance(indices, Tensor) else type(indices).__name__}")
    n = weight.shape[0]
    if padding_idx is None:
        pad = -1
    elif -n <= padding_idx < n:
        pad = padding_idx % n if n else -1
    else:
        raise ValueError(f"padding_idx must be within [-{n}, {n}), got {padding_idx}")
    if not (weight.requires_grad and torch.is_grad_enabled()) or backends.composite_needed():
        return F.embedding(indices, weight, None if pad < 0 else pad)
    return backends.apply(embedding_op, weight, indices, pad)


__all__ = ["embedding"]
