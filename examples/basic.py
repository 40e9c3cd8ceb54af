"""Basic: build the tiny model, run it, train it briefly on the embedded task, generate.

    python examples/basic.py
"""
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.train import generate_text, train

torch.manual_seed(0)

# 1. a model from a preset (presets are plain data: tk.config.PRESETS)
config = tk.TransformerConfig.preset("tiny")
model = tk.Transformer(config)
print(f"{config.num_parameters():,} parameters; backends: "
      + ", ".join(b for b, e in tk.available_backends().items() if e["available"]))

# 2. forward: token ids (batch, seq) -> logits (batch, seq, vocab); with targets, also the loss
tokens = torch.randint(0, config.vocab_size, (2, 16))
logits, loss = model(tokens, targets=tokens)
print(f"logits {tuple(logits.shape)}, untrained loss {loss.item():.2f}")

# 3. train 300 steps on the embedded digit-reversal task ("4072=2704.")
model, result = train(config, steps=300, progress=False)
print(f"loss {result.first_loss:.2f} -> {result.final_loss:.2f}, held-out digit accuracy "
      f"{result.eval['digit_accuracy']:.2f} (chance 0.10)")

# 4. generate with the KV cache (greedy)
print("1234=" + generate_text(model, "1234=", 5, stop="."))
