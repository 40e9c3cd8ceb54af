"""Model benchmark cases: a training step and KV-cache decoding of our Transformer against the
same architecture written in plain PyTorch (nn.RMSNorm, eager rotary, F.scaled_dot_product_attention,
F.silu(g) * u), with identical weights.

`PlainTransformer` is that baseline: a decoder-only Llama-style model (RoPE, GQA, SwiGLU,
RMSNorm, tied or untied head) whose state_dict keys equal ours, so
`PlainTransformer(cfg).load_state_dict(Transformer(cfg).state_dict())` gives the same model.
Tests use it as the plain-PyTorch equivalent too.

The cases (tiny preset and sizes with quick=True, else the small preset, ~36M parameters):
- train step = forward + backward + `torch.optim.AdamW(fused=True)` on both sides (the same
  optimizer kernel, so its time is nobody's gain), fp32 and under bf16 autocast (forward and
  loss inside torch.autocast, backward outside). Ours uses the fused LM head + loss. The B2 S1024
  cases have four impls: "truthgpt" (ours eager: the speedups are against it), "truthgpt
  compiled" (torch.compile(ours); its speedup column is compiled ms / eager ms, < 1 when
  compiling ours helps), "torch sdpa" and "torch sdpa compiled" (torch.compile(plain)). Eager
  and compiled share one model and optimizer per side; compilation happens in the warm-up call.
  Cases with compiled impls skip the peak-memory call (that warm-up call is the compilation).
- the peak-memory case (small, B1 S2048, eager; target ours <= 0.8x plain) and the B1 S256
  case take one step of each model in setup, so the AdamW state exists before the measured
  call and the peak is the step's own memory (activations, gradients, temporaries).
- decode = greedy, static preallocated KV cache on the plain side; "truthgpt compiled" is
  generate(compile=True) (the paged one-token step compiled, fullgraph). "torch sdpa compiled" runs
  the prefill and the steps through torch.compile(plain): two graphs, the prefill (pos == 0)
  and the step (pos is a Python int; once its guard pos == 0 fails, dynamo's automatic dynamic
  shapes compile the step with pos symbolic), so no recompiles after the first generate call
  (the slow test checks it); each case resets dynamo first.
"""
import contextlib

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
    def generate(self, tokens, max_new_tokens, forward=None):
        """Greedy decoding with preallocated KV caches; forward: what runs the prefill and each
        step (default self; e.g. torch.compile(self))."""
        forward = self if forward is None else forward
        caches, pos = self.make_caches(tokens.shape[0], tokens.shape[1] + max_new_tokens)
        logits = forward(tokens, caches=caches)[:, -1]
        pos[0] = tokens.shape[1]
        out = [tokens]
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            if step == max_new_tokens - 1:
                break
            logits = forward(nxt, caches=caches, pos=pos[0])[:, -1]
            pos[0] += 1
        return torch.cat(out, dim=1)


# ============================================================================ cases
TRAIN_IMPLS = ("truthgpt", "truthgpt compiled", "torch sdpa", "torch sdpa compiled")
DECODE_IMPLS = ("truthgpt", "truthgpt compiled", "torch sdpa", "torch sdpa compiled")


def _models(preset: str, device: str, **overrides):
    cfg = TransformerConfig.preset(preset, **overrides)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device)
    plain = PlainTransformer(cfg).to(device)
    plain.load_state_dict(ours.state_dict())
    return cfg, ours, plain


