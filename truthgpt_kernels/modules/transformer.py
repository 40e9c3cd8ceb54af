"""TransformerBlock (pre-norm) and Transformer: a decoder-only causal LM, a bidirectional
encoder, or an encoder-decoder with cross-attention, built from a TransformerConfig.

    model = Transformer(TransformerConfig.preset("tiny"))
    logits = model(tokens)                       # (B, S, vocab)
    logits, loss = model(tokens, targets)        # targets: -100 = ignore
    _, loss = model(tokens, targets, return_logits=False)  # fused LM head + loss: no logits
    out = model.generate(prompt, 32, temperature=0.8, top_p=0.9)
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import TransformerConfig
from ..ops.linear_cross_entropy import linear_cross_entropy
from ..validation import autocast_dtype
from .attention import Attention, KVCache
from .embeddings import (Embedding, LearnedPositionalEmbedding, RelativePositionBias,
                         SinusoidalPositionalEmbedding)
from .feed_forward import MLP, GeGLU, MoE, SwiGLU
from .norm import LayerNorm, RMSNorm, add_norm, make_norm
from .packing import Packed
from .paged import PagedKVCache, make_paged_caches
from .linear import Linear


class TransformerBlock(nn.Module):
    """x + attn(norm(x)) [+ cross_attn(norm(x), context)] then + ffn(norm(x))."""

    def __init__(self, config: TransformerConfig, *, causal: bool = True,
                 cross_attention: bool = False, device=None):
        super().__init__()
        c = config
        dt = c.torch_dtype
        norm = dict(backend=c.op_backend, device=device, dtype=dt)
        attn = dict(bias=c.bias, dropout=c.dropout, attn_dropout=c.attn_dropout,
                    max_seq_len=c.max_seq_len, softcap=c.softcap,
                    backend=c.attention_backend, device=device, dtype=dt)
        window = tuple(c.window) if isinstance(c.window, list) else c.window
        self.attn_norm = make_norm(c.norm, c.d_model, c.norm_eps, **norm)
        self.attn = Attention(c.d_model, c.n_heads, c.kv_heads, causal=causal,
                              position=c.position if c.position in ("rope", "alibi", "relative") else "none",
                              window=window, sparsity=c.sparsity, rope_base=c.rope_base,
                              rope_scaling=c.rope_scaling, rotary_dim=c.rotary_dim, **attn)
        if cross_attention:
            self.cross_norm = make_norm(c.norm, c.d_model, c.norm_eps, **norm)
            self.cross_attn = Attention(c.d_model, c.n_heads, c.kv_heads, causal=False,
                                        position="none", **attn)
        else:
            self.cross_norm = self.cross_attn = None
        self.ffn_norm = make_norm(c.norm, c.d_model, c.norm_eps, **norm)
        ffn = dict(bias=c.bias, dropout=c.dropout, device=device, dtype=dt)
        if c.ffn == "swiglu":
            self.ffn = SwiGLU(c.d_model, c.ffn_dim, backend=c.op_backend, **ffn)
        elif c.ffn == "geglu":  # tanh-approximated GELU, as Gemma
            self.ffn = GeGLU(c.d_model, c.ffn_dim, approximate="tanh", backend=c.op_backend, **ffn)
        elif c.ffn == "mlp":
            self.ffn = MLP(c.d_model, c.ffn_dim, **ffn)
        else:
            self.ffn = MoE(c.d_model, c.ffn_dim, c.n_experts, c.experts_top_k,
                           capacity_factor=c.capacity_factor, aux_loss_weight=c.moe_aux_loss_weight,
                           backend=c.op_backend, **ffn)

    def forward(self, x: Tensor, *, context: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, cross_cache: Optional[KVCache] = None,
                key_mask: Optional[Tensor] = None, context_mask: Optional[Tensor] = None,
                packed: Optional[Packed] = None, position_bias=None,
                pending: Optional[Tensor] = None, defer: bool = False):
        """The block on the residual stream x (B, S, d). pending: a residual branch of the block
        before, not yet added to x (added here, fused with the first norm). defer: return
        (x, ffn branch) with the last add left to the caller (the next block or the final norm),
        instead of their sum."""
        if pending is None:
            h = self.attn_norm(x)
        else:
            h, x = add_norm(self.attn_norm, pending, x)          # x + pending, and its norm
        a = self.attn(h, cache=cache, key_mask=key_mask, packed=packed,
                      position_bias=position_bias)               # (B, S, d)
        if self.cross_attn is not None:
            h, x = add_norm(self.cross_norm, a, x)               # x + a, and its norm
            a = self.cross_attn(h, context=context, cache=cross_cache, key_mask=context_mask)
        h, x = add_norm(self.ffn_norm, a, x)
        f = self.ffn(h)                                          # (B, S, d)
        return (x, f) if defer else x + f


@dataclass
class ModelCache:
    """Everything generate() keeps between steps: a KVCache per self-attention layer, one per
    cross-attention layer (filled from the encoder output on the first step), and that output."""
    layers: List[KVCache]
    cross: List[Optional[KVCache]] = field(default_factory=list)
    context: Optional[Tensor] = None
    context_mask: Optional[Tensor] = None

    @property
    def pos(self) -> int:
        return self.layers[0].pos

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len

    def reset(self) -> "ModelCache":
        for c in self.layers + [c for c in self.cross if c is not None]:
            c.reset()
        self.context = self.context_mask = None
        return self


class Transformer(nn.Module):
    """The model a TransformerConfig describes (Transformer(config) or Transformer(**fields))."""

    def __init__(self, config: Optional[TransformerConfig] = None, *, device=None, **overrides):
        super().__init__()
        if config is None:
            config = TransformerConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = c = config
        dt = c.torch_dtype
        self.embed = Embedding(c.vocab_size, c.d_model, device=device, dtype=dt)
        if c.position == "sinusoidal":
            self.pos_embed = SinusoidalPositionalEmbedding(c.max_seq_len, c.d_model, device=device)
        elif c.position == "learned":
            self.pos_embed = LearnedPositionalEmbedding(c.max_seq_len, c.d_model, device=device, dtype=dt)
        else:
            self.pos_embed = None
        self.drop = nn.Dropout(c.dropout)
        # T5: one relative bias per stack, shared by its layers (encoders bidirectional); its
        # table in float32 (the kernels add it in float32), float64 in a float64 model
        rel = dict(num_buckets=c.relative_buckets, max_distance=c.relative_max_distance, device=device,
                   dtype=torch.float64 if dt == torch.float64 else torch.float32)
        self.rel_pos = (RelativePositionBias(c.n_heads, bidirectional=not c.causal, **rel)
                        if c.position == "relative" else None)
        self.encoder_rel_pos = (RelativePositionBias(c.n_heads, bidirectional=True, **rel)
                                if c.position == "relative" and c.model_type == "encoder_decoder" else None)
        if c.model_type == "encoder_decoder":
            self.encoder = nn.ModuleList(TransformerBlock(c, causal=False, device=device)
                                         for _ in range(c.encoder_layers))
            self.encoder_norm = make_norm(c.norm, c.d_model, c.norm_eps, backend=c.op_backend,
                                          device=device, dtype=dt)
        else:
            self.encoder = self.encoder_norm = None
        self.layers = nn.ModuleList(
            TransformerBlock(c, causal=c.causal, cross_attention=c.model_type == "encoder_decoder",
                             device=device) for _ in range(c.n_layers))
        self.norm = make_norm(c.norm, c.d_model, c.norm_eps, backend=c.op_backend, device=device, dtype=dt)
        self.lm_head = Linear(c.d_model, c.vocab_size, bias=False, device=device, dtype=dt)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gradient_checkpointing = c.gradient_checkpointing
        self._moe = [m for m in self.modules() if isinstance(m, MoE)]
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 init: N(0, init_std) weights, zero biases, residual output projections scaled
        by 1 / sqrt(2 * layers)."""
        std = self.config.init_std
        depth = len(self.layers) + (len(self.encoder) if self.encoder is not None else 0)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                scaled = last in ("out", "down", "fc2")
                nn.init.normal_(m.weight, 0.0, std / math.sqrt(2 * depth) if scaled else std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, LayerNorm, RMSNorm)):
                m.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n

    # ------------------------------------------------------------------ checks
    def _check_tokens(self, name: str, tokens, offset: int = 0) -> None:
        if not isinstance(tokens, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must hold integer token ids (int64 or int32), got {tokens.dtype}")
        if tokens.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, seq), got {tuple(tokens.shape)}")
        S = tokens.shape[1]
        if S < 1:
            raise ValueError(f"{name} is empty (seq length 0)")
        if offset + S > self.config.max_seq_len:
            where = f" at cache position {offset}" if offset else ""
            raise ValueError(f"{name}: sequence length {S}{where} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        if not torch.compiler.is_compiling() and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{name}: token ids must lie in [0, {self.config.vocab_size}) "
                                 f"(vocab_size), got values in [{lo}, {hi}]")

    # ------------------------------------------------------------------ forward
    def embed_tokens(self, tokens: Tensor, offset: int = 0,
                     position_ids: Optional[Tensor] = None) -> Tensor:
        x = self.embed(tokens)                                   # (B, S, d)
        if self.pos_embed is not None:
            if position_ids is None:
                x = x + self.pos_embed(tokens.shape[1], offset).to(x.dtype)   # (S, d)
            else:
                x = x + self.pos_embed(self.config.max_seq_len)[position_ids].to(x.dtype)
        return self.drop(x)

    def _run(self, layer, x, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
                and kwargs.get("cache") is None:  # a cache must not be appended to twice
            return checkpoint(layer, x, use_reentrant=False, **kwargs)
        return layer(x, **kwargs)

    def _stack(self, layers, norm, x: Tensor, kwargs=lambda i: {}) -> Tensor:
        """norm(layers(x)), kwargs(i) the i-th layer's arguments. Each block leaves its last
        residual add to the next block's first norm (and the last block to `norm`), where
        add_norm fuses it (tk.add_rms_norm): one pass over the stream per add instead of two."""
        pending = None
        for i, layer in enumerate(layers):
            x, pending = self._run(layer, x, pending=pending, defer=True, **kwargs(i))
        return norm(x) if pending is None else add_norm(norm, pending, x)[0]

    def encode(self, tokens: Tensor, *, key_mask: Optional[Tensor] = None) -> Tensor:
        """The encoder stack of an encoder_decoder model: (B, Sc) ids -> (B, Sc, d_model)."""
        if self.encoder is None:
            raise ValueError(f"encode() needs an encoder_decoder model, this is a {self.config.model_type}")
        self._check_tokens("encoder_tokens", tokens)
        x = self.embed_tokens(tokens)
        bias = {} if self.encoder_rel_pos is None else {"position_bias": self.encoder_rel_pos()}
        return self._stack(self.encoder, self.encoder_norm, x, lambda i: dict(key_mask=key_mask, **bias))

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None, *,
                encoder_tokens: Optional[Tensor] = None, cache: Optional[ModelCache] = None,
                key_mask: Optional[Tensor] = None, encoder_key_mask: Optional[Tensor] = None,
                return_logits: bool = True, position_ids: Optional[Tensor] = None,
                cu_seqlens: Optional[Tensor] = None):
        """tokens (B, S) int ids -> logits (B, S, vocab). With targets (B, S) (-100 = ignore):
        (logits, loss), the loss (mean over the counted tokens) including the MoE
        load-balancing loss. With targets and return_logits=False: (None, loss), the LM head
        and the cross-entropy fused in tk.linear_cross_entropy, so that no (B, S, vocab)
        logits tensor exists in the forward or the backward (as Liger-Kernel's fused linear
        cross-entropy); what training loops that only need the loss should pass.
        encoder_tokens: the source sequence of an encoder_decoder model. cache: from
        make_cache(), for decoding. Packed batches (several documents per row, none attending
        to another, positions restarting at each): position_ids (B, S) that restart at each
        document (as transformers' packing collators make), or cu_seqlens int32 (N + 1,), the
        document boundaries over the B * S flattened tokens (every row start among them);
        attention runs through tk.attention_varlen, nothing is padded or masked densely."""
        if not isinstance(return_logits, bool):
            raise TypeError(f"return_logits must be True or False, got {return_logits!r}")
        if not return_logits and targets is None:
            raise ValueError("return_logits=False needs targets: without them the logits are "
                             "the only output")
        offset = cache.pos if cache is not None else 0
        if cache is not None and self.config.model_type == "encoder":
            raise ValueError("a KV cache is for decoding; an encoder model is bidirectional "
                             "(every token sees the ones after it), so it runs without one")
        self._check_tokens("tokens", tokens, offset)
        context, context_mask = None, None
        if self.encoder is not None:
            if cache is not None and cache.context is not None:
                context, context_mask = cache.context, cache.context_mask
            else:
                if encoder_tokens is None:
                    raise ValueError("an encoder_decoder model needs encoder_tokens (the source sequence)")
                context, context_mask = self.encode(encoder_tokens, key_mask=encoder_key_mask), encoder_key_mask
                if cache is not None:
                    cache.context, cache.context_mask = context, context_mask
        elif encoder_tokens is not None:
            raise ValueError(f"encoder_tokens given to a {self.config.model_type} model")

        packed = self._packed(tokens, position_ids, cu_seqlens, cache, key_mask)
        x = self.embed_tokens(tokens, offset, None if packed is None else packed.position_ids)  # (B, S, d)
        bias = {} if self.rel_pos is None else {"position_bias": self.rel_pos()}
        h = self._stack(self.layers, self.norm, x, lambda i: dict(
            context=context, key_mask=key_mask, context_mask=context_mask,
            **({} if packed is None else {"packed": packed}), **bias,
            cache=cache.layers[i] if cache is not None else None,
            cross_cache=cache.cross[i] if cache is not None and cache.cross else None))  # (B, S, d)
        if targets is None:
            return self.lm_head(h)                               # (B, S, vocab)
        if not isinstance(targets, Tensor) or targets.shape != tokens.shape:
            raise ValueError(f"targets must be a tensor of shape {tuple(tokens.shape)}, got "
                             f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
        if not return_logits:
            return None, self.fused_loss(h, targets) + self.aux_loss()
        logits = self.lm_head(h)                                 # (B, S, vocab)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(), ignore_index=-100)
        return logits, loss + self.aux_loss()

    def _packed(self, tokens, position_ids, cu_seqlens, cache, key_mask) -> Optional[Packed]:
        if position_ids is None and cu_seqlens is None:
            return None
        if position_ids is not None and cu_seqlens is not None:
            raise ValueError("pass either position_ids or cu_seqlens for a packed batch, not both")
        if cache is not None or key_mask is not None or self.encoder is not None:
            raise ValueError("a packed batch (position_ids / cu_seqlens) runs without a cache, "
                             "key_mask or encoder (decoder or encoder models only)")
        if position_ids is not None:
            if tuple(getattr(position_ids, "shape", ())) != tuple(tokens.shape):
                raise ValueError(f"position_ids must have the shape of tokens {tuple(tokens.shape)}, "
                                 f"got {tuple(getattr(position_ids, 'shape', ()))}")
            return Packed.from_position_ids(position_ids.to(tokens.device))
        return Packed.from_cu_seqlens(cu_seqlens.to(tokens.device), *tokens.shape)

    def fused_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of lm_head(h) against targets (-100 = ignore) through
        tk.linear_cross_entropy (lm_head's weight, and its bias if it has one), in float32
        or x's dtype if wider; the logits are never materialised."""
        head = self.lm_head
        h2 = h.reshape(-1, h.shape[-1])
        weight, bias = head.weight, head.bias
        dt = autocast_dtype(h.device.type)
        if dt is not None:  # GEMMs in its dtype, as F.linear under it
            h2 = h2.to(dt)
            if weight.dtype != torch.float32:  # (a float32 weight stays: dW in float32)
                weight = weight.to(dt)
                bias = bias.to(dt) if bias is not None else None
        elif weight.dtype != h2.dtype:
            h2 = h2.to(weight.dtype)
        loss = linear_cross_entropy(h2, weight, targets.reshape(-1).long(), bias=bias,
                                    ignore_index=-100, reduction="mean",
                                    backend=self.config.op_backend)
        return loss.float() if loss.dtype != torch.float64 else loss

    def aux_loss(self) -> Tensor:
        """The MoE load-balancing losses of the last forward (0 without MoE layers)."""
        if not self._moe:
            return torch.zeros((), device=self.embed.weight.device)
        return sum(m.aux_loss for m in self._moe)

    # ------------------------------------------------------------------ decoding
    def make_cache(self, batch_size: int, max_len: Optional[int] = None, *,
                   context_len: Optional[int] = None) -> ModelCache:
        """Preallocated KV caches for every layer (max_len defaults to max_seq_len)."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if max_len > self.config.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds max_seq_len {self.config.max_seq_len}")
        layers = [layer.attn.make_cache(batch_size, max_len) for layer in self.layers]
        cross = []
        if self.encoder is not None:
            n = context_len or self.config.max_seq_len
            cross = [layer.cross_attn.make_cache(batch_size, n) for layer in self.layers]
        return ModelCache(layers, cross)

    @torch.no_grad()
    def generate(self, tokens: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 encoder_tokens: Optional[Tensor] = None,
                 encoder_key_mask: Optional[Tensor] = None, page_size: int = 64,
                 compile: bool = False):
        """Continues tokens (B, S) by max_new_tokens with the KV cache; returns (B, S + n).
        temperature 0 is greedy; top_k / top_p (nucleus) restrict sampling. After eos_id a
        sequence keeps emitting eos_id; generation stops when every sequence has.

        tokens may also be a list of 1-D prompts of different lengths (decoder models): they
        are decoded together with a paged KV cache (page_size tokens a page; prompts prefilled
        as packed documents, no padding), each stopping on its own at eos_id; returns the list
        of prompt + generated tokens, each ending at its eos_id or after max_new_tokens.

        compile=True (decoder models): the one-token decoding step runs through
        torch.compile(fullgraph=True) on static shapes (a paged cache allocated once, positions
        and lengths as tensors, tk.attention_with_kvcache appending in place), compiled on the
        first call and reused by later calls of the same shapes; a (B, S) batch then decodes as
        B prompts of length S and the result is padded with eos_id as the eager path pads it."""
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be True or False, got {compile!r}")
        if self.config.model_type == "encoder":
            raise ValueError("generate() needs a decoder or encoder_decoder model; this is an encoder")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        ragged = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                      generator=generator, page_size=page_size, compile=compile)
        if isinstance(tokens, (list, tuple)):
            return self._generate_ragged(list(tokens), max_new_tokens, **ragged)
        self._check_tokens("tokens", tokens)
        if compile:
            if encoder_tokens is not None:
                raise ValueError("generate(compile=True) serves decoder models; an encoder_decoder "
                                 "model decodes eagerly (compile=False)")
            outs = self._generate_ragged(list(tokens), max_new_tokens, **ragged)
            n = max(o.shape[0] for o in outs)  # shorter rows ended at eos_id: padded with it
            return torch.stack([F.pad(o, (0, n - o.shape[0]), value=eos_id if eos_id is not None else 0)
                                for o in outs])
        B, S = tokens.shape
        if S + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens == 0:
            return tokens
        was_training = self.training
        self.eval()
        try:
            ctx_len = encoder_tokens.shape[1] if isinstance(encoder_tokens, Tensor) and encoder_tokens.dim() == 2 else None
            cache = self.make_cache(B, S + max_new_tokens, context_len=ctx_len)
            logits = self(tokens, encoder_tokens=encoder_tokens, cache=cache,
                          encoder_key_mask=encoder_key_mask)[:, -1]        # (B, vocab)
            out = [tokens]
            done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
            for step in range(max_new_tokens):
                nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator).to(tokens.dtype)         # (B, 1)
                if eos_id is not None:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                    done |= nxt[:, 0] == eos_id
                out.append(nxt)
                if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                    break
                logits = self(nxt, cache=cache)[:, -1]
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)


    def _decode_step(self, nxt: Tensor, seqlens: Tensor, block_table: Tensor, ks: List[Tensor],
                     vs: List[Tensor]) -> Tensor:
        """One decoding step on paged caches: token nxt[b] (B, 1) at position seqlens[b] of
        sequence b, its keys appended in place; returns the next-token logits (B, vocab).
        Static shapes, no host sync: what generate(compile=True) compiles."""
        x = self.embed_tokens(nxt, 0, seqlens.long()[:, None])           # (B, 1, d)
        bias = {} if self.rel_pos is None else {"position_bias": self.rel_pos()}
        h = self._stack(self.layers, self.norm, x,
                        lambda i: dict(cache=PagedKVCache(ks[i], vs[i], block_table, seqlens), **bias))
        return self.lm_head(h)[:, -1]

    def _generate_ragged(self, prompts: List[Tensor], max_new_tokens: int, *, temperature, top_k,
                         top_p, eos_id, generator, page_size, compile) -> List[Tensor]:
        what = "generate(compile=True)" if compile else "generate() with a list of prompts"
        if self.config.model_type != "decoder":
            raise ValueError(f"{what} needs a decoder model")
        if not prompts:
            raise ValueError("tokens: the list of prompts is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, Tensor) or p.dim() != 1:
                raise ValueError(f"tokens[{i}] must be a 1-D tensor of token ids (one prompt), got "
                                 f"{tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}")
            self._check_tokens(f"tokens[{i}]", p[None])
            if p.shape[0] + max_new_tokens > self.config.max_seq_len:
                raise ValueError(f"tokens[{i}]: prompt ({p.shape[0]}) + max_new_tokens ({max_new_tokens}) "
                                 f"exceeds max_seq_len {self.config.max_seq_len}")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens == 0:
            return list(prompts)
        dev = prompts[0].device
        lengths = [p.shape[0] for p in prompts]
        B = len(prompts)
        attn = self.layers[0].attn
        was_training = self.training
        self.eval()
        try:
            caches = make_paged_caches(len(self.layers), [n + max_new_tokens for n in lengths],
                                       attn.n_kv_heads, attn.head_dim, page_size=page_size, device=dev,
                                       dtype=self.embed.weight.dtype)
            seqlens = caches[0].seqlens
            cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
            packed = Packed.from_cu_seqlens(cu, 1, int(cu[-1]))
            tokens = torch.cat(prompts)[None]                                 # (1, T)
            x = self.embed_tokens(tokens, 0, packed.position_ids)
            bias = {} if self.rel_pos is None else {"position_bias": self.rel_pos()}
            h = self._stack(self.layers, self.norm, x, lambda i: dict(cache=caches[i], packed=packed, **bias))
            logits = self.lm_head(h)[0, cu[1:].long() - 1]                     # (B, vocab)
            seqlens.copy_(cu[1:] - cu[:-1])
            out = [[] for _ in range(B)]
            done = torch.zeros(B, dtype=torch.bool, device=dev)
            step = _compiled_decode_step(self) if compile else self._decode_step
            for i in range(max_new_tokens):
                nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             generator=generator)                              # (B, 1)
                if eos_id is not None:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                for b in (~done).nonzero().flatten().tolist():
                    out[b].append(nxt[b])
                if eos_id is not None:
                    done |= nxt[:, 0] == eos_id
                if i == max_new_tokens - 1 or bool(done.all()):
                    break
                logits = step(nxt, seqlens, caches[0].block_table, [c.k for c in caches],
                              [c.v for c in caches])                          # (B, vocab)
                seqlens += 1
            return [torch.cat([p, torch.cat(o).to(p.dtype)]) if o else p for p, o in zip(prompts, out)]
        finally:
            self.train(was_training)


_COMPILED_STEP = None


def _compiled_decode_step(model: Transformer):
    """model._decode_step through one torch.compile(fullgraph=True) shared by every model (its
    guards specialise on the model and the shapes), created on first use."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(Transformer._decode_step, fullgraph=True)
    return lambda *args: _COMPILED_STEP(model, *args)


def check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids (B, 1) from logits (B, vocab): argmax when temperature == 0, else a draw
    from softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs           # mass of the tokens ranked above
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
