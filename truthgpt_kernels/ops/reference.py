"""Pure-PyTorch reference of every op: the executable spec (DESIGN.md).

Two layers:
- the public-signature functions (`attention`, `alibi_slopes`, `rotary_cos_sin`,
  `apply_rotary`, `swiglu`, `rms_norm`) state the semantics plainly and are differentiable
  with ordinary autograd; tests evaluate them in float64 as ground truth;
- the kernel-level functions (`<op>_fwd`, `<op>_bwd`) are the `"reference"` backend: the same
  signatures as the C++/CUDA/Triton kernels (see csrc/registration.cpp), with backward
  formulas written out (custom-op implementations run below autograd).

Low-precision inputs are computed in float32 and cast back; float64 stays float64.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The attention ops' log-sum-exp: float32, float64 for float64 inputs (so the backward's
    recomputed probabilities of a float64 call are float64-exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- attention
def alibi_slopes(n_heads: int, device=None) -> Tensor:
    """Press et al. (2022): for n a power of two, 2^(-8i/n), i = 1..n. Otherwise the slopes of
    the next lower power of two, then every other slope of the next higher one."""

    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    def slopes(n):
        if math.log2(n).is_integer():
            return power_of_two(n)
        lower = 2 ** math.floor(math.log2(n))
        return power_of_two(lower) + slopes(2 * lower)[0::2][: n - lower]

    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    return torch.tensor(slopes(n_heads), dtype=torch.float32, device=device)


def attention_visibility(B, Hq, Sq, Sk, *, causal=False, window=None, block_mask=None,
                         block_size=64, key_mask=None, device=None) -> Tensor:
    """Bool (B or 1, Hq or 1, Sq, Sk): may query i attend key j. Queries sit at
    i' = i + Sk - Sq (bottom-right alignment); all masks combine with AND."""
    i = torch.arange(Sq, device=device)[:, None] + (Sk - Sq)  # (Sq, 1) absolute position
    j = torch.arange(Sk, device=device)[None, :]              # (1, Sk)
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        vis &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            vis &= j >= i - left
        if right >= 0:
            vis &= j <= i + right
    vis = vis[None, None]
    if block_mask is not None:
        bi = torch.arange(Sq, device=device) // block_size
        bj = torch.arange(Sk, device=device) // block_size
        vis = vis & block_mask[:, :, bi][:, :, :, bj]
    if key_mask is not None:
        vis = vis & key_mask[:, None, None, :]
    return vis


def t5_relative_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                       max_distance: int = 128) -> Tensor:
    """T5's bucket of a relative position (memory position - query position), as Mesh
    TensorFlow and transformers' T5Attention._relative_position_bucket compute it: exact
    buckets for small distances, log-spaced ones up to max_distance, the last bucket beyond;
    bidirectional splits the buckets between keys after and before the query."""
    rel = relative_position.long()
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    # (log in float32, as transformers does, so the buckets match it exactly)
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


def rel_bias_by_distance(rel_bias: Tensor, Sq: int, Sk: int, bidirectional: bool, num_buckets: int,
                         max_distance: int) -> Tensor:
    """The kernels' form of a T5 bias table: (Hq, Sq + Sk - 1) float32 with entry
    [h, j - i + Sq - 1] = rel_bias[h, bucket(j - i')], i' = i + Sk - Sq (bottom-right aligned
    like causal). A gather through a one-hot matrix, so its gradient (the kernels return the
    gradient by distance) folds back into the buckets by a deterministic matmul, in the
    table's dtype also under autocast (a gather must not round the table to bfloat16)."""
    dist = torch.arange(max(Sq + Sk - 1, 0), device=rel_bias.device) - (Sk - 1)  # j - i'
    bucket = t5_relative_bucket(dist, bidirectional, num_buckets, max_distance)
    onehot = torch.nn.functional.one_hot(bucket, num_buckets).to(rel_bias.dtype)  # (L, nb)
    with torch.autocast(rel_bias.device.type, enabled=False):
        return rel_bias @ onehot.T


# Philox4x32-10 in int64 tensor arithmetic: the stream of csrc/common/philox.h, bit for bit.
_M32 = 0xFFFFFFFF


