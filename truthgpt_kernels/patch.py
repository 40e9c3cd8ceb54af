"""replace_modules(): swap torch.nn modules inside an existing model for truthgpt ones, in place,
keeping parameters (the same Parameter objects), device and dtype."""
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("truthgpt_kernels")


@dataclass
class ReplaceReport:
    swapped: List[Tuple[str, str]] = field(default_factory=list)   # (module name, new type)
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (module name, why)

    def __str__(self):
        lines = [f"swapped {len(self.swapped)} module(s), left {len(self.skipped)}"]
        lines += [f"  swapped {n} -> {t}" for n, t in self.swapped]
        lines += [f"  left    {n}: {why}" for n, why in self.skipped]
        if not self.swapped and not self.skipped:
            lines.append("  nothing to replace: no torch.nn.MultiheadAttention, RMSNorm, LayerNorm or Linear found")
        return "\n".join(lines)


def _convert_mha(m: nn.MultiheadAttention):
    from .modules.multihead import MultiheadAttention
    return MultiheadAttention.from_torch(m)


def _convert_rms_norm(m: nn.RMSNorm):
    from .modules.norm import RMSNorm
    if len(m.normalized_shape) != 1:
        raise ValueError(f"normalized_shape {tuple(m.normalized_shape)} spans more than the last dim")
    weight = m.weight
    new = RMSNorm(m.normalized_shape, eps=m.eps, elementwise_affine=weight is not None,
                  device="meta")
    if weight is not None:
        new.weight = weight  # the same Parameter: optimizers and tied weights keep working
    new.train(m.training)
    return new


def _convert_layer_norm(m: nn.LayerNorm):
    from .modules.norm import LayerNorm
    if len(m.normalized_shape) != 1:
        raise ValueError(f"normalized_shape {tuple(m.normalized_shape)} spans more than the last dim")
    new = LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                    bias=m.bias is not None, device="meta")
    if m.elementwise_affine:  # the same Parameters, as for RMSNorm
        new.weight = m.weight
        if m.bias is not None:
            new.bias = m.bias
    # nn.TransformerEncoderLayer's eval fast path would read the parameters and run torch's
    # own fused kernel unless a submodule has a hook: this no-op one keeps ours in use
    from .modules.multihead import _keep_own_forward
    new.register_forward_pre_hook(_keep_own_forward, with_kwargs=True)
    new.train(m.training)
    return new


def _convert_linear(m: nn.Linear):
    from .modules.linear import Linear
    new = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    new.weight = m.weight  # the same Parameters (tied weights, e.g. an lm_head, stay tied)
    if m.bias is not None:
        new.bias = m.bias
    new.train(m.training)
    return new


def _convert_embedding(m: nn.Embedding):
    from .modules.embeddings import Embedding
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        raise ValueError("max_norm / scale_grad_by_freq / sparse: torch's own embedding serves them")
    new = Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx, device="meta")
    new.weight = m.weight  # the same Parameter (a tied lm_head stays tied)
    new.train(m.training)
    return new


# the hook dicts of nn.Module a swap carries over (the dict objects themselves, so the handles
# a user holds still remove them)
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _check_plain(m: nn.Module) -> None:
    """Raises ValueError (the module is then left, with the reason) when m's weights are not its
    own plain Parameters: a parametrization (weight_norm, spectral_norm, orthogonal) or the
    pre-hook kind (old weight_norm, pruning: `weight` recomputed from weight_orig / weight_g)."""
    if torch.nn.utils.parametrize.is_parametrized(m):
        raise ValueError("parametrized (weight_norm / spectral_norm / ...): torch's module keeps its parametrization")
    names = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    extra = names - {"weight", "bias", "in_proj_weight", "in_proj_bias", "q_proj_weight",
                     "k_proj_weight", "v_proj_weight", "bias_k", "bias_v"}
    if extra or not all(isinstance(getattr(m, n, None), (nn.Parameter, type(None))) for n in ("weight", "bias")
                        if hasattr(m, n)):
        raise ValueError(f"weights computed by a hook (pruning / weight_norm: {', '.join(sorted(extra)) or 'weight'}): "
                         "torch's module keeps them")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """The user's hooks of `old` (forward, pre-forward, backward, state_dict) serve `new`."""
    if new is old:
        return
    for attr in _HOOK_DICTS:
        theirs, ours = getattr(old, attr, None), getattr(new, attr, None)
        if theirs is None or ours is None:
            continue
        theirs.update(ours)  # ours (e.g. LayerNorm's _keep_own_forward) after the user's
        setattr(new, attr, theirs)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


# exact type -> converter; subclasses are left alone (they may change behaviour: LoRA,
# quantized layers, MultiheadAttention's out_proj, which our MultiheadAttention serves itself)
CONVERTERS: Dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.MultiheadAttention: _convert_mha,
    nn.RMSNorm: _convert_rms_norm,
    nn.LayerNorm: _convert_layer_norm,
    nn.Linear: _convert_linear,
    nn.Embedding: _convert_embedding,
}


def replace_modules(model: nn.Module, *, include: Optional[Iterable[str]] = None,
                    exclude: Iterable[str] = (), verbose: bool = False) -> nn.Module:
    """Swaps every torch.nn.MultiheadAttention, torch.nn.RMSNorm, torch.nn.LayerNorm,
    torch.nn.Linear and torch.nn.Embedding (exact types) of `model` that these kernels can serve
    (norms over the last dim only, embeddings without max_norm / scale_grad_by_freq / sparse;
    others are left, with the reason in the report). include/exclude filter by type name
    ("MultiheadAttention", "RMSNorm", "LayerNorm", "Linear", "Embedding") or by module name prefix. Conversion of every module is done first; if one fails, nothing is
    changed and the error is raised. Returns the model; the report is in
    `model.truthgpt_report` (and logged, or printed with verbose=True)."""
    include = None if include is None else set(include)
    exclude = set(exclude)

    def wanted(name: str, module: nn.Module) -> bool:
        keys = {type(module).__name__} | {name[: i] for i in range(len(name) + 1)}
        return (include is None or keys & include) and not keys & exclude

    report = ReplaceReport()
    plan = []
    for name, module in model.named_modules():
        convert = CONVERTERS.get(type(module))
        if convert is None or not wanted(name, module):
            continue
        if not name:
            report.skipped.append(("<model>", "the top-level module cannot be swapped in place; "
                                   "wrap it in a container"))
            continue
        try:
            _check_plain(module)
            plan.append((name, module, convert(module)))
        except ValueError as e:
            report.skipped.append((name, str(e)))
    for name, old, new in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        _carry_hooks(old, new)
        setattr(parent, attr, new)
        report.swapped.append((name, type(new).__name__))
    model.truthgpt_report = report
    (print if verbose else log.info)(str(report))
    return model
