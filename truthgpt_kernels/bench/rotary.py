"""Rotary benchmark cases: q and k rotated in one call (`tk.apply_rotary_qk`, position ids
(B, S), cos/sin tables (P, D/2)) against the Hugging Face formula
`q * cos + rotate_half(q) * sin` (and the same for k) with cos/sin already gathered per
position as (B, 1, S, D), as transformers' Llama computes them once per forward; plus the
copy-bandwidth ceiling for the same bytes. Forward only (the backward is the same kernel)."""
import torch

import truthgpt_kernels as tk

from . import Case, ceiling


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def hf_apply_rotary_pos_emb(q, k, cos, sin):
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def cases(device, quick):
    if device == "cuda":  # CUDA C++ and Triton against eager on the GPU
        from ..triton.small_ops_bench import rotary_cases
        return rotary_cases(device, quick)
    B, H, S, D = (1, 8, 256, 128) if quick else (4, 32, 1024, 128)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            q = torch.randn(B, H, S, D, device=device, dtype=dtype)
            k = torch.randn(B, H, S, D, device=device, dtype=dtype)
            cos, sin = tk.rotary_cos_sin(S, D, device=device)  # (S, D/2) float32
            pos = torch.arange(S, device=device).expand(B, S)
            emb_cos = torch.cat((cos, cos), -1)[pos][:, None].to(dtype)  # (B, 1, S, D) as HF
            emb_sin = torch.cat((sin, sin), -1)[pos][:, None].to(dtype)
            return {"q": q, "k": k, "cos": cos, "sin": sin, "pos": pos,
                    "emb_cos": emb_cos, "emb_sin": emb_sin}
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = 2 * 2 * B * H * S * D * elem  # read q,k; write q,k
        out.append(Case(
            op="rotary", name=f"q+k fwd B{B} H{H} S{S} D{D} {str(dtype)[6:]}",
            setup=ceiling.with_copy(setup, nbytes, device, dtype),
            impls={"truthgpt": lambda x: tk.apply_rotary_qk(x["q"], x["k"], x["cos"], x["sin"],
                                                            position_ids=x["pos"]),
                   ceiling.NAME: ceiling.copy,
                   "HF q*cos+rotate_half(q)*sin": lambda x: hf_apply_rotary_pos_emb(
                       x["q"], x["k"], x["emb_cos"], x["emb_sin"])},
            bytes=nbytes,
        ))
    return out