def philox_words(seed: int, counter: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit output words (as int64 tensors) of Philox4x32-10 for 64-bit counters
    `counter` (int64 tensor; c0 = low half, c1 = high half, c2 = c3 = 0) and key `seed`."""
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = c3 = torch.zeros_like(counter)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        pa, pb = c0 * 0xD2511F53, c2 * 0xCD9E8D57  # (products wrap in int64; the bits are right)
        c0, c1, c2, c3 = (((pb >> 32) & _M32) ^ c1 ^ k0, pb & _M32, ((pa >> 32) & _M32) ^ c3 ^ k1,
                          pa & _M32)
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    return min(int(math.floor(p * 4294967296.0)), _M32)


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device=None) -> Tensor:
    """bool (B, Hq, Sq, Sk): which attention probabilities dropout with probability p and
    this seed keeps; element e (row-major index) keeps iff word e & 3 of Philox(e >> 2, seed)
    is >= floor(p 2^32). The mask every backend's kernel draws (csrc/common/philox.h)."""
    e = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    words = torch.stack(philox_words(int(seed), e >> 2), -1)  # (n, 4)
    w = words.gather(1, (e & 3)[:, None]).squeeze(1)
    return (w >= dropout_threshold(p)).reshape(tuple(shape))


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal=False, scale=None, alibi_slopes=None,
              window=None, block_mask=None, block_size=64, key_mask=None, softcap=0.0,
              rel_bias=None, rel_buckets=None, dropout_p=0.0, dropout_seed=None,
              dropout_mask=None, return_lse=False):
    """softmax(scale * q k^T [softcapped] - slope * |i' - j| + rel_bias[h, bucket(j - i')],
    masked) [dropped out] v, per DESIGN.md. rel_bias (Hq, num_buckets) with rel_buckets =
    (bidirectional, num_buckets, max_distance) (default: (not causal, rel_bias.shape[1], 128));
    dropout multiplies P by keep / (1 - dropout_p) after the softmax (lse is of the undropped
    P); keep is `dropout_mask` if given, else the Philox mask of `dropout_seed`."""
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    rel_vec = keep = None
    if rel_bias is not None:
        bidirectional, nb, max_distance = rel_buckets or (not causal, rel_bias.shape[1], 128)
        rel_vec = rel_bias_by_distance(rel_bias.to(_acc(q.dtype)), Sq, Sk, bidirectional, nb, max_distance)
    if dropout_p > 0:
        keep = dropout_mask if dropout_mask is not None else dropout_keep_mask(
            dropout_seed, (B, Hq, Sq, Sk), dropout_p, q.device)
    return _attention(q, k, v, causal=causal, scale=scale, alibi_slopes=alibi_slopes, window=window,
                      block_mask=block_mask, block_size=block_size, key_mask=key_mask,
                      softcap=softcap, rel_vec=rel_vec, keep=keep, dropout_p=dropout_p,
                      return_lse=return_lse)


