"""Rotary benchmark cases: q and k rotated in one call (`tk.apply_rotary_qk`) against the
Hugging Face formula `q * cos + rotate_half(q) * sin` (and the same for k). Forward only (the
backward is the same kernel).

- CPU: position ids (B, S) and cos/sin tables (S, D/2) for ours; for HF, cos/sin already
  gathered per position as (B, 1, S, D), as transformers' Llama computes them once per
  forward; plus the copy-bandwidth ceiling for the same bytes.
- GPU: each of our GPU backends (CUDA C++, Triton) against HF's formula with full-width
  (1, 1, S, D) tables, float32 and bfloat16.
"""
import torch

import truthgpt_kernels as tk

from . import Case, copy_ceiling, gpu_backends


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _hf(x):
    return hf_apply_rotary_pos_emb(x["q"], x["k"], x["hf_cos"], x["hf_sin"])


def _setup(B, H, S, D, device, dtype, per_position):
    """q and k (B, H, S, D), our cos/sin tables (S, D/2) float32 and HF's full-width tables
    hf_cos/hf_sin in q's dtype: gathered per position, (B, 1, S, D), with the position ids
    `pos` (B, S) when per_position, else (1, 1, S, D)."""
    def setup():
        q = torch.randn(B, H, S, D, device=device, dtype=dtype)
        k = torch.randn(B, H, S, D, device=device, dtype=dtype)
        cos, sin = tk.rotary_cos_sin(S, D, device=device)
        x = {"q": q, "k": k, "cos": cos, "sin": sin}
        full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # (S, D)
        if per_position:
            x["pos"] = pos = torch.arange(S, device=device).expand(B, S)
            x["hf_cos"], x["hf_sin"] = full_cos[pos][:, None].to(dtype), full_sin[pos][:, None].to(dtype)
        else:
            x["hf_cos"], x["hf_sin"] = full_cos.to(dtype)[None, None], full_sin.to(dtype)[None, None]
        return x
    return setup


def _bytes(B, H, S, D, dtype):
    return 2 * 2 * B * H * S * D * torch.tensor([], dtype=dtype).element_size()  # read q,k; write q,k


def cases(device, quick):
    return gpu_cases(quick) if device == "cuda" else cpu_cases(quick)


def cpu_cases(quick=False, device="cpu"):
    B, H, S, D = (1, 8, 256, 128) if quick else (4, 32, 1024, 128)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = _bytes(B, H, S, D, dtype)
        out.append(Case(
            op="rotary", name=f"q+k fwd B{B} H{H} S{S} D{D} {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(_setup(B, H, S, D, device, dtype, True), nbytes, device, dtype),
            impls={"truthgpt": lambda x: tk.apply_rotary_qk(x["q"], x["k"], x["cos"], x["sin"],
                                                            position_ids=x["pos"]),
                   copy_ceiling.NAME: copy_ceiling.copy,
                   "HF q*cos+rotate_half(q)*sin": _hf},
            bytes=nbytes,
        ))
    return out


def gpu_cases(quick=False, device="cuda"):
    B, H, S, D = (1, 4, 128, 128) if quick else (4, 32, 1024, 128)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        impls = {}
        for b in gpu_backends("rotary"):
            impls[f"truthgpt {b}"] = (lambda x, b=b: tk.apply_rotary_qk(x["q"], x["k"], x["cos"], x["sin"],
                                                                      backend=b))
        impls["torch eager (HF formula)"] = _hf
        out.append(Case(op="rotary", name=f"q+k B{B} H{H} S{S} D{D} {str(dtype)[6:]}",
                        setup=_setup(B, H, S, D, device, dtype, False), impls=impls,
                        bytes=_bytes(B, H, S, D, dtype)))
    return out
