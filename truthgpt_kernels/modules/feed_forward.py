"""Feed-forward layers: SwiGLU and GeGLU (fused activations), MLP (GELU) and MoE (top-k routed SwiGLU
experts with a load-balancing loss and capacity handling that never drops a token silently)."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import geglu, swiglu
from ..ops.geglu import APPROXIMATIONS as GELU_APPROXIMATIONS
from ..validation import check_choice
from .linear import Linear


class _GatedFeedForward(nn.Module):
    """down(act(x W_gate) * (x W_up)): `gate_up` is the fused projection d_model -> 2 d_ff
    whose first d_ff outputs are the gate and the last d_ff the up projection; the fused
    activation op reads both halves in place."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = False, dropout: float = 0.0,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        self.d_model, self.d_ff, self.backend = d_model, d_ff, backend
        self.gate_up = Linear(d_model, 2 * d_ff, bias=bias, device=device, dtype=dtype)
        self.down = Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)

    @property
    def gate_weight(self) -> Tensor:
        return self.gate_up.weight[:self.d_ff]

    @property
    def up_weight(self) -> Tensor:
        return self.gate_up.weight[self.d_ff:]

    def activation(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.gate_up(x))  # (..., d_ff)
        return self.dropout(self.down(h))


class SwiGLU(_GatedFeedForward):
    """down(silu(x W_gate) * (x W_up)) (Shazeer 2020). `gate_up` is the fused projection
    d_model -> 2 d_ff whose first d_ff outputs are the gate and the last d_ff the up
    projection; tk.swiglu reads both halves in place."""

    def activation(self, h: Tensor) -> Tensor:
        return swiglu(h, backend=self.backend)


class GeGLU(_GatedFeedForward):
    """down(gelu(x W_gate) * (x W_up)) (Shazeer 2020; T5 v1.1, Gemma): SwiGLU's layout
    (`gate_up`, `down`) with tk.geglu; `approximate` is "tanh" or "none" (erf), as F.gelu."""

    def __init__(self, d_model: int, d_ff: int, *, approximate: str = "tanh", bias: bool = False,
                 dropout: float = 0.0, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(d_model, d_ff, bias=bias, dropout=dropout, backend=backend, device=device,
                         dtype=dtype)
        self.approximate = check_choice("approximate", approximate, GELU_APPROXIMATIONS)

    def activation(self, h: Tensor) -> Tensor:
        return geglu(h, approximate=self.approximate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class MLP(nn.Module):
    """fc2(gelu(fc1(x))), the GPT-2 / BERT feed-forward."""

    def __init__(self, d_model: int, d_ff: int, *, bias: bool = True, dropout: float = 0.0,
                 approximate: str = "tanh", device=None, dtype=None):
        super().__init__()
        self.fc1 = Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.fc2 = Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)
        self.approximate = approximate
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(x), approximate=self.approximate)))


class MoE(nn.Module):
    """Mixture of SwiGLU experts with top-k routing (Shazeer et al. 2017; Fedus et al. 2021).

    - router: linear d_model -> n_experts, softmax in float32; each token goes to its top_k
      experts, weighted by their renormalised probabilities (Mixtral);
    - after each forward, `aux_loss` holds the Switch load-balancing loss
      n_experts * sum_e f_e P_e (f_e: fraction of routed assignments to e, P_e: mean router
      probability of e), already multiplied by `aux_loss_weight`; add it to the training loss;
    - capacity_factor=None: every token is processed (no drops). With a capacity factor each
      expert takes at most ceil(capacity_factor * tokens * top_k / n_experts) assignments, in
      priority order (all first choices before second choices, then token order); the others
      are not computed, and the token keeps only the experts that took it (a token that no
      expert took contributes zero, so the block's residual passes it through unchanged).
      The counts are kept, never hidden: `dropped_assignments` and `dropped_tokens` (last
      forward) and `total_dropped_tokens` (running sum).
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int = 8, top_k: int = 2, *,
                 capacity_factor: Optional[float] = None, aux_loss_weight: float = 0.01,
                 bias: bool = False, dropout: float = 0.0, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.n_experts, self.top_k = n_experts, top_k
        self.capacity_factor, self.aux_loss_weight = capacity_factor, aux_loss_weight
        self.router = nn.Linear(d_model, n_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            SwiGLU(d_model, d_ff, bias=bias, dropout=dropout, backend=backend, device=device, dtype=dtype)
            for _ in range(n_experts))
        self.aux_loss: Tensor = torch.zeros(())
        self.dropped_assignments = 0
        self.dropped_tokens = 0
        self.total_dropped_tokens = 0
        self.expert_counts: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                 # (N, d)
        N, E, K = x.shape[0], self.n_experts, self.top_k
        probs = torch.softmax(self.router(x).float(), dim=-1)       # (N, E)
        weight, expert = probs.topk(K, dim=-1)                      # (N, K)
        weight = weight / weight.sum(-1, keepdim=True)

        # assignments in priority order: every token's first choice, then its second, ...
        flat_expert = expert.t().reshape(-1)                         # (K * N,)
        onehot = F.one_hot(flat_expert, E)                           # (K * N, E)
        counts = onehot.sum(0)                                       # (E,)
        # Switch load-balancing loss: E * sum_e (fraction routed to e) * (mean prob of e)
        frac = counts.float() / (N * K)
        self.aux_loss = self.aux_loss_weight * E * (frac * probs.mean(0)).sum()
        self.expert_counts = counts.detach()

        keep = torch.ones(K * N, dtype=torch.bool, device=x.device)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * N * K / E)
            rank = (onehot.cumsum(0) * onehot).sum(-1) - 1          # place in its expert's queue
            keep = rank < capacity
            kept_per_token = keep.view(K, N).sum(0)
            self.dropped_assignments = int((~keep).sum())
            self.dropped_tokens = int((kept_per_token == 0).sum())
            self.total_dropped_tokens += self.dropped_tokens
        else:
            self.dropped_assignments = self.dropped_tokens = 0

        token = torch.arange(N, device=x.device).repeat(K)           # (K * N,)
        flat_weight = weight.t().reshape(-1)                         # (K * N,)
        out = torch.zeros_like(x)
        for e, ffn in enumerate(self.experts):
            sel = ((flat_expert == e) & keep).nonzero().squeeze(-1)
            if sel.numel() == 0:
                continue
            idx = token[sel]
            y = ffn(x[idx]) * flat_weight[sel, None]                 # (n_e, d)
            out.index_add_(0, idx, y.to(out.dtype))
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, aux_loss_weight={self.aux_loss_weight}")
