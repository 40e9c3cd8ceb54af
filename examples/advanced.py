"""Advanced: the building blocks on their own, and model variants from the config.

    python examples/advanced.py
"""
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.modules import Attention, MoE, RMSNorm, SwiGLU

torch.manual_seed(0)
x = torch.randn(2, 64, 128)                               # (batch, seq, d_model)

# Attention: grouped-query (8 query heads, 2 kv heads), rotary, sliding window of 16 tokens
attn = Attention(128, n_heads=8, n_kv_heads=2, position="rope", window=16)
print("GQA + window:", tuple(attn(x).shape))

# ALiBi positions and a block-sparse BigBird layout (blocks of 16 tokens)
sparse_attn = Attention(128, 8, position="alibi",
                        sparsity={"layout": "bigbird", "block_size": 16, "num_random_blocks": 1})
print("ALiBi + BigBird:", tuple(sparse_attn(x).shape))

# Incremental decoding with a preallocated KV cache: same result as the full sequence
cache = attn.make_cache(batch_size=2, max_len=64)
steps = [attn(x[:, :60], cache=cache)] + [attn(x[:, t:t + 1], cache=cache) for t in range(60, 64)]
print("KV cache == full:", torch.allclose(torch.cat(steps, 1), attn(x), atol=1e-5))

# Cross-attention (queries from x, keys/values from a context) with a padding mask
context = torch.randn(2, 10, 128)
key_mask = torch.tensor([[True] * 10, [True] * 7 + [False] * 3])
cross = Attention(128, 8, causal=False, position="none")
print("cross-attention:", tuple(cross(x, context=context, key_mask=key_mask).shape))

# Feed-forward layers and RMSNorm (a drop-in for torch.nn.RMSNorm)
norm = RMSNorm(128, eps=1e-6)
ffn = SwiGLU(128, 344)
moe = MoE(128, 344, n_experts=4, top_k=2, capacity_factor=1.0)
y = moe(norm(x)) + ffn(norm(x))
print(f"MoE: aux loss {moe.aux_loss.item():.3f}, tokens dropped by capacity {moe.dropped_tokens}")

# Model variants are config fields
for kind in (dict(model_type="encoder", position="learned", norm="layernorm", ffn="mlp"),
             dict(model_type="encoder_decoder", n_encoder_layers=2, position="sinusoidal"),
             dict(ffn="moe", n_experts=4, attention="sliding_window", window=32)):
    cfg = tk.TransformerConfig.preset("tiny", **kind)
    model = tk.Transformer(cfg)
    src = torch.randint(0, 256, (2, 12))
    extra = {"encoder_tokens": src} if cfg.model_type == "encoder_decoder" else {}
    _, loss = model(src, src, **extra)
    loss.backward()
    print(f"{cfg.model_type:16s} {cfg.num_parameters():>8,} params, loss {loss.item():.2f}")

# Sampling: temperature, top-k, top-p (nucleus), with a seeded generator
model = tk.Transformer(tk.TransformerConfig.preset("tiny"))
out = model.generate(torch.tensor([[49, 50, 51]]), 10, temperature=0.8, top_k=50, top_p=0.9,
                     generator=torch.Generator().manual_seed(0))
print("sampled:", out.tolist())

# Choose the kernels: per model (config.backend), or for a block of code
with tk.use_backend("reference"):
    model(torch.randint(0, 256, (1, 8)))
