"""Model benchmark cases: a training step and KV-cache decoding of our Transformer against the
same architecture written in plain PyTorch (nn.RMSNorm, eager rotary, F.scaled_dot_product_attention,
F.silu(g) * u), with identical weights.

`PlainTransformer` is that baseline: a decoder-only Llama-style model (RoPE, GQA, SwiGLU,
RMSNorm, tied or untied head) whose state_dict keys equal ours, so
`PlainTransformer(cfg).load_state_dict(Transformer(cfg).state_dict())` gives the same model.
Tests use it as the plain-PyTorch equivalent too.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TransformerConfig
from ..modules import Transformer
from . import Case


# ============================================================================ the baseline
def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX/Llama rotary on the first 2 * cos.shape[-1] dims of x (B, H, S, D)."""
    R = 2 * cos.shape[-1]
    rot, rest = x[..., :R], x[..., R:]
    x1, x2 = rot[..., : R // 2], rot[..., R // 2:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)


class PlainAttention(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, causal=True):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x, cos, sin, cache=None):
        B, S, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = _rotate(q.view(B, S, Hq, D).transpose(1, 2), cos, sin)
        k = _rotate(k.view(B, S, Hkv, D).transpose(1, 2), cos, sin)
        v = v.view(B, S, Hkv, D).transpose(1, 2)
        if cache is not None:  # preallocated (k_buf, v_buf, [pos])
            kb, vb, pos = cache
            kb[:, :, pos[0]:pos[0] + S] = k
            vb[:, :, pos[0]:pos[0] + S] = v
            k, v = kb[:, :, :pos[0] + S], vb[:, :, :pos[0] + S]
        Sk = k.shape[2]
        if self.causal and S == Sk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
        elif self.causal and S > 1:  # chunk after a prefix: bottom-right causal mask
            mask = torch.ones(S, Sk, dtype=torch.bool, device=x.device).tril(Sk - S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hq != Hkv)
        else:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=Hq != Hkv)
        return self.out(y.transpose(1, 2).reshape(B, S, Hq * D))


