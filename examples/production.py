"""Production-style: a config file with profiles + environment overrides, validation errors
reported up front, gradient checkpointing, bf16 autocast, a checkpoint saved and reloaded.

    TRUTHGPT_PROFILE=production python examples/production.py
    TRUTHGPT_N_LAYERS=2 python examples/production.py
"""
import os
import sys
import tempfile
import time

import torch

import truthgpt_kernels as tk
from truthgpt_kernels.train import load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "..", "configs", "profiles.yaml")

# defaults < configs/profiles.yaml (profile from TRUTHGPT_PROFILE, else the file's default)
#          < TRUTHGPT_* environment variables < these keyword overrides
try:
    config = tk.TransformerConfig.load(CONFIG, max_seq_len=256, gradient_checkpointing=True)
except tk.ConfigError as e:       # every problem at once, by field name
    sys.exit(f"bad configuration:\n{e}")
print(config.to_yaml())

torch.manual_seed(0)
model = tk.Transformer(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
data = torch.randint(0, config.vocab_size, (16, 65))
t0 = time.perf_counter()
for step in range(5):
    batch = data[torch.randint(0, 16, (4,))]
    with torch.autocast("cpu", dtype=torch.bfloat16):   # mixed precision on the CPU
        _, loss = model(batch[:, :-1], batch[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    print(f"step {step}: loss {loss.item():.3f}")
print(f"{5 * 4 * 64 / (time.perf_counter() - t0):.0f} tokens/s")

# checkpoint: safetensors weights + config.json; reload and check
with tempfile.TemporaryDirectory() as d:
    save_checkpoint(model, d, {"steps": 5})
    restored = load_checkpoint(d)
    model.eval()
    same = torch.equal(restored(data[:1, :8]), model(data[:1, :8]))
    print(f"checkpoint files {sorted(os.listdir(d))}, reloaded model identical: {same}")
