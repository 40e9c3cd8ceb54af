"""torch.export of the tiny model, and reproducible training from a seed."""
import torch

from truthgpt_kernels import Transformer, TransformerConfig
from truthgpt_kernels.train import train


def test_export_tiny_model_matches_eager():
    torch.manual_seed(0)
    config = TransformerConfig.load(preset="tiny", env=False)
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 12))
    exported = torch.export.export(model, (ids,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids), model(ids))


def test_training_from_a_seed_is_reproducible():
    config = TransformerConfig.load(preset="tiny", env=False)
    runs = [train(config, steps=5, batch_size=8, progress=False, evaluate=False, seed=3)[1].losses
            for _ in range(2)]
    assert runs[0] == runs[1]  # bitwise: every CPU kernel is deterministic
