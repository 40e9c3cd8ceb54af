"""Input checks shared by every op and backend, run before any kernel.

Messages name the argument and say what was expected. Wrong dtypes raise TypeError;
everything else (rank, shape, device, values) raises ValueError.
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def _dt(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim=None, dtypes: Optional[Sequence] = FLOAT_DTYPES,
                 device: Optional[torch.device] = None, shape: Optional[Sequence] = None) -> Tensor:
    """t is a tensor of the given rank (an int or a collection of allowed ranks), dtype, device
    and shape (None entries in `shape` match any size). Runs on every op call: the passing case
    is plain comparisons (a few microseconds in all); messages are built only on failure."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        rank = t.dim()
        if (rank != ndim) if isinstance(ndim, int) else (rank not in ndim):
            ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dt(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    if shape is not None:
        sizes = t.shape
        ok = len(shape) == len(sizes)
        if ok:
            for want, got in zip(shape, sizes):
                if want is not None and want != got:
                    ok = False
                    break
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(sizes)}")
    return t


def check_same_dtype(ref_name: str, ref: Tensor, **others: Optional[Tensor]):
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_int(name: str, value, *, minimum=None, maximum=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, *, minimum=None, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_head_dim(name: str, d: int):
    if d < 1 or d > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim must be between 1 and {MAX_HEAD_DIM}, got {d}")


# Device types torch.autocast knows (torch.is_autocast_enabled raises for others, e.g. meta).
AUTOCAST_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu"})


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for tensors of `device_type`; None when autocast is off
    there or does not know the device (meta tensors: shape inference runs as without it)."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_qkv(q, k, v):
    """(q, k, v) as F.scaled_dot_product_attention takes them under torch.autocast: float32
    operands in the autocast dtype (the op is on autocast's lower-precision list), others as
    they are."""
    dt = autocast_dtype(q.device.type) if q.dtype == torch.float32 else None
    if dt is not None:
        return q.to(dt), k.to(dt), v.to(dt)
    return q, k, v


def check_window(causal: bool, window) -> Tuple[int, int]:
    """(left, right) key offsets around a query's position, -1 = unbounded; causal means
    right <= 0."""
    left, right = -1, -1
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a pair (left, right), got {window!r}")
        left = check_int("window[0]", window[0], minimum=-1)
        right = check_int("window[1]", window[1], minimum=-1)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    return left, right


def check_attention_options(D: int, B: int, Hq: int, device, *, scale, softcap, causal, window,
                            alibi_slopes):
    """The options every attention op shares, normalised: (scale, softcap, (left, right),
    alibi_slopes as a (B, Hq) view or None). Slopes: float32 (Hq,) or (B, Hq)."""
    scale = D ** -0.5 if scale is None else check_float("scale", scale)
    softcap = check_float("softcap", softcap, minimum=0.0)
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, ndim=(1, 2), dtypes=(torch.float32,), device=device)
        if tuple(alibi_slopes.shape) not in ((Hq,), (B, Hq)):
            raise ValueError(f"alibi_slopes must have shape ({Hq},) or ({B}, {Hq}), got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.expand(B, Hq)
    return scale, softcap, check_window(bool(causal), window), alibi_slopes


def check_rel_bias(rel_bias: Tensor, rel_buckets, Hq: int, device, causal: bool) -> Tuple[bool, int, int]:
    """A T5 bias table float32 (Hq, num_buckets) and its bucketing (bidirectional, num_buckets,
    max_distance), default (not causal, num_buckets, 128); returns the bucketing."""
    check_tensor("rel_bias", rel_bias, ndim=2, dtypes=(torch.float32, torch.float64), device=device)
    if rel_bias.shape[0] != Hq:
        raise ValueError(f"rel_bias must have shape ({Hq}, num_buckets) (one row per query head), "
                         f"got {tuple(rel_bias.shape)}")
    if rel_buckets is None:
        rel_buckets = (not causal, rel_bias.shape[1], 128)
    if not isinstance(rel_buckets, (tuple, list)) or len(rel_buckets) != 3:
        raise ValueError(f"rel_buckets must be (bidirectional, num_buckets, max_distance), got {rel_buckets!r}")
    bidirectional, nb, max_distance = bool(rel_buckets[0]), rel_buckets[1], rel_buckets[2]
    nb = check_int("rel_buckets[1] (num_buckets)", nb, minimum=2 if not bidirectional else 4)
    if nb != rel_bias.shape[1]:
        raise ValueError(f"rel_bias has {rel_bias.shape[1]} buckets but rel_buckets says {nb}")
    max_exact = (nb // 2 if bidirectional else nb) // 2
    max_distance = check_int("rel_buckets[2] (max_distance)", max_distance, minimum=max_exact + 1)
    return bidirectional, nb, max_distance


def check_class_targets(target: Tensor, num_classes: int, ignore_index: int):
    """Every target is a class in [0, num_classes) or ignore_index. Reads the values (a device
    sync on GPUs), so kernels call it inside their op, where torch.compile does not trace.
    Meta tensors (shape inference) have no values to check."""
    if target.device.type == "meta":
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target must hold class indices in [0, {num_classes}) or ignore_index "
                         f"({ignore_index}); got {int(target[i])} at position {i}")


def _kvcache_pages_bad(lens: Tensor, block_table: Tensor, total: Tensor, page_size: int, num_pages: int) -> Tensor:
    """(B, max_pages) bool: the block_table entries of the pages in use that are no page index."""
    used = torch.arange(block_table.shape[1], device=lens.device)[None, :] * page_size < total[:, None]
    return used & ((block_table < 0) | (block_table >= num_pages))


def check_kvcache_lengths(cache_seqlens: Tensor, block_table: Optional[Tensor], s_new: int,
                          capacity: int, page_size: int, num_pages: int, *, in_graph: bool = False):
    """The values of a KV cache's bookkeeping: cache_seqlens >= 0, cache_seqlens + s_new within
    the capacity, and the block_table entries of the pages those tokens use in [0, num_pages).
    Reads the values (a device sync on GPUs): called inside the op, like check_class_targets.
    in_graph (inside torch.compile, where values cannot be read while tracing): the same
    conditions as asserts that run with the compiled graph and raise RuntimeError."""
    lens = cache_seqlens.long()
    total = lens + s_new
    if in_graph:
        torch._assert_async(((lens >= 0) & (total <= capacity)).all(),
                            f"attention_with_kvcache: cache_seqlens must be >= 0 and cache_seqlens + the "
                            f"{s_new} new tokens within the cache capacity of {capacity} tokens")
        if block_table is not None and block_table.numel():
            torch._assert_async(~_kvcache_pages_bad(lens, block_table, total, page_size, num_pages).any(),
                                f"attention_with_kvcache: the block_table entries of the pages in use must "
                                f"be page indices in [0, {num_pages})")
        return
    if bool((lens < 0).any()):
        b = int((lens < 0).nonzero()[0, 0])
        raise ValueError(f"cache_seqlens must be >= 0, got {int(lens[b])} for sequence {b}")
    if bool((total > capacity).any()):
        b = int((total > capacity).nonzero()[0, 0])
        raise ValueError(f"cache_seqlens[{b}] + the {s_new} new tokens = {int(total[b])} exceed the "
                         f"cache capacity of {capacity} tokens")
    if block_table is not None and block_table.numel():
        bad = _kvcache_pages_bad(lens, block_table, total, page_size, num_pages)
        if bool(bad.any()):
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page index "
                             f"in [0, {num_pages})")


