"""tk.linear: y = x weight^T + bias (F.linear), as the op truthgpt::linear, for the projections of
decoding: the C++ CPU kernel streams the weights once for up to 8 rows of x (one token per
sequence), where a GEMM library's kernel reads them at a fraction of the memory bandwidth;
more rows go to at::linear. Forward kernels only: when a gradient may flow, tk.linear is
F.linear (torch's GEMM and autograd, at the GEMM ceiling for the row counts of training)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends
from ..validation import check_same_dtype, check_tensor

FAMILY = "linear"


@torch.library.custom_op("truthgpt::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> (M, N). No autograd formula."""
    return backends.kernel(FAMILY, backend, "fwd")(x, weight, bias)


@backends.register_fake(linear_op, FAMILY, "fwd")
def _(x, weight, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           backend: Optional[str] = None) -> Tensor:
    """F.linear(x, weight, bias): x (..., K), weight (N, K), bias (N,) -> (..., N); under
    autocast in the autocast dtype, as F.linear."""
    check_tensor("x", x, ndim=range(1, 9))
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=2, device=x.device, shape=(None, K))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device, shape=(weight.shape[0],))
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    check_same_dtype("x", x, weight=weight, bias=bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    name = backends.select(FAMILY, backend, x)
    out = backends.call(linear_op, FAMILY, "fwd", name, x.reshape(-1, K), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
