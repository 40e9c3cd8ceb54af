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
    ({"position": "relative", "n_kv_heads": 2, "relative_buckets": 8, "relative_max_distance": 12}, 4),  # T5
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


def test_compiled_decode_step_equals_eager_generate():
    """generate(compile=True) (issue #14): the paged one-token step under
    torch.compile(fullgraph=True) gives the eager path's tokens, for a (B, S) batch (eos padding
    included) and for a list of prompts; a second call reuses the compiled step."""
    cfg = TransformerConfig.preset("tiny", dtype="float64", max_seq_len=64, n_kv_heads=2)
    torch.manual_seed(2)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(3)
    batch = torch.randint(0, cfg.vocab_size, (3, 5), generator=g)
    free = model.generate(batch, 10, temperature=0)
    eos = int(free[0, 5 + 1])  # row 0 stops after its second token
    torch._dynamo.reset()
    for eos_id in (None, eos):
        want = model.generate(batch, 10, temperature=0, eos_id=eos_id)
        got = model.generate(batch, 10, temperature=0, eos_id=eos_id, compile=True)
        assert torch.equal(got, want)
    prompts = _prompts(cfg.vocab_size)
    want = model.generate(prompts, 6, temperature=0)
    got = model.generate(prompts, 6, temperature=0, compile=True)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TypeError, match="compile must be True or False"):
        model.generate(batch, 2, compile="yes")
    rel = Transformer(TransformerConfig.preset("tiny", dtype="float64", max_seq_len=64, position="relative",
                                               relative_buckets=8, relative_max_distance=12))
    assert torch.equal(rel.generate(batch, 6, temperature=0, compile=True), rel.generate(batch, 6, temperature=0))