def check_dropout(dropout_p, dropout_seed) -> Tuple[float, Optional[Tensor]]:
    """(dropout_p in [0, 1), the Philox key as a one-element CPU int64 tensor, or None without
    dropout). dropout_seed: any int in [0, 2^64) (stored as the int64 of the same bits), or None:
    drawn from torch's CPU generator, so torch.manual_seed makes runs reproducible."""
    dropout_p = check_float("dropout_p", dropout_p, minimum=0.0)
    if dropout_p >= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0:
        return dropout_p, None
    if dropout_seed is None:
        return dropout_p, torch.randint(0, 2 ** 62, (), dtype=torch.int64)
    key = check_int("dropout_seed", dropout_seed, minimum=0, maximum=2 ** 64 - 1)
    return dropout_p, torch.tensor(key - 2 ** 64 if key >= 2 ** 63 else key, dtype=torch.int64)


def check_kvcache_rows(cache_seqlens: Tensor, cache_batch_idx: Optional[Tensor], cache_leftpad: Optional[Tensor],
                       cache_rows: int, s_new: int, *, in_graph: bool = False):
    """The values of flash-attn's two cache remappings: cache_batch_idx (sequence b uses cache row
    cache_batch_idx[b]) within [0, cache_rows) and, when new tokens are written, no row twice (two
    sequences would append into one row); cache_leftpad (the first key of sequence b) within
    [0, cache_seqlens[b]]. Same reading rules as check_kvcache_lengths."""
    if in_graph:
        msg = (f"attention_with_kvcache: cache_batch_idx must hold distinct rows in [0, {cache_rows}) and "
               "cache_leftpad values in [0, cache_seqlens]")
        if cache_batch_idx is not None:
            idx = cache_batch_idx.long()
            torch._assert_async(((idx >= 0) & (idx < cache_rows)).all(), msg)
            if s_new and idx.numel() > 1:
                torch._assert_async((idx.sort().values.diff() != 0).all(), msg)
        if cache_leftpad is not None:
            pad = cache_leftpad.long()
            torch._assert_async(((pad >= 0) & (pad <= cache_seqlens.long())).all(), msg)
        return
    if cache_batch_idx is not None:
        idx = cache_batch_idx.long()
        bad = (idx < 0) | (idx >= cache_rows)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_batch_idx[{b}] = {int(idx[b])} is not a row of k_cache/v_cache "
                             f"(expected [0, {cache_rows}))")
        if s_new and idx.unique().numel() != idx.numel():
            raise ValueError("cache_batch_idx must not repeat a cache row when k_new/v_new are written "
                             f"(two sequences would append into one row), got {idx.tolist()}")
    if cache_leftpad is not None:
        pad, lens = cache_leftpad.long(), cache_seqlens.long()
        bad = (pad < 0) | (pad > lens)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"cache_leftpad[{b}] = {int(pad[b])} must lie in [0, cache_seqlens[{b}] = "
                             f"{int(lens[b])}]")


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        want = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {want}, got {value!r}")
    return value


def check_gate_up(gate, up):
    """(gate, up) of a gated activation: up of gate's shape, dtype and device, or up=None and
    gate holding [gate | up] halves in its last dim (split as views)."""
    check_tensor("gate", gate, ndim=range(1, 9))
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gate: a packed [gate | up] input needs an even last dim, got {gate.shape[-1]}")
        return gate.chunk(2, dim=-1)
    check_tensor("up", up, device=gate.device)
    check_same_dtype("gate", gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    return gate, up
