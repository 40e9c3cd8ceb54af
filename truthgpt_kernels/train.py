"""Training and generation for `python -m truthgpt_kernels train | generate`.

Data: a text file as byte-level tokens (`--data FILE`), or by default an embedded synthetic
task generated in code (nothing to download): reversing a string of digits,
"4072=2704." (the loss counts only the answer). Checkpoints are a directory holding
`model.safetensors` (or `model.pt`, loaded with weights_only=True, when safetensors is not
installed), `config.json` and `train.json` (what was trained, and the results).
"""
import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .config import TransformerConfig
from .modules import Transformer

IGNORE = -100


# ============================================================================ data
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255 (vocab_size 256)."""
    vocab_size = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class ReverseTask:
    """Reverse n_digits random digits: "4072=2704." Deterministic from the generator; one
    in ten digit strings (by a fixed hash) is held out of training and used for evaluation."""
    name = "reverse"

    def __init__(self, n_digits: int = 4):
        if n_digits < 1:
            raise ValueError(f"n_digits must be >= 1, got {n_digits}")
        self.n = n_digits
        self.tok = ByteTokenizer()

    @property
    def seq_len(self) -> int:  # tokens fed to the model: digits, '=', answer (without the '.')
        return 2 * self.n + 1

    @staticmethod
    def held_out(digits: Tensor) -> Tensor:
        """(B, n) digits -> (B,) bool: the held-out tenth of all digit strings."""
        h = torch.zeros(digits.shape[0], dtype=torch.int64)
        for i in range(digits.shape[1]):
            h = (h * 31 + digits[:, i] + 7) % 1000003
        return h % 10 == 3

    def _digits(self, batch_size: int, generator: torch.Generator, held_out: bool) -> Tensor:
        out = []
        while sum(len(o) for o in out) < batch_size:
            d = torch.randint(0, 10, (2 * batch_size + 16, self.n), generator=generator)
            out.append(d[self.held_out(d) == held_out])
        return torch.cat(out)[:batch_size]

    def encode(self, digits: Tensor) -> Tensor:
        """(B, n) digits -> full sequences (B, 2n + 2) of byte ids."""
        B = digits.shape[0]
        eq = torch.full((B, 1), ord("="))
        dot = torch.full((B, 1), ord("."))
        return torch.cat([digits + ord("0"), eq, digits.flip(1) + ord("0"), dot], dim=1)

    def batch(self, batch_size: int, generator: torch.Generator,
              held_out: bool = False) -> Tuple[Tensor, Tensor, dict]:
        """tokens (B, 2n + 1) and targets (B, 2n + 1): the next byte after '=', else ignored;
        no extra forward arguments."""
        seq = self.encode(self._digits(batch_size, generator, held_out))
        tokens, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : self.n] = IGNORE
        return tokens, targets, {}

    @torch.no_grad()
    def evaluate(self, model: Transformer, n_examples: int = 256, seed: int = 1234) -> Dict[str, float]:
        """Greedy answers on held-out strings: per-digit accuracy (chance 0.1) and exact match."""
        g = torch.Generator().manual_seed(seed)
        digits = self._digits(n_examples, g, held_out=True)
        seq = self.encode(digits)
        device = next(model.parameters()).device
        prompt = seq[:, : self.n + 1].to(device)
        out = model.generate(prompt, self.n, temperature=0)[:, self.n + 1:].cpu()
        right = out == seq[:, self.n + 1: 2 * self.n + 1]
        return {"digit_accuracy": right.float().mean().item(),
                "exact_match": right.all(1).float().mean().item(), "chance": 0.1}


class TextData:
    """Random windows of a text file as byte tokens (next-byte prediction). Documents are
    separated by blank lines ("\n\n"). With `pack` (the default) each window is a packed row:
    the documents in it attend only within themselves (position_ids restart at each document
    and at the window start; Transformer.forward runs them through tk.attention_varlen) and a
    document's last byte predicts nothing; without it, windows attend across documents."""
    name = "text"

    def __init__(self, path: str, seq_len: int, pack: bool = True):
        with open(path, "rb") as fh:
            data = fh.read()
        if len(data) < seq_len + 2:
            raise ValueError(f"{path}: {len(data)} bytes is too short for seq_len {seq_len}")
        self.data = torch.tensor(list(data), dtype=torch.int64)
        self.seq_len, self.pack = seq_len, pack
        n_val = max(seq_len + 2, len(data) // 20)
        self.split = len(data) - n_val  # the last 5% is held out
        nl = self.data == 10
        starts = torch.zeros(len(data), dtype=torch.bool)
        starts[0] = True
        starts[2:] = nl[:-2] & nl[1:-1]  # a document starts after a blank line
        self.doc_start = torch.cummax(torch.where(starts, torch.arange(len(data)), 0), 0).values
        self.starts = starts

    def batch(self, batch_size: int, generator: torch.Generator, held_out: bool = False):
        """(tokens, targets, forward keyword arguments: position_ids when packing)."""
        lo, hi = (self.split, len(self.data)) if held_out else (0, self.split)
        start = torch.randint(lo, hi - self.seq_len - 1, (batch_size,), generator=generator)
        idx = start[:, None] + torch.arange(self.seq_len + 1)
        seq = self.data[idx]
        tokens, targets = seq[:, :-1], seq[:, 1:].clone()
        if not self.pack:
            return tokens, targets, {}
        targets[self.starts[idx[:, 1:]]] = IGNORE  # the next byte opens another document
        pos = idx[:, :-1] - torch.maximum(self.doc_start[idx[:, :-1]], start[:, None])
        return tokens, targets, {"position_ids": pos}

    @torch.no_grad()
    def evaluate(self, model: Transformer, n_examples: int = 32, seed: int = 1234) -> Dict[str, float]:
        g = torch.Generator().manual_seed(seed)
        tokens, targets, kw = self.batch(n_examples, g, held_out=True)
        device = next(model.parameters()).device
        _, loss = model(tokens.to(device), targets.to(device), return_logits=False,
                        **{k: v.to(device) for k, v in kw.items()})
        return {"held_out_loss": loss.item()}


# ============================================================================ training
@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    eval: Dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    metrics: List[dict] = field(default_factory=list)  # one record per step, as in metrics.jsonl
    start_step: int = 0                                 # > 0 when resumed from a checkpoint

    @property
    def first_loss(self) -> float:
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[:k]) / k

    @property
    def final_loss(self) -> float:
        k = max(1, len(self.losses) // 10)
        return sum(self.losses[-k:]) / k


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to lr / 10."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


STATE_FILE = "checkpoint.pt"    # everything a resumed run needs, one file written atomically
METRICS_FILE = "metrics.jsonl"  # one JSON record per step
TRACE_FILE = "trace.json"       # --profile: torch.profiler Chrome trace


def _make_optimizer(model: Transformer, lr: float, weight_decay: float, fused_ok: bool):
    """AdamW (decay on matrices only), torch's fused kernel where it supports the parameters'
    device and dtype (the CPU included), else its default implementation."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    if fused_ok:
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocated bytes since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except (ImportError, OSError):
        return float("nan")


def _gemm_ceiling(device: torch.device, dtype_name: str) -> Optional[float]:
    """The GEMM rate (GFLOP/s) of this machine for `dtype_name`, measured now (quick sizes),
    without touching the global RNG (so a run's losses do not depend on it)."""
    from .bench import roofline as ceilings
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        measured = ceilings.measure("cuda" if device.type == "cuda" else "cpu", quick=True, min_time=0.05)
    return ceilings.gemm_rate(measured, dtype_name)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _differences(saved, now, prefix: str = "") -> List[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(k, "<missing>"), now.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    return [] if saved == now else [f"{prefix[:-1]}: checkpoint {saved!r}, now {now!r}"]


def load_state(path: str) -> dict:
    """The resumable state in `path` (a run directory or its checkpoint.pt); raises
    FileNotFoundError / ValueError naming the file when it is missing or unreadable."""
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot resume: {path} does not exist (a run writes it with save_every / "
                                f"--save-every and at its end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, overwritten, not a torch file, ...
        raise ValueError(f"cannot resume: {path} is corrupted or not a checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    need = ("format", "signature", "step", "model", "optimizer", "rng", "data_rng", "losses", "metrics")
    missing = [k for k in need if not isinstance(state, dict) or k not in state]
    if missing or state.get("format") != 1:
        raise ValueError(f"cannot resume: {path} is not a truthgpt_kernels training checkpoint "
                         f"(missing {', '.join(missing) or 'format 1'})")
    return state


def _atomic_write(path: str, write) -> None:
    """write(tmp_path), then rename over `path`: a failure at any point leaves `path` as it was."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Metrics:
    """metrics.jsonl (+ optional TensorBoard) of one run directory (rank 0 only)."""

    def __init__(self, out: str, keep: List[dict], tensorboard: bool):
        self.path = os.path.join(out, METRICS_FILE)
        # a resumed run keeps the records up to its checkpoint, in place of the file's
        _atomic_write(self.path, lambda tmp: _write_lines(tmp, keep))
        self.fh = open(self.path, "a")
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=keep[-1]["step"] + 1 if keep else 0)

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])
            for k, v in (record.get("eval") or {}).items():
                self.tb.add_scalar(f"eval/{k}", v, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _write_lines(path: str, records: List[dict]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _check_tensorboard() -> None:
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError as e:
        raise ValueError(f"tensorboard logging needs the tensorboard package (pip install tensorboard, "
                         f"or the [tensorboard] extra): {e}") from None


def train(config: TransformerConfig, *, steps: int = 200, batch_size: int = 32, lr: float = 5e-3,
          data: Optional[str] = None, n_digits: int = 4, seq_len: Optional[int] = None,
          seed: int = 0, device: str = "cpu", autocast: bool = False, weight_decay: float = 0.0,
          out: Optional[str] = None, progress: bool = True, evaluate: bool = True,
          model: Optional[Transformer] = None, parallel: str = "ddp", grad_accum: int = 1,
          eval_every: int = 0, save_every: int = 0, resume: Optional[str] = None,
          tensorboard: bool = False, profile: int = 0, gemm_gflops: Optional[float] = None,
          callback: Optional[Callable[[dict], None]] = None,
          pack: bool = True) -> Tuple[Transformer, TrainResult]:
    """Trains a model on the synthetic reversal task (or the text file `data`); returns the
    model and a TrainResult (loss per step, tokens/s, held-out evaluation, checkpoint path,
    per-step metrics).

    With `out`: every step appends a record to `out/metrics.jsonl` (step, loss, lr, grad_norm,
    tokens_per_s, step_time_s, peak_mem_mb, mfu against the GEMM rate measured at the start, or
    `gemm_gflops` when given); `tensorboard` also writes them under `out/tensorboard`;
    `save_every` N writes `out/checkpoint.pt` (model, optimizer, step, data and RNG state)
    every N steps and at the end, atomically, plus the model files `generate` loads;
    `profile` N writes a torch.profiler Chrome trace of N steps (after the first) to
    `out/trace.json`. `eval_every` N evaluates on held-out data every N steps (in the record).
    `resume` (a run directory) continues that run from its checkpoint: the arguments and config
    must match the checkpoint's, and the losses equal an uninterrupted run's bit for bit.
    `grad_accum` splits each batch into that many micro-batches (one optimizer step).
    `callback(record)` is called after each step. `pack` (text data): documents (separated by
    blank lines) packed into full rows without attention across them; False: plain windows.

    Under torch.distributed (e.g. launched by torchrun; the process group must be initialised)
    every rank draws the same global batch of `batch_size` and trains on its slice, with
    `parallel="ddp"` (DistributedDataParallel) or `"fsdp"` (FSDP2 fully_shard per block): the
    loss curve equals a single process's with the same global batch. Losses are averaged over
    ranks; rank 0 writes the checkpoint."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    for name, v in (("grad_accum", grad_accum), ("eval_every", eval_every), ("save_every", save_every),
                    ("profile", profile)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "grad_accum" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'grad_accum' else 0}, got {v!r}")
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
    if seq_len is not None and data is None:
        raise ValueError("seq_len sets the window of text data (data=...); the reversal task's "
                         "length comes from n_digits")
    if config.model_type != "decoder":
        raise ValueError(f"train() trains decoder models; config.model_type is {config.model_type!r}")
    if config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"byte-level data needs vocab_size >= 256, config has {config.vocab_size}")
    if (save_every or profile or tensorboard or resume) and out is None and resume is None:
        raise ValueError("save_every, profile and tensorboard need an output directory (out)")
    out = resume if out is None else out
    if tensorboard:
        _check_tensorboard()
    if data is not None:
        task = TextData(data, seq_len or min(config.max_seq_len, 256), pack=pack)
    else:
        task = ReverseTask(n_digits)
    if task.seq_len > config.max_seq_len:
        raise ValueError(f"sequences of {task.seq_len} tokens exceed max_seq_len {config.max_seq_len}")

    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if batch_size % (world * grad_accum):
        raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world} times "
                         f"grad_accum {grad_accum}")
    if world > 1 and parallel == "fsdp" and (resume or save_every):
        raise ValueError("resume and save_every are not supported with parallel='fsdp' (sharded "
                         "optimizer state); use ddp")
    signature = {"config": config.to_dict(), "task": task.name, "n_digits": n_digits if data is None else None,
                 "data": os.path.abspath(data) if data else None, "pack": pack if data else None,
                 "seq_len": task.seq_len, "steps": steps,
                 "batch_size": batch_size, "lr": lr, "seed": seed, "weight_decay": weight_decay,
                 "grad_accum": grad_accum, "autocast": autocast, "world_size": world}
    state = None
    if resume is not None:  # everything is checked before anything is written
        state = load_state(resume)
        diffs = _differences(state["signature"], signature)
        if diffs:
            raise ValueError(f"cannot resume from {os.path.join(resume, STATE_FILE) if os.path.isdir(resume) else resume}: "
                             f"it was written by a different run: " + "; ".join(diffs))

    dev = torch.device(device)
    writer = out is not None and rank == 0
    if writer and gemm_gflops is None:
        gemm_gflops = _gemm_ceiling(dev, "bfloat16" if autocast else config.dtype)
    torch.manual_seed(seed)
    if model is None:
        model = Transformer(config, device=device)
    model.train()
    step_model = _parallelize(model, parallel) if world > 1 else model
    progress = progress and rank == 0
    opt = _make_optimizer(model, lr, weight_decay, fused_ok=not (world > 1 and parallel == "fsdp"))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    result = TrainResult()
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        _set_rng_state(state["rng"], dev)
        start = result.start_step = int(state["step"])
        result.losses = list(state["losses"])
        result.metrics = list(state["metrics"])
    if writer:
        os.makedirs(out, exist_ok=True)
    metrics = _Metrics(out, result.metrics, tensorboard) if writer else None
    from .bench.model import _train_flops
    flops_per_step = _train_flops(config, batch_size // world, task.seq_len)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, initial=start, desc=f"train {task.name}", unit="step", dynamic_ncols=True)
    prof, prof_end = None, None
    if profile and writer:
        prof_start = min(start + 1, steps - 1)
        prof_end = min(prof_start + profile, steps)
    micro = batch_size // world // grad_accum
    n_tokens, t0 = 0, time.perf_counter()
    try:
        for step in range(start, steps):
            if prof_end is not None and step == prof_start:
                prof = _start_profiler(dev)
            t_step = time.perf_counter()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            tokens, targets, extra = task.batch(batch_size, gen)  # the global batch, the same on every rank
            local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
            tokens, targets = tokens[local].to(device), targets[local].to(device)
            extra = {k: v[local].to(device) for k, v in extra.items()}  # position_ids of packed rows
            step_lr = lr_at(step, steps, lr, warmup)
            for group in opt.param_groups:
                group["lr"] = step_lr
            opt.zero_grad(set_to_none=True)
            loss_sum = None
            for m in range(grad_accum):
                sl = slice(m * micro, (m + 1) * micro)
                sync = m == grad_accum - 1 or world == 1 or parallel != "ddp"
                with (contextlib.nullcontext() if sync else step_model.no_sync()):
                    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                        _, loss = step_model(tokens[sl], targets[sl], return_logits=False,
                                             **{k: v[sl] for k, v in extra.items()})
                    (loss / grad_accum if grad_accum > 1 else loss).backward()  # DDP / FSDP average over ranks
                loss = loss.detach()
                loss_sum = loss if loss_sum is None else loss_sum + loss
            loss = loss_sum / grad_accum if grad_accum > 1 else loss_sum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if world > 1:
                loss = loss.clone()
                dist.all_reduce(loss)
                loss /= world
            result.losses.append(loss.item())
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t_step
            n_tokens += tokens.numel()
            record = {"step": step, "loss": result.losses[-1], "lr": step_lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens.numel() * world / dt, "step_time_s": dt,
                      "peak_mem_mb": _peak_memory_mb(dev),
                      "mfu": flops_per_step / dt / (gemm_gflops * 1e9) if gemm_gflops else None}
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                record["eval"] = _evaluate(task, model, dev)
            result.metrics.append(record)
            if metrics is not None:
                metrics.write(record)
            if prof is not None and step + 1 == prof_end:
                _stop_profiler(prof, os.path.join(out, TRACE_FILE))
                prof = None
            if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
                _save_state(out, writer, model, opt, step + 1, gen, dev, signature, result)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}",
                                tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
            if callback is not None:
                callback(record)
    finally:
        if metrics is not None:
            metrics.close()
        if prof is not None:
            prof.__exit__(None, None, None)
        if bar is not None:
            bar.close()
    result.seconds = time.perf_counter() - t0
    result.tokens_per_s = n_tokens * world / result.seconds if n_tokens else 0.0
    if evaluate:
        result.eval = _evaluate(task, model, dev)
    if out is not None and (save_every or resume is not None):
        _save_state(out, writer, model, opt, steps, gen, dev, signature, result)
    if out is not None and parallel == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model = Transformer(config, device="cpu")
            model.load_state_dict(full)
    if writer:
        result.checkpoint = save_checkpoint(model, out, _info(task, signature, result))
    return model, result


def _info(task, signature: dict, result: TrainResult) -> dict:
    s = signature
    return {"task": task.name, "steps": s["steps"], "batch_size": s["batch_size"], "lr": s["lr"],
            "seed": s["seed"], "n_digits": s["n_digits"], "data": s["data"], "grad_accum": s["grad_accum"],
            "step": len(result.losses), "first_loss": result.first_loss, "final_loss": result.final_loss,
            "tokens_per_s": result.tokens_per_s, "eval": result.eval}


def _evaluate(task, model: Transformer, device: torch.device) -> Dict[str, float]:
    """Held-out evaluation that leaves the training RNG and mode as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.eval()
        try:
            return task.evaluate(model)
        finally:
            model.train()


def _save_state(out: str, writer: bool, model: Transformer, opt, step: int, gen: torch.Generator,
                device: torch.device, signature: dict, result: TrainResult) -> None:
    """checkpoint.pt (everything resume needs, in one atomic write), then the model files."""
    if not writer:
        return
    state = {"format": 1, "signature": signature, "step": step, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "rng": _rng_state(device), "data_rng": gen.get_state(),
             "losses": list(result.losses), "metrics": list(result.metrics)}
    _atomic_write(os.path.join(out, STATE_FILE), lambda tmp: torch.save(state, tmp))
    info = {"task": signature["task"], "step": step, "steps": signature["steps"], "seed": signature["seed"],
            "n_digits": signature["n_digits"], "data": signature["data"]}
    save_checkpoint(model, out, info)


def _start_profiler(device: torch.device):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=acts, record_shapes=True)
    prof.__enter__()
    return prof


def _stop_profiler(prof, path: str) -> None:
    prof.__exit__(None, None, None)
    prof.export_chrome_trace(path)


def _parallelize(model: Transformer, parallel: str):
    """The module to step: DistributedDataParallel around the model, or the model itself with
    FSDP2 (`fully_shard`) applied to every block and then to the root, in place."""
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in list(getattr(model, "encoder", None) or []) + list(model.layers):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


# ============================================================================ checkpoints
def save_checkpoint(model: Transformer, path: str, info: Optional[dict] = None) -> str:
    """Writes model weights + config.json (+ train.json) into directory `path`; each file is
    written to a temporary name and renamed, so a crash never leaves a partial file."""
    os.makedirs(path, exist_ok=True)
    try:
        from safetensors.torch import save_model
    except ImportError:
        save_model = None
    if save_model is not None:  # shared (tied) tensors once
        _atomic_write(os.path.join(path, "model.safetensors"), lambda tmp: save_model(model, tmp))
    else:
        _atomic_write(os.path.join(path, "model.pt"), lambda tmp: torch.save(model.state_dict(), tmp))
    _atomic_write(os.path.join(path, "config.json"), model.config.to_json)
    if info is not None:
        _atomic_write(os.path.join(path, "train.json"), lambda tmp: _write_text(tmp, json.dumps(info, indent=2)))
    return path


def load_checkpoint(path: str, device: str = "cpu") -> Transformer:
    """The model saved by save_checkpoint (directory, or the weights file inside it)."""
    if os.path.isfile(path):
        path = os.path.dirname(path) or "."
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a checkpoint: no config.json there")
    config = TransformerConfig.from_json(cfg_path)
    model = Transformer(config, device=device)
    st, pt = os.path.join(path, "model.safetensors"), os.path.join(path, "model.pt")
    if os.path.isfile(st):
        from safetensors.torch import load_model
        load_model(model, st, device=str(device))
    elif os.path.isfile(pt):
        model.load_state_dict(torch.load(pt, map_location=device, weights_only=True))
    else:
        raise FileNotFoundError(f"{path} holds no model.safetensors or model.pt")
    return model.eval()


def checkpoint_info(path: str) -> dict:
    p = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "train.json")
    if os.path.isfile(p):
        with open(p) as fh:
            return json.load(fh)
    return {}


def generate_text(model: Transformer, prompt: str, max_new_tokens: int = 32, *,
                  temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  stop: Optional[str] = None, seed: int = 0) -> str:
    """The byte-level continuation of `prompt` (cut after the first `stop` byte)."""
    tok = ByteTokenizer()
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    device = next(model.parameters()).device
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(f"the prompt ({len(ids)} bytes) fills max_seq_len {model.config.max_seq_len}")
    n = min(max_new_tokens, room)
    eos = tok.encode(stop)[0] if stop else None
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), n, temperature=temperature,
                         top_k=top_k, top_p=top_p, eos_id=eos, generator=g)[0, len(ids):].tolist()
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return tok.decode(out)
