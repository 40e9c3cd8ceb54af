"""generate() of prompts of different lengths, decoded together with a paged KV cache
(issue #15): each sequence equals generating its prompt alone, and stops on its own."""
import pytest
import torch

from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.modules import Transformer


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(vocab, lengths=(3, 11, 1, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("overrides, page_size", [
    ({}, 4),                                               # rope, pages smaller than the prompts
    ({"position": "alibi", "n_kv_heads": 2}, 16),          # ALiBi, GQA
    ({"position": "learned", "attention": "sliding_window", "window": 5}, 3),
])
def test_ragged_generate_equals_each_prompt_alone(overrides, page_size):
    cfg = TransformerConfig.preset("tiny", dtype="float64", max_seq_len=64, **overrides)
    torch.manual_seed(0)
    model = Transformer(cfg)
    prompts = _prompts(cfg.vocab_size)
    together = model.generate(prompts, 9, temperature=0, page_size=page_size)
    assert isinstance(together, list) and len(together) == len(prompts)
    for p, got in zip(prompts, together):
        alone = model.generate(p[None], 9, temperature=0)[0]
        assert torch.equal(got, alone)


def test_ragged_generate_stops_each_sequence_at_eos():
    cfg = TransformerConfig.preset("tiny", dtype="float64", max_seq_len=64)
    torch.manual_seed(1)
    model = Transformer(cfg)
    prompts = _prompts(cfg.vocab_size, (4, 9))
    free = model.generate(prompts, 12, temperature=0)
    eos = int(free[1][9 + 2])  # the third token generated for prompt 1
    got = model.generate(prompts, 12, temperature=0, eos_id=eos)
    for p, f, g in zip(prompts, free, got):
        gen = f[len(p):].tolist()
        cut = gen.index(eos) + 1 if eos in gen else len(gen)
        assert g.tolist() == p.tolist() + gen[:cut]
    assert len(got[1]) <= 9 + 3 < len(free[1]), "prompt 1 stops at its eos, before the others"


def test_ragged_generate_bad_input():
    model = Transformer(TransformerConfig.preset("tiny", max_seq_len=32))
    with pytest.raises(ValueError, match=r"tokens\[1\] must be a 1-D tensor"):
        model.generate([torch.tensor([1, 2]), torch.tensor([[1, 2]])], 3)
    with pytest.raises(ValueError, match=r"tokens\[0\]: prompt \(30\) \+ max_new_tokens"):
        model.generate([torch.ones(30, dtype=torch.long)], 3)
    with pytest.raises(ValueError, match="page_size"):
        model.generate([torch.tensor([1, 2])], 3, page_size=0)
    with pytest.raises(ValueError, match="list of prompts is empty"):
        model.generate([], 3)