def _adamw(model):
    """The optimizer of every train step, the same on both sides: fused AdamW (one kernel over
    all parameters on the CPU as on CUDA), so its time is not credited to either model."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _train_step(model, opt, autocast=None):
    """One optimizer step; ours through the fused LM head + loss (return_logits=False, what a
    training loop that needs only the loss passes), plain PyTorch through logits + F.cross_entropy.
    model may be a torch.compile wrapper of either. autocast (e.g. torch.bfloat16): forward and
    loss under torch.autocast, backward and the step outside it."""
    base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module here
    fused = {} if isinstance(base, PlainTransformer) else {"return_logits": False}

    def run(x):
        opt.zero_grad(set_to_none=True)
        with _autocast(x["tokens"].device.type, autocast):
            _, loss = model(x["tokens"], x["targets"], **fused)
        loss.backward()
        opt.step()
        return loss
    return run


def _autocast(device_type, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def _decode(model, forward=None, compile=False):
    """Greedy decoding of x["prompt"] by x["new"] tokens; forward (plain only): a compiled
    forward of the same model to run the prefill and the steps; compile (ours only):
    generate(compile=True), the compiled paged decoding step."""
    if isinstance(model, PlainTransformer):
        return lambda x: model.generate(x["prompt"], x["new"], forward=forward)
    return lambda x: model.generate(x["prompt"], x["new"], temperature=0, compile=compile)


def _compiles(names) -> bool:
    return any(n.endswith(" compiled") for n in names)


def _add_compiled(run, names, make, models):
    """run[f"{key} compiled"] = make(torch.compile(models[key])) for each such impl in names.
    torch.compile is lazy: the runner's warm-up call compiles. Dynamo's caches are reset first,
    so each case compiles afresh and the cases of a run do not add up towards the recompile
    limit of a forward (past it dynamo would silently run it eagerly)."""
    if _compiles(names):
        torch._dynamo.reset()
    for key, model in models.items():
        if f"{key} compiled" in names:
            run[f"{key} compiled"] = make(key, torch.compile(model))


def _model_case(name, setup, names, **kw):
    """A Case whose setup returns x["run"][impl name] -> callable(x), for the impls in names.
    Cases with compiled impls skip peak memory (their warm-up call is the compilation)."""
    return Case(op="model", name=name, setup=setup,
                impls={n: (lambda x, n=n: x["run"][n](x)) for n in names},
                peak_memory=not _compiles(names), **kw)


def _train_case(preset, device, B, S, names, autocast=None, label=""):
    """Train step (forward + backward + fused AdamW) of ours and plain PyTorch with identical
    weights, for the impls in names (TRAIN_IMPLS order). The eager-only cases measure peak
    memory: their setup takes one step of each model first so the AdamW state exists before the
    measured call, and the peak is the step's own memory (activations, gradients, temporaries)."""
    overrides = {"max_seq_len": S} if S > _config(preset).max_seq_len else {}
    measure_peak = not _compiles(names)

    def setup():
        cfg, ours, plain = _models(preset, device, **overrides)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
        targets = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
        opts = {"truthgpt": _adamw(ours), "torch sdpa": _adamw(plain)}  # eager and compiled share
        run = {"truthgpt": _train_step(ours, opts["truthgpt"], autocast),
               "torch sdpa": _train_step(plain, opts["torch sdpa"], autocast)}
        _add_compiled(run, names, lambda key, model: _train_step(model, opts[key], autocast),
                      {"truthgpt": ours, "torch sdpa": plain})
        x = {"tokens": tokens, "targets": targets, "ours": ours, "plain": plain, "run": run}
        if measure_peak:  # the AdamW state exists before the measured call
            for n in names:
                run[n](x)
        return x

    precision = "bf16 autocast" if autocast is not None else "fp32"
    return _model_case(f"train step {preset} B{B} S{S} {precision}{label}", setup, names,
                       flops=_train_flops(_config(preset), B, S),
                       extra={"tokens_per_call": B * S, "unit": "tokens", "preset": preset,
                              "dtype": "bfloat16" if autocast is not None else "float32",
                              "optimizer": "AdamW fused"})


def _eval_models(preset, device):
    cfg, ours, plain = _models(preset, device)
    return cfg, ours.eval(), plain.eval()


def _decode_case(preset, device, B, P, N, names):
    """Greedy decoding with the KV cache: prefill a B x P prompt, then N tokens one at a time."""
    def setup():
        cfg, ours, plain = _eval_models(preset, device)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=g).to(device)
        run = {"truthgpt": _decode(ours), "torch sdpa": _decode(plain)}
        _add_compiled(run, names, lambda key, model: _decode(plain, model), {"torch sdpa": plain})
        if "truthgpt compiled" in names:  # generate(compile=True): compiled in the warm-up call
            run["truthgpt compiled"] = _decode(ours, compile=True)
        return {"prompt": prompt, "new": N, "ours": ours, "plain": plain, "run": run}

    return _model_case(f"decode {preset} B{B} prompt {P} +{N} tokens kv-cache", setup, names,
                       extra={"tokens_per_call": B * N, "unit": "tokens", "preset": preset,
                              "dtype": "float32"})


def cases(device, quick):
    preset = "tiny" if quick else "small"
    eager = TRAIN_IMPLS[::2]  # ("truthgpt", "torch sdpa")
    out = [
        # training step: forward + backward + AdamW
        _train_case(preset, device, *((2, 64) if quick else (1, 256)), eager),
        _train_case(preset, device, *((2, 32) if quick else (2, 1024)), TRAIN_IMPLS),
        _train_case(preset, device, *((2, 32) if quick else (2, 1024)), TRAIN_IMPLS, autocast=torch.bfloat16),
        # the peak-memory case (target: ours <= 0.8x plain)
        _train_case(preset, device, *((1, 128) if quick else (1, 2048)), eager, label=" peak memory"),
    ]
    # decoding with the KV cache: prefill a prompt, then greedy tokens one at a time
    out.append(_decode_case(preset, device, *((1, 8, 16) if quick else (1, 32, 32)), eager))
    for B in (1, 8):
        out.append(_decode_case(preset, device, B, *((16, 16) if quick else (128, 128)), DECODE_IMPLS))

    # mixed-length batch: 8 prompts decoded together (paged KV cache) vs one after another
    lengths, N = ((4, 16, 7, 12, 9, 5, 14, 10), 8) if quick else ((16, 128, 57, 96, 33, 112, 75, 20), 64)

    def setup_ragged():
        cfg, ours, plain = _eval_models(preset, device)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).to(device) for n in lengths]
        return {"prompts": prompts, "new": N, "ours": ours, "plain": plain}

    out.append(Case(
        op="model", name=f"generate {preset} {len(lengths)} prompts of {min(lengths)}..{max(lengths)} "
                         f"+{N} tokens each", setup=setup_ragged,
        impls={"truthgpt batched (paged cache)": lambda x: x["ours"].generate(x["prompts"], x["new"], temperature=0),
               "ours one after another": lambda x: [x["ours"].generate(p[None], x["new"], temperature=0)
                                                    for p in x["prompts"]],
               "torch sdpa one after another": lambda x: [x["plain"].generate(p[None], x["new"])
                                                          for p in x["prompts"]]},
        extra={"tokens_per_call": len(lengths) * N, "unit": "tokens", "preset": preset,
               "target": ">= 2x one after another", "dtype": "float32"},
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
