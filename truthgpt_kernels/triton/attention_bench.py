"""GPU benchmark cases of the Triton attention kernels (wired into the bench registry by
truthgpt_kernels/bench/attention.py): bf16, B 4, H 32, D 128, S 1024..16384.

- dense, causal and not, forward and forward+backward, against
  F.scaled_dot_product_attention restricted to its flash backend;
- ALiBi (causal) and a sliding window (1024 left, causal), against our own dense causal kernel;
- a block-sparse local layout (density ~ 5 blocks of 128 per row), against our dense kernel.

`flops` counts the multiply-adds of the visible score entries of "ours" (2 matmuls of
2 S_visible D flops forward; backward 2.5x forward), the usual flash-attention convention, so
each row's rate reads as ours' useful TFLOP/s; for the window and sparse cases the baseline
does more work than that count, which is the point of those cases.
"""
from typing import List

import torch
import torch.nn.functional as F

from ..bench import Case

B, H, D = 4, 32, 128
LENGTHS = (1024, 2048, 4096, 8192, 16384)
WINDOW_LEFT = 1024
SPARSE_BLOCK = 128


def _visible_pairs(S: int, causal: bool, window_left: int = -1) -> int:
    if window_left >= 0:  # causal sliding window: row i sees min(i, left) + 1 keys
        w = window_left + 1
        return S * (S + 1) // 2 if S <= w else w * (w + 1) // 2 + (S - w) * w
    return S * (S + 1) // 2 if causal else S * S


def _flops(pairs: int, backward: bool) -> float:
    fwd = 4.0 * B * H * D * pairs
    return fwd * 3.5 if backward else fwd


def _setup(S: int, **extra):
    def make():
        gen = torch.Generator(device="cuda").manual_seed(0)

        def t():
            x = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            return x.requires_grad_(True)

        q, k, v = t(), t(), t()
        inputs = {"q": q, "k": k, "v": v, "do": torch.randn_like(q)}
        for name, fn in extra.items():
            inputs[name] = fn()
        return inputs
    return make


def _ours(**kw):
    import truthgpt_kernels as tk

    def run(x):
        extra = {name: x[name] for name in ("alibi_slopes", "block_mask") if name in x}
        return tk.attention(x["q"], x["k"], x["v"], backend="triton", **kw, **extra)
    return run


def _sdpa_flash(causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(x):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)
    return run


def _fwd(fn):
    def run(x):
        with torch.no_grad():
            return fn(x)
    return run


def _fwd_bwd(fn):
    def run(x):
        out = fn(x)
        return torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["do"])
    return run


def gpu_cases(quick: bool = False) -> List[Case]:
    """The H200 benchmark cases (device "cuda"); quick: S 1024 and 2048 only."""
    import truthgpt_kernels as tk
    from truthgpt_kernels import sparse

    cases = []
    lengths = LENGTHS[:2] if quick else LENGTHS
    shape = f"bf16 B{B} H{H} D{D}"
    for S in lengths:
        for backward in (False, True):
            mode, wrap = ("fwd+bwd", _fwd_bwd) if backward else ("fwd", _fwd)
            for causal in (False, True):
                cases.append(Case(
                    op="attention", name=f"{mode} S={S} {'causal' if causal else 'full'} {shape}",
                    setup=_setup(S),
                    impls={"truthgpt triton": wrap(_ours(causal=causal)),
                           "torch sdpa flash": wrap(_sdpa_flash(causal))},
                    flops=_flops(_visible_pairs(S, causal), backward)))
            dense_causal = wrap(_ours(causal=True))
            cases.append(Case(
                op="attention", name=f"{mode} S={S} causal alibi {shape}",
                setup=_setup(S, alibi_slopes=lambda: tk.alibi_slopes(H, device="cuda")),
                impls={"truthgpt triton alibi": wrap(_ours(causal=True)),
                       "truthgpt triton dense": dense_causal},
                flops=_flops(_visible_pairs(S, True), backward)))
            cases.append(Case(
                op="attention", name=f"{mode} S={S} causal window({WINDOW_LEFT}, 0) {shape}",
                setup=_setup(S),
                impls={"truthgpt triton window": wrap(_ours(causal=True, window=(WINDOW_LEFT, 0))),
                       "truthgpt triton dense": dense_causal},
                flops=_flops(_visible_pairs(S, True, WINDOW_LEFT), backward)))
            if S >= 4096:
                def layout(S=S, device="cuda"):
                    return sparse.local_layout(S, block_size=SPARSE_BLOCK, num_local_blocks=3, device=device)
                n_blocks = int(layout(device="cpu").sum())
                cases.append(Case(
                    op="attention", name=f"{mode} S={S} local block-sparse (bs {SPARSE_BLOCK}, "
                                         f"{n_blocks} blocks) {shape}",
                    setup=_setup(S, block_mask=layout),
                    impls={"truthgpt triton sparse": wrap(_ours(block_size=SPARSE_BLOCK)),
                           "truthgpt triton dense": wrap(_ours(causal=False))},
                    flops=_flops(n_blocks * SPARSE_BLOCK * SPARSE_BLOCK, backward)))
    return cases
