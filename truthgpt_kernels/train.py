"""Training and generation for `python -m truthgpt_kernels train | generate`.

Data: a text file as byte-level tokens (`--data FILE`), or by default an embedded synthetic
task generated in code (nothing to download): reversing a string of digits,
"4072=2704." (the loss counts only the answer). Checkpoints are a directory holding
`model.safetensors` (or `model.pt`, loaded with weights_only=True, when safetensors is not
installed), `config.json` and `train.json` (what was trained, and the results).
"""
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

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
              held_out: bool = False) -> Tuple[Tensor, Tensor]:
        """tokens (B, 2n + 1) and targets (B, 2n + 1): the next byte after '=', else ignored."""
        seq = self.encode(self._digits(batch_size, generator, held_out))
        tokens, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : self.n] = IGNORE
        return tokens, targets

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
    """Random windows of a text file as byte tokens (next-byte prediction)."""
    name = "text"

    def __init__(self, path: str, seq_len: int):
        with open(path, "rb") as fh:
            data = fh.read()
        if len(data) < seq_len + 2:
            raise ValueError(f"{path}: {len(data)} bytes is too short for seq_len {seq_len}")
        self.data = torch.tensor(list(data), dtype=torch.int64)
        self.seq_len = seq_len
        n_val = max(seq_len + 2, len(data) // 20)
        self.split = len(data) - n_val  # the last 5% is held out

    def batch(self, batch_size: int, generator: torch.Generator, held_out: bool = False):
        lo, hi = (self.split, len(self.data)) if held_out else (0, self.split)
        start = torch.randint(lo, hi - self.seq_len - 1, (batch_size,), generator=generator)
        idx = start[:, None] + torch.arange(self.seq_len + 1)
        seq = self.data[idx]
        return seq[:, :-1], seq[:, 1:]

    @torch.no_grad()
    def evaluate(self, model: Transformer, n_examples: int = 32, seed: int = 1234) -> Dict[str, float]:
        g = torch.Generator().manual_seed(seed)
        tokens, targets = self.batch(n_examples, g, held_out=True)
        device = next(model.parameters()).device
        _, loss = model(tokens.to(device), targets.to(device))
        return {"held_out_loss": loss.item()}


# ============================================================================ training
@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    eval: Dict[str, float] = field(default_factory=dict)
    checkpoint: Optional[str] = None

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


def train(config: TransformerConfig, *, steps: int = 200, batch_size: int = 32, lr: float = 5e-3,
          data: Optional[str] = None, n_digits: int = 4, seq_len: Optional[int] = None,
          seed: int = 0, device: str = "cpu", autocast: bool = False, weight_decay: float = 0.0,
          out: Optional[str] = None, progress: bool = True, evaluate: bool = True,
          model: Optional[Transformer] = None, parallel: str = "ddp") -> Tuple[Transformer, TrainResult]:
    """Trains a model on the synthetic reversal task (or the text file `data`); returns the
    model and a TrainResult (loss per step, tokens/s, held-out evaluation, checkpoint path).

    Under torch.distributed (e.g. launched by torchrun; the process group must be initialised)
    every rank draws the same global batch of `batch_size` and trains on its slice, with
    `parallel="ddp"` (DistributedDataParallel) or `"fsdp"` (FSDP2 fully_shard per block): the
    loss curve equals a single process's with the same global batch. Losses are averaged over
    ranks; rank 0 writes the checkpoint."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if config.model_type != "decoder":
        raise ValueError(f"train() trains decoder models; config.model_type is {config.model_type!r}")
    if config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"byte-level data needs vocab_size >= 256, config has {config.vocab_size}")
    if data is not None:
        task = TextData(data, seq_len or min(config.max_seq_len, 256))
    else:
        task = ReverseTask(n_digits)
    if task.seq_len > config.max_seq_len:
        raise ValueError(f"sequences of {task.seq_len} tokens exceed max_seq_len {config.max_seq_len}")

    torch.manual_seed(seed)
    if model is None:
        model = Transformer(config, device=device)
    model.train()
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the world size {world}")
    step_model = _parallelize(model, parallel) if world > 1 else model
    progress = progress and rank == 0
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    result = TrainResult()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=f"train {task.name}", unit="step", dynamic_ncols=True)
    n_tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        tokens, targets = task.batch(batch_size, gen)  # the global batch, the same on every rank
        local = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        tokens, targets = tokens[local].to(device), targets[local].to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            _, loss = step_model(tokens, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP / FSDP average the gradients over ranks
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        result.losses.append(loss.item())
        n_tokens += tokens.numel()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}",
                            tok_s=f"{n_tokens / (time.perf_counter() - t0):.0f}")
    result.seconds = time.perf_counter() - t0
    result.tokens_per_s = n_tokens / result.seconds
    if bar is not None:
        bar.close()
    if evaluate:
        model.eval()
        result.eval = task.evaluate(model)
        model.train()
    if out is not None and parallel == "fsdp" and world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model = Transformer(config, device="cpu")
            model.load_state_dict(full)
    if out is not None and rank == 0:
        info = {"task": task.name, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                "n_digits": n_digits if data is None else None, "data": data,
                "first_loss": result.first_loss, "final_loss": result.final_loss,
                "tokens_per_s": result.tokens_per_s, "eval": result.eval}
        result.checkpoint = save_checkpoint(model, out, info)
    return model, result


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
    """Writes model weights + config.json (+ train.json) into directory `path`."""
    os.makedirs(path, exist_ok=True)
    try:
        from safetensors.torch import save_model
    except ImportError:
        save_model = None
    if save_model is not None:
        save_model(model, os.path.join(path, "model.safetensors"))  # shared (tied) tensors once
    else:
        torch.save(model.state_dict(), os.path.join(path, "model.pt"))
    model.config.to_json(os.path.join(path, "config.json"))
    if info is not None:
        with open(os.path.join(path, "train.json"), "w") as fh:
            json.dump(info, fh, indent=2)
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