def _attention(q, k, v, *, causal, scale, alibi_slopes, window, block_mask, block_size, key_mask,
               softcap, rel_vec, keep, dropout_p, return_lse):
    """attention() with the bias by distance (see rel_bias_by_distance) and the keep mask."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    acc = _acc(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if Hkv != Hq:  # GQA/MQA: query head h reads kv head h // (Hq // Hkv)
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = scale * (qf @ kf.transpose(-1, -2))  # (B, Hq, Sq, Sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc).reshape(-1 if alibi_slopes.dim() == 2 else 1, Hq, 1, 1)
        pos_i = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        pos_j = torch.arange(Sk, device=q.device)[None, :]
        s = s - slopes * (pos_i - pos_j).abs().to(acc)
    if rel_vec is not None:
        s = s + _bias_matrix(rel_vec.to(acc), Sq, Sk)
    vis = attention_visibility(B, Hq, Sq, Sk, causal=causal, window=window,
                               block_mask=block_mask, block_size=block_size,
                               key_mask=key_mask, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    # rows with no visible key, or whose every visible score is -inf (an -inf in q; a NaN
    # counts as seen): lse = -inf, output 0, zero gradients, as flash-attn's and SDPA's kernels
    any_visible = (s != float("-inf")).any(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(any_visible, s, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse)  # exactly 0 where masked
    if keep is not None:
        p = torch.where(keep, p / (1 - dropout_p), 0.0)
    out = torch.where(any_visible, p @ vf, 0.0).to(q.dtype)  # (0 even if a masked v is NaN)
    lse = torch.where(any_visible, lse, float("-inf")).squeeze(-1).to(lse_dtype(q.dtype))
    return (out, lse) if return_lse else out


def _bias_matrix(rel_vec: Tensor, Sq: int, Sk: int) -> Tensor:
    """(Hq, Sq, Sk) with [h, i, j] = rel_vec[h, j - i + Sq - 1]."""
    idx = torch.arange(Sk, device=rel_vec.device)[None, :] - torch.arange(Sq, device=rel_vec.device)[:, None]
    return rel_vec[:, idx + Sq - 1]


def _bias_matrix_grad(ds: Tensor, Sq: int, Sk: int) -> Tensor:
    """Adjoint of _bias_matrix: (B, Hq, Sq, Sk) -> (Hq, Sq + Sk - 1), the sum of each diagonal
    over the batch and the rows, in a fixed order (a skewed view: no scatter, no atomics)."""
    x = ds.sum(0)  # (Hq, Sq, Sk)
    Hq, L = x.shape[0], max(Sq + Sk - 1, 0)
    if Sq == 0 or Sk == 0:
        return x.new_zeros(Hq, L)
    y = x.new_zeros(Hq, Sq, L)
    y.as_strided((Hq, Sq, Sk), (Sq * L, L - 1, 1), storage_offset=Sq - 1).copy_(x)
    return y.sum(1)


def rotary_cos_sin(seq_len: int, rotary_dim: int, *, base=10000.0, scaling=None, device=None,
                   dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """cos/sin (seq_len, rotary_dim // 2) of angle pos * inv_freq, inv_freq = base^(-2i/R).
    scaling: None, {"type": "linear", "factor"}, {"type": "ntk", "factor"} (NTK-aware base
    base * factor^(R/(R-2))), or {"type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (Llama 3.1 defaults 8, 1, 4, 8192)."""
    R = rotary_dim
    pos = torch.arange(seq_len, dtype=torch.float64, device=device)
    kind = None if scaling is None else scaling.get("type")
    if kind == "ntk":
        base = base * scaling["factor"] ** (R / (R - 2))
    inv_freq = base ** (-torch.arange(0, R, 2, dtype=torch.float64, device=device) / R)
    if kind == "linear":
        pos = pos / scaling["factor"]
    elif kind == "llama3":
        factor = scaling.get("factor", 8.0)
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angle = pos[:, None] * inv_freq[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved=False, position_ids=None,
                 offset=0) -> Tensor:
    """Rotates the first R = 2 * cos.shape[-1] dims of every head of x (B, H, S, D) by the
    angle of each token's position; pairs (x[d], x[d + R/2]) or, interleaved, (x[2d], x[2d+1])."""
    S = x.shape[2]
    R = 2 * cos.shape[-1]
    acc = _acc(x.dtype)
    if position_ids is None:
        position_ids = torch.arange(offset, offset + S, device=x.device)
    c = cos.to(acc)[position_ids]  # (S, R/2) or (B, S, R/2)
    s = sin.to(acc)[position_ids]
    if c.dim() == 3:
        c, s = c[:, None], s[:, None]  # (B, 1, S, R/2)
    xf = x.to(acc)
    rot, rest = xf[..., :R], xf[..., R:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., : R // 2], rot[..., R // 2:]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot, rest), dim=-1).to(x.dtype)


# ----------------------------------------------------------------------------- swiglu, rms_norm
def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up; with up=None the last dim of gate holds [gate | up]."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    acc = _acc(gate.dtype)
    g = gate.to(acc)
    return (g * torch.sigmoid(g) * up.to(acc)).to(gate.dtype)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight; statistics in float32, output in x's dtype."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                 eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """(rms_norm(h, weight, eps) in x's dtype, h) with h = residual + x in residual's dtype: the
    pre-norm residual stream step `h = h + sublayer(...); out = norm(h)` in one op."""
    h = (residual + x).to(residual.dtype)
    return rms_norm(h, weight, eps).to(x.dtype), h


# ============================================================= the "reference" backend kernels
# Same signatures as the kernel ops of csrc/registration.cpp. Outputs are contiguous.

def _keep_mask(q, Sk, dropout_p, dropout_seed):
    if dropout_p <= 0:
        return None
    B, Hq, Sq, _ = q.shape
    return dropout_keep_mask(int(dropout_seed), (B, Hq, Sq, Sk), dropout_p, q.device)


def attention_fwd(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask,
                  block_size, key_mask, softcap, rel_bias=None, dropout_p=0.0, dropout_seed=None):
    out, lse = _attention(q, k, v, causal=False, scale=scale, window=(window_left, window_right),
                          alibi_slopes=alibi_slopes, block_mask=block_mask,
                          block_size=block_size, key_mask=key_mask, softcap=softcap,
                          rel_vec=rel_bias, keep=_keep_mask(q, k.shape[2], dropout_p, dropout_seed),
                          dropout_p=dropout_p, return_lse=True)
    return out.contiguous(), lse.contiguous()


def attention_bwd(grad_out, q, k, v, out, lse, scale, window_left, window_right, alibi_slopes,
                  block_mask, block_size, key_mask, softcap, rel_bias=None, dropout_p=0.0,
                  dropout_seed=None):
    """The flash-attention backward written densely: dV = P_drop^T dO, dS = P (dP - delta) with
    dP = (dO V^T) keep / (1 - p), through softcap, dQ = scale dS K, dK = scale dS^T Q; GQA
    gradients summed over the query heads sharing a kv head; the bias-by-distance gradient is
    dS summed along each diagonal (and over the batch).

    P is recomputed here in the accumulation precision (a float32 lse, saved for the other
    dtypes, would leave a float64 P off by a rounding). delta = rowsum(P * dP), from the very dP values the
    subtraction uses, instead of the equal rowsum(dO * O): so a row whose probability mass
    sits on one key (P == 1 there, 0 elsewhere) gets dS exactly 0, as the constant softmax of
    one key must, rather than the rounding difference of two dot products. NaN/Inf reach the
    rows they reach in the forward; rows without a visible key get zero gradients."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    acc = _acc(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    do = grad_out.to(acc)
    kr, vr = kf.repeat_interleave(g, dim=1), vf.repeat_interleave(g, dim=1)
    raw = scale * (qf @ kr.transpose(-1, -2))
    s = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    if alibi_slopes is not None:
        pos_i = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
        pos_j = torch.arange(Sk, device=q.device)[None, :]
        s = s - alibi_slopes.to(acc).reshape(-1, Hq, 1, 1) * (pos_i - pos_j).abs().to(acc)
    if rel_bias is not None:
        s = s + _bias_matrix(rel_bias.to(acc), Sq, Sk)
    vis = attention_visibility(B, Hq, Sq, Sk, window=(window_left, window_right),
                               block_mask=block_mask, block_size=block_size,
                               key_mask=key_mask, device=q.device).expand(B, Hq, Sq, Sk)
    s = s.masked_fill(~vis, float("-inf"))
    any_visible = (s != float("-inf")).any(-1, keepdim=True)  # (as the forward's)
    lse_acc = torch.logsumexp(torch.where(any_visible, s, 0.0), dim=-1, keepdim=True)
    p = torch.where(vis, torch.exp(s - lse_acc), 0.0)
    dp = do @ vr.transpose(-1, -2)
    keep = _keep_mask(q, Sk, dropout_p, dropout_seed)
    if keep is not None:
        dv = torch.where(keep, p / (1 - dropout_p), 0.0).transpose(-1, -2) @ do
        dp = torch.where(keep, dp / (1 - dropout_p), 0.0)
    else:
        dv = p.transpose(-1, -2) @ do
    delta = torch.where(vis, p * dp, 0.0).sum(-1, keepdim=True)
    ds = torch.where(vis, p * (dp - delta), 0.0)
    drel = (_bias_matrix_grad(ds, Sq, Sk).to(rel_bias.dtype) if rel_bias is not None
            else q.new_empty(0, dtype=torch.float32))
    if softcap > 0:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = scale * (ds @ kr)
    dk = scale * (ds.transpose(-1, -2) @ qf)
    if g > 1:
        dk = dk.reshape(B, Hkv, g, Sk, D).sum(2)
        dv = dv.reshape(B, Hkv, g, Sk, D).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drel


def rotary_fwd(x, cos, sin, position_ids, interleaved):
    return apply_rotary(x, cos, sin, interleaved=interleaved, position_ids=position_ids).contiguous()


def rotary_qk_fwd(q, k, cos, sin, position_ids, interleaved):
    return rotary_fwd(q, cos, sin, position_ids, interleaved), rotary_fwd(k, cos, sin, position_ids, interleaved)


def linear_fwd(x, weight, bias):
    return torch.nn.functional.linear(x, weight, bias)


def linear_bwd(grad, x, weight, need_x, need_weight, need_bias):
    return (grad @ weight if need_x else x.new_empty(0), grad.t() @ x if need_weight else x.new_empty(0),
            grad.sum(0) if need_bias else x.new_empty(0))


def grouped_linear_fwd(x, weight, offsets):
    """Row group e of x (rows offsets[e - 1] .. offsets[e]) times weight[e]^T; rows past the
    last end are zero."""
    out = x.new_zeros(x.shape[0], weight.shape[1])
    r0 = 0
    for e, r1 in enumerate(offsets.tolist()):
        out[r0:r1] = x[r0:r1] @ weight[e].t()
        r0 = r1
    return out


def grouped_linear_bwd(grad, x, weight, offsets, need_x, need_weight):
    dx, dw = torch.zeros_like(x), torch.zeros_like(weight)
    r0 = 0
    for e, r1 in enumerate(offsets.tolist()):
        dx[r0:r1] = grad[r0:r1] @ weight[e]
        dw[e] = grad[r0:r1].t() @ x[r0:r1]
        r0 = r1
    return dx if need_x else x.new_empty(0), dw if need_weight else x.new_empty(0)


def swiglu_fwd(gate, up):
    return swiglu(gate, up).contiguous()


def swiglu_bwd(grad, gate, up):
    acc = _acc(gate.dtype)
    g, u, dy = gate.to(acc), up.to(acc), grad.to(acc)
    sig = torch.sigmoid(g)
    dgate = dy * u * sig * (1 + g * (1 - sig))
    dup = dy * g * sig
    return dgate.to(gate.dtype).contiguous(), dup.to(up.dtype).contiguous()


def rms_norm_fwd(x, weight, eps):
    acc = _acc(x.dtype)
    rstd = torch.rsqrt(x.to(acc).pow(2).mean(-1) + eps)
    return rms_norm(x, weight, eps).contiguous(), rstd.to(torch.float32)


def rms_norm_bwd(grad, x, weight, rstd):
    """y = x r w with r = rsqrt(mean(x^2) + eps):
    dx = r (dy w - x r^2 mean(dy w x)), dw = sum over rows of dy x r."""
    acc = _acc(x.dtype)
    xf, dy, r = x.to(acc), grad.to(acc), rstd.to(acc)[..., None]
    dyw = dy * weight.to(acc) if weight is not None else dy
    dx = r * (dyw - xf * r * r * (dyw * xf).mean(-1, keepdim=True))
    if weight is None:
        dw = x.new_empty(0)
    else:
        dw = (dy * xf * r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx.to(x.dtype).contiguous(), dw


def add_rms_norm_fwd(x, residual, weight, eps):
    out, h = add_rms_norm(x, residual, weight, eps)
    rstd = torch.rsqrt(h.to(_acc(h.dtype)).pow(2).mean(-1) + eps)
    return out.contiguous(), h.contiguous(), rstd.to(torch.float32)


def add_rms_norm_bwd(grad, grad_residual, h, weight, rstd, x_dtype):
    """dh = rms_norm_bwd(grad, h) + grad_residual (h's dtype); dx = dh in x_dtype (empty when
    that is h's dtype); dweight."""
    dh, dw = rms_norm_bwd(grad.to(h.dtype), h, weight, rstd)
    if grad_residual is not None:
        dh = (dh.to(_acc(h.dtype)) + grad_residual.to(_acc(h.dtype))).to(h.dtype)
    dx = dh.to(x_dtype) if x_dtype != h.dtype else h.new_empty(0)
    return dh.contiguous(), dx, dw


# ---------------------------------------------------------------- linear cross-entropy
LCE_REDUCTIONS = ("none", "mean", "sum")  # the kernel-level code of a reduction is its index


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         logit_softcap: float = 0.0, return_z_loss: bool = False):
    """F.cross_entropy(F.linear(x, weight, bias), target, ...) with the logits materialised,
    plus Liger-Kernel's options: logits -> softcap * tanh(logits / softcap) when softcap > 0
    (Gemma 2), and z_loss * logsumexp(logits)^2 added to every non-ignored row's loss (PaLM).
    Low precision is computed in float32 and the loss cast back to x's dtype."""
    acc = _acc(x.dtype)
    logits = torch.nn.functional.linear(x.to(acc), weight.to(acc),
                                        None if bias is None else bias.to(acc))
    out = _loss_of_logits(logits, target, ignore_index, reduction, label_smoothing, z_loss, logit_softcap, x.dtype)
    return out if return_z_loss else out[0]


def _loss_of_logits(z, target, ignore_index, reduction, label_smoothing, z_loss, logit_softcap, dtype):
    """(loss, z-loss term), reduced, in dtype, of logits z (N, V) in the accumulation dtype:
    softcap, F.cross_entropy per row, z_loss * logsumexp^2 on the counted rows."""
    if logit_softcap > 0:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    ce = torch.nn.functional.cross_entropy(z, target, ignore_index=ignore_index,
                                           reduction="none", label_smoothing=label_smoothing)
    valid = target != ignore_index
    zr = torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    rows = ce + zr
    if reduction == "sum":
        rows, zr = rows.sum(), zr.sum()
    elif reduction == "mean":
        n = valid.sum()
        rows, zr = rows.sum() / n, zr.sum() / n
    return rows.to(dtype), zr.to(dtype)


def linear_cross_entropy_fwd(x, weight, bias, target, grad_scale, ignore_index, label_smoothing,
                             z_loss, softcap, need_dweight, chunk_size):
    """Kernel-level reference (no chunking: logits materialised). Returns per-row (loss, z-loss
    term) in the accumulation dtype (0 on ignored rows) and, when grad_scale (per-row weights,
    (N,)) is given, the gradients (dx, dweight, dbias) of sum_i grad_scale_i * loss_i, with
    the formulas written out: for p = softmax(z'), z' the (softcapped) logits,
      dloss/dz'_j = p_j (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == target],
      dz'/dz = 1 - (z' / softcap)^2 when softcapped."""
    from ..validation import check_class_targets
    check_class_targets(target, weight.shape[0], ignore_index)
    acc = _acc(x.dtype)
    N, V = x.shape[0], weight.shape[0]
    xf, wf = x.to(acc), weight.to(acc)
    z = xf @ wf.t()
    if bias is not None:
        z = z + bias.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    lse = torch.logsumexp(z, -1)
    zt = z.gather(1, t[:, None])[:, 0]
    eps = label_smoothing
    zrow = torch.where(valid, z_loss * lse * lse, 0.0)
    smooth = eps / V * z.sum(-1) if eps != 0 else 0.0  # (a -inf logit: 0 * -inf would be NaN)
    loss = torch.where(valid, lse - (1 - eps) * zt - smooth, 0.0) + zrow
    if grad_scale is None:
        return loss, zrow, x.new_empty(0), x.new_empty(0), x.new_empty(0)
    g = torch.exp(z - lse[:, None]) * (1 + 2 * z_loss * lse[:, None]) - eps / V
    g = g - (1 - eps) * torch.nn.functional.one_hot(t, V).to(acc)
    # ignored rows: exactly 0 (also for the inf scale of a mean over no rows)
    g = torch.where(valid[:, None], g * grad_scale.to(acc)[:, None], 0.0)
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    dx = (g @ wf).to(x.dtype)
    if need_dweight:
        dw = (g.t() @ xf).to(weight.dtype)
        db = x.new_empty(0) if bias is None else g.sum(0).to(bias.dtype)
    else:
        dw, db = x.new_empty(0), x.new_empty(0)
    return loss, zrow, dx, dw, db


# ------------------------------------------------------------------------------ cross-entropy
def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0, logit_softcap: float = 0.0,
                  return_z_loss: bool = False):
    """tk.cross_entropy's spec: F.cross_entropy on logits (..., V) (class dim last), target (...),
    plus the softcap and z-loss of linear_cross_entropy; computed in float32 (float64 for
    float64), the loss returned in logits' dtype."""
    z = logits.reshape(-1, logits.shape[-1]).to(_acc(logits.dtype))
    out = _loss_of_logits(z, target.reshape(-1), ignore_index, reduction, label_smoothing, z_loss, logit_softcap,
                          logits.dtype)
    return out if return_z_loss else out[0]


def cross_entropy_fwd(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Kernel-level reference of truthgpt::cross_entropy_fwd: per-row (loss, z-loss term) in the
    accumulation dtype and, with grad_scale, d sum_i grad_scale_i loss_i / d logits in logits'
    dtype (the formulas of linear_cross_entropy_fwd, with logits given)."""
    from ..validation import check_class_targets
    N, V = logits.shape
    check_class_targets(target, V, ignore_index)
    acc = _acc(logits.dtype)
    z = logits.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    lse = torch.logsumexp(z, -1)
    zt = z.gather(1, t[:, None])[:, 0] if V else lse
    eps = label_smoothing
    zrow = torch.where(valid, z_loss * lse * lse, 0.0)
    smooth = eps / V * z.sum(-1) if eps != 0 else 0.0
    loss = torch.where(valid, lse - (1 - eps) * zt - smooth, 0.0) + zrow
    if grad_scale is None:
        return loss, zrow, logits.new_empty(0)
    g = torch.exp(z - lse[:, None]) * (1 + 2 * z_loss * lse[:, None]) - eps / V
    g = g - (1 - eps) * torch.nn.functional.one_hot(t, V).to(acc)
    g = torch.where(valid[:, None], g * grad_scale.to(acc)[:, None], 0.0)
    if softcap > 0:
        g = g * (1 - (z / softcap) ** 2)
    return loss, zrow, g.to(logits.dtype).contiguous()


def cross_entropy_grad_(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """Kernel-level reference of truthgpt::cross_entropy_grad_: cross_entropy_fwd's gradient
    written over the logits."""
    logits.copy_(cross_entropy_fwd(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap)[2])


# ----------------------------------------------------------------------------- layer_norm, geglu
def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance);
    statistics in float32 (float64 for float64), output in x's dtype."""
    acc = _acc(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


GELU_APPROXIMATIONS = ("tanh", "none")


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """x * Phi(x) ("none": Phi the standard normal CDF, via erf) or its tanh approximation
    x * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2, as F.gelu."""
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    if approximate == "none":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "tanh") -> Tensor:
    """gelu(gate, approximate) * up; with up=None the last dim of gate holds [gate | up]."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    acc = _acc(gate.dtype)
    return (gelu(gate.to(acc), approximate) * up.to(acc)).to(gate.dtype)


# "reference" backend kernels of layer_norm and geglu (signatures of csrc/registration.cpp)
def layer_norm_fwd(x, weight, bias, eps):
    acc = _acc(x.dtype)
    xf = x.to(acc)
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).pow(2).mean(-1) + eps)
    return layer_norm(x, weight, bias, eps).contiguous(), mean, rstd


def layer_norm_bwd(grad, x, weight, bias, mean, rstd):
    """xhat = (x - mean) r, g = dy w: dx = r (g - mean(g) - xhat mean(g xhat)),
    dw = sum over rows of dy xhat, db = sum over rows of dy."""
    acc = _acc(x.dtype)
    dy, r = grad.to(acc), rstd.to(acc)[..., None]
    xhat = (x.to(acc) - mean.to(acc)[..., None]) * r
    g = dy * weight.to(acc) if weight is not None else dy
    dx = r * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    rows = (-1, x.shape[-1])
    dw = (dy * xhat).reshape(rows).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = dy.reshape(rows).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw, db


def geglu_fwd(gate, up, approximate):
    return geglu(gate, up, approximate).contiguous()


def geglu_bwd(grad, gate, up, approximate):
    """dgate = dy up gelu'(gate), dup = dy gelu(gate)."""
    acc = _acc(gate.dtype)
    g, u, dy = gate.to(acc), up.to(acc), grad.to(acc)
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        th = torch.tanh(c * (g + 0.044715 * g ** 3))
        dgelu = 0.5 * (1 + th) + 0.5 * g * (1 - th * th) * c * (1 + 3 * 0.044715 * g * g)
    else:
        dgelu = 0.5 * (1 + torch.erf(g / math.sqrt(2))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    dgate = dy * u * dgelu
    dup = dy * gelu(g, approximate)
    return dgate.to(gate.dtype).contiguous(), dup.to(up.dtype).contiguous()


def _varlen_spans(cu_seqlens_q, cu_seqlens_k):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(b, cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


def _seq(t, start, end):
    """(1, H, S, D) view of rows [start, end) of a packed (total, H, D) tensor."""
    return t[start:end].transpose(0, 1).unsqueeze(0)


VARLEN_SEED_STEP = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the Weyl step between sequences' keys


def varlen_dropout_seed(dropout_seed: Optional[Tensor], b: int) -> Optional[Tensor]:
    """The dropout key of packed sequence b: dropout_seed + b * VARLEN_SEED_STEP (mod 2^64), as
    the one-element int64 tensor of the same bits (None stays None)."""
    if dropout_seed is None:
        return None
    key = (int(dropout_seed) + b * VARLEN_SEED_STEP) % 2 ** 64
    return torch.tensor(key - 2 ** 64 if key >= 2 ** 63 else key, dtype=torch.int64)


def varlen_rel_slice(rel_bias: Optional[Tensor], max_seqlen_k: int, len_q: int, len_k: int):
    """Sequence (len_q, len_k)'s bias by distance (Hq, len_q + len_k - 1) in the packed call's
    one vector (Hq, max_seqlen_q + max_seqlen_k - 1), whose entry (j - i') + max_seqlen_k - 1
    holds distance j - i' (i' = i + len_k - len_q): columns max_seqlen_k - len_k onwards."""
    if rel_bias is None:
        return None
    return rel_bias.narrow(1, max_seqlen_k - len_k, len_q + len_k - 1)


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, alibi_slopes, softcap, rel_bias=None, dropout_p=0.0,
                         dropout_seed=None):
    """Packed sequences, each through attention_fwd (its slice of the bias by distance,
    varlen_rel_slice; dropout with its own key, varlen_dropout_seed): out like q (Tq, Hq, D),
    lse (Hq, Tq)."""
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    for b, q0, q1, k0, k1 in _varlen_spans(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0 and k1 > k0:
            slopes = None if alibi_slopes is None else alibi_slopes[b:b + 1]
            o, l = attention_fwd(_seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), scale, window_left,
                                 window_right, slopes, None, 64, None, softcap,
                                 varlen_rel_slice(rel_bias, max_seqlen_k, q1 - q0, k1 - k0), dropout_p,
                                 varlen_dropout_seed(dropout_seed, b))
            out[q0:q1] = o[0].transpose(0, 1)
            lse[:, q0:q1] = l[0]
    return out, lse


def attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, window_left, window_right, alibi_slopes, softcap,
                         rel_bias=None, dropout_p=0.0, dropout_seed=None):
    """(dq, dk, dv, d rel_bias) (the last empty without rel_bias): each sequence's bias gradient
    lands in its slice of the vector's gradient."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    drel = torch.zeros_like(rel_bias) if rel_bias is not None else q.new_empty(0, dtype=torch.float32)
    for b, q0, q1, k0, k1 in _varlen_spans(cu_seqlens_q, cu_seqlens_k):
        if q1 > q0 and k1 > k0:
            slopes = None if alibi_slopes is None else alibi_slopes[b:b + 1]
            g = attention_bwd(_seq(grad_out, q0, q1), _seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1),
                              _seq(out, q0, q1), lse[:, q0:q1].unsqueeze(0), scale, window_left,
                              window_right, slopes, None, 64, None, softcap,
                              varlen_rel_slice(rel_bias, max_seqlen_k, q1 - q0, k1 - k0), dropout_p,
                              varlen_dropout_seed(dropout_seed, b))
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(0, 1) for x in g[:3])
            if rel_bias is not None:
                varlen_rel_slice(drel, max_seqlen_k, q1 - q0, k1 - k0).add_(g[3])
    return dq, dk, dv, drel


# ----------------------------------------------------------------------------- KV cache
def kvcache_capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Tokens a sequence's cache can hold: S_max of a contiguous cache (B, Hkv, S_max, D), or
    max_pages * page_size of a paged one (num_pages, page_size, Hkv, D)."""
    return k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[1]


def kvcache_rel_bias(rel_bias: Tensor, Sq: int, capacity: int, start: int, n: int) -> Tensor:
    """The dense attention's bias by distance (Hq, Sq + Sk - 1), Sk = n - start, of a sequence
    whose keys are its cache positions [start, n), taken from attention_with_kvcache's vector
    (Hq, Sq + capacity - 1) (entry (j - i') + capacity - 1, i' = n - Sq + i): dense entry
    j - start - i + Sq - 1 is that entry, shifted by capacity - Sk."""
    Sk = n - start
    return rel_bias[:, capacity - Sk:capacity - Sk + max(Sq + Sk - 1, 0)]


def kvcache_token_slots(n: int, start, block_table: Optional[Tensor], b: int, page_size: int):
    """(pages, slots) int64 of tokens start .. start + n - 1 of sequence b: in a paged cache
    token t sits at page block_table[b, t // page_size], slot t % page_size; a contiguous cache
    is one "page" per sequence (page b)."""
    t = torch.arange(n, device=block_table.device if block_table is not None else None) + start
    if block_table is None:
        return torch.full_like(t, b), t
    return block_table[b, t // page_size].long(), t % page_size


def kvcache_gather(cache: Tensor, block_table: Optional[Tensor], b: int, n: int, start: int = 0) -> Tensor:
    """Tokens start .. n - 1 of sequence b (for a contiguous cache: of cache row b) as
    (1, Hkv, n - start, D)."""
    if block_table is None:  # (B_cache, Hkv, S_max, D)
        return cache[b:b + 1, :, start:n]
    pages, slots = kvcache_token_slots(n - start, start, block_table, b, cache.shape[1])
    return cache[pages, slots].permute(1, 0, 2)[None]  # (n, Hkv, D) -> (1, Hkv, n, D)


def kvcache_append(k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx=None):
    """Writes k_new/v_new (B, Hkv, S_new, D) in place at positions cache_seqlens[b] ... of
    sequence b (of cache row cache_batch_idx[b] in a contiguous cache, when given)."""
    if k_new is None:
        return
    S_new = k_new.shape[2]
    for b in range(k_new.shape[0]):
        start = int(cache_seqlens[b])
        if block_table is None:
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            k_cache[row, :, start:start + S_new] = k_new[b]
            v_cache[row, :, start:start + S_new] = v_new[b]
        else:
            pages, slots = kvcache_token_slots(S_new, start, block_table, b, k_cache.shape[1])
            k_cache[pages, slots] = k_new[b].transpose(0, 1)
            v_cache[pages, slots] = v_new[b].transpose(0, 1)


def attention_with_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                               cache_batch_idx, cache_leftpad, scale, window_left, window_right,
                               alibi_slopes, softcap, rel_bias=None):
    """Appends k_new/v_new to the cache (in place), then per sequence b attends q[b] to its keys
    cache_leftpad[b] (or 0) .. cache_seqlens[b] + S_new - 1 with the dense reference
    (bottom-right alignment: the left padding shifts no position; rel_bias, by distance over
    the cache capacity, narrowed to the sequence's keys: kvcache_rel_bias). Returns (out, lse)."""
    kvcache_append(k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx)
    S_new = 0 if k_new is None else k_new.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b]) + S_new
        start = 0 if cache_leftpad is None else int(cache_leftpad[b])
        row = b if cache_batch_idx is None or block_table is not None else int(cache_batch_idx[b])
        k, v = (kvcache_gather(c, block_table, row, n, start) for c in (k_cache, v_cache))
        rel = None if rel_bias is None else kvcache_rel_bias(
            rel_bias, q.shape[2], kvcache_capacity(k_cache, block_table), start, n)
        o, l = attention_fwd(q[b:b + 1], k, v, scale, window_left, window_right,
                             None if alibi_slopes is None else alibi_slopes[b:b + 1], None, 64, None, softcap, rel)
        out[b], lse[b] = o[0], l[0]
    return out, lse