class PlainSwiGLU(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class PlainBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.attn = PlainAttention(c.d_model, c.n_heads, c.kv_heads, causal=c.causal)
        self.ffn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.ffn = PlainSwiGLU(c.d_model, c.ffn_dim)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class PlainTransformer(nn.Module):
    """Plain-PyTorch decoder-only model: rope, GQA, SwiGLU, RMSNorm, no dropout."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if c.position != "rope" or c.ffn != "swiglu" or c.norm != "rmsnorm" or c.model_type == "encoder_decoder":
            raise ValueError("PlainTransformer covers rope + swiglu + rmsnorm decoder/encoder configs")
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        rd = c.rotary_dim or c.head_dim
        inv = c.rope_base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
        ang = torch.arange(c.max_seq_len, dtype=torch.float64)[:, None] * inv
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, tokens, targets=None, caches=None, pos: int = 0):
        S = tokens.shape[1]
        cos, sin = self.cos[pos:pos + S], self.sin[pos:pos + S]
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i])
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def make_caches(self, batch_size, max_len):
        c = self.config
        w = self.embed.weight
        shape = (batch_size, c.kv_heads, max_len, c.head_dim)
        pos = [0]
        return [(torch.zeros(shape, device=w.device, dtype=w.dtype),
                 torch.zeros(shape, device=w.device, dtype=w.dtype), pos) for _ in self.layers], pos

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens):
        """Greedy decoding with preallocated KV caches."""
        caches, pos = self.make_caches(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        logits = self(tokens, caches=caches)[:, -1]
        pos[0] = tokens.shape[1]
        out = [tokens]
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if step == max_new_tokens - 1:
                break
            logits = self(nxt, caches=caches, pos=pos[0])[:, -1]
            pos[0] += 1
        return torch.cat(out, dim=1)


# ============================================================================ cases
def _models(preset: str, device: str, **overrides):
    cfg = TransformerConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    plain = PlainTransformer(cfg).to(device)
    plain.load_state_dict(ours.state_dict())
    return cfg, ours, plain


def _train_step(model, opt):
    """One optimizer step; ours through the fused LM head + loss (return_logits=False, what a
    training loop that needs only the loss passes), plain PyTorch through logits + F.cross_entropy."""
    fused = {} if isinstance(model, PlainTransformer) else {"return_logits": False}

    def run(x):
        opt.zero_grad(set_to_none=True)
        _, loss = model(x["tokens"], x["targets"], **fused)
        loss.backward()
        opt.step()
        return loss
    return run


def _decode(model):
    def run(x):
        return model.generate(x["prompt"], x["new"]) if isinstance(model, PlainTransformer) \
            else model.generate(x["prompt"], x["new"], temperature=0)
    return run


def cases(device, quick):
    preset = "tiny" if quick else "small"
    out = []

    # training step: forward + backward + AdamW, fp32
    shapes: List[Tuple[int, int]] = [(2, 64)] if quick else [(1, 256)]
    if device == "cuda" and not quick:
        shapes.append((1, 2048))  # the peak-memory case of the issue
    for B, S in shapes:
        def setup(B=B, S=S):
            cfg, ours, plain = _models(preset, device)
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
            targets = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
            return {"tokens": tokens, "targets": targets, "ours": ours, "plain": plain,
                    "opt_ours": torch.optim.AdamW(ours.parameters(), lr=1e-4),
                    "opt_plain": torch.optim.AdamW(plain.parameters(), lr=1e-4)}

        cfg = _config(preset)
        out.append(Case(
            op="model", name=f"train step {preset} B{B} S{S} fp32", setup=setup,
            impls={"truthgpt": lambda x: _train_step(x["ours"], x["opt_ours"])(x),
                   "torch sdpa": lambda x: _train_step(x["plain"], x["opt_plain"])(x)},
            flops=_train_flops(cfg, B, S),
            extra={"tokens_per_call": B * S, "unit": "tokens", "preset": preset},
        ))

    # decoding with the KV cache: prefill a prompt, then greedy tokens one at a time
    B, P, N = (1, 8, 16) if quick else (1, 32, 32)

    def setup_decode():
        cfg, ours, plain = _models(preset, device)
        ours.eval()
        plain.eval()
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=g).to(device)
        return {"prompt": prompt, "new": N, "ours": ours, "plain": plain}

    out.append(Case(
        op="model", name=f"decode {preset} B{B} prompt {P} +{N} tokens kv-cache", setup=setup_decode,
        impls={"truthgpt": lambda x: _decode(x["ours"])(x),
               "torch sdpa": lambda x: _decode(x["plain"])(x)},
        extra={"tokens_per_call": B * N, "unit": "tokens", "preset": preset},
    ))

    # mixed-length batch: 8 prompts decoded together (paged KV cache) vs one after another
    lengths, N = ((4, 16, 7, 12, 9, 5, 14, 10), 8) if quick else ((16, 128, 57, 96, 33, 112, 75, 20), 64)

    def setup_ragged():
        x = setup_decode()
        g = torch.Generator().manual_seed(1)
        x["prompts"] = [torch.randint(0, x["ours"].config.vocab_size, (n,), generator=g).to(device)
                        for n in lengths]
        x["new"] = N
        return x

    out.append(Case(
        op="model", name=f"generate {preset} {len(lengths)} prompts of {min(lengths)}..{max(lengths)} "
                         f"+{N} tokens each", setup=setup_ragged,
        impls={"truthgpt batched (paged cache)": lambda x: x["ours"].generate(x["prompts"], x["new"], temperature=0),
               "ours one after another": lambda x: [x["ours"].generate(p[None], x["new"], temperature=0)
                                                    for p in x["prompts"]],
               "torch sdpa one after another": lambda x: [x["plain"].generate(p[None], x["new"])
                                                          for p in x["prompts"]]},
        extra={"tokens_per_call": len(lengths) * N, "unit": "tokens", "preset": preset,
               "target": ">= 2x one after another"},
    ))
    return out


def _config(preset):
    return TransformerConfig.preset(preset)


def _train_flops(c, B, S) -> float:
    """Forward + backward FLOPs (3x forward): matmuls of every layer, the head, attention."""
    N = B * S
    embeddings = c.vocab_size * c.d_model * (1 if c.tie_embeddings else 2)
    per_token = 2 * (c.num_parameters() - embeddings) + 2 * c.vocab_size * c.d_model  # + lm head
    attn = 2 * 2 * B * c.n_heads * S * S * c.head_dim * c.n_layers / 2  # causal half
    return 3.0 * (N * per_token + attn)
