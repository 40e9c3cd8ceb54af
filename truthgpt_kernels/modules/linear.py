"""Linear: nn.Linear through tk.linear (the same parameters, state dict and initialisation)."""
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import linear


class Linear(nn.Linear):
    """nn.Linear whose forward is tk.linear: the C++ kernel for the few rows of decoding, float32
    GEMMs for bfloat16 / float16 on CPUs whose GEMM for them is slow (forward and backward), else
    torch's GEMM (F.linear and its autograd when a gradient may flow). The
    backend is always chosen automatically (use_backend / TRUTHGPT_BACKEND name the backend of
    the other ops: a GPU backend has no linear kernel, and "auto" on CUDA tensors is F.linear).
    An input tk.linear does not take (more than 8 dims, complex, or one F.linear rejects) goes
    to F.linear: its result, or torch's own exception, as nn.Linear."""

    def forward(self, input: Tensor) -> Tensor:
        try:
            return linear(input, self.weight, self.bias, backend="auto")
        except (TypeError, ValueError):  # raised by the validation, before any kernel ran
            return F.linear(input, self.weight, self.bias)
