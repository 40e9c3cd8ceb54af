"""Packed documents through the patched Hugging Face attention (issue #15): position_ids that
restart inside a row, or flash-attn's cu_seq_lens_q/k keyword arguments, run
tk.attention_varlen, and equal each document run alone. Tiny random float64 models."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from truthgpt_kernels.integrations import hf  # noqa: E402
from .test_hf import COMMON  # noqa: E402

LENGTHS = [5, 9, 2, 8]  # one row of 24 tokens


def make(cls="Llama", **extra):
    cfg = getattr(transformers, f"{cls}Config")(**COMMON, **extra, attn_implementation="sdpa")
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).double().eval()


def packed_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 96, (n,), generator=g) for n in LENGTHS]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    return docs, ids, pos


def _spy(monkeypatch):
    calls = []
    real = hf.ops.attention_varlen
    monkeypatch.setattr(hf.ops, "attention_varlen", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("cls, extra", [("Llama", {}), ("Mistral", {"sliding_window": 4})])
@pytest.mark.parametrize("spelling", ["position_ids", "flash_kwargs"])
def test_packed_documents_equal_each_document_alone(cls, extra, spelling, monkeypatch):
    calls = _spy(monkeypatch)
    model = make(cls, **extra)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    docs, ids, pos = packed_inputs()
    if spelling == "position_ids":
        kw = {"position_ids": pos}
    else:
        cu = torch.tensor([0, 5, 14, 16, 24], dtype=torch.int32)
        kw = {"position_ids": pos, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
              "max_length_q": 9, "max_length_k": 9}
    with torch.no_grad():
        out = model(ids, use_cache=False, **kw).logits[0]
        alone = torch.cat([ref(d[None], use_cache=False).logits[0] for d in docs])
    assert len(calls) == COMMON["num_hidden_layers"], "every layer must take the varlen path"
    assert torch.equal(calls[0].cpu(), torch.tensor([0, 5, 14, 16, 24], dtype=torch.int32))
    torch.testing.assert_close(out, alone, rtol=1e-6, atol=1e-6)


def test_packed_training_gradients_match_unpatched():
    """Same loss and gradients as transformers' own sdpa path with its block-diagonal mask."""
    model = make()
    ref = copy.deepcopy(model)
    hf.apply_to(model, fused_loss=False)
    _, ids, pos = packed_inputs(1)
    labels = ids.clone()
    a = model(ids, position_ids=pos, labels=labels, use_cache=False)
    b = ref(ids, position_ids=pos, labels=labels, use_cache=False)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for (n, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_restarting_positions_with_a_padding_mask_are_not_packed(monkeypatch):
    """A 2-D padding mask: transformers does not treat the rows as packed (its mask lets a
    document see the one before it), so neither do we."""
    calls = _spy(monkeypatch)
    model = make()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    _, ids, pos = packed_inputs(2)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = model(ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
        exp = ref(ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    assert calls == []
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)


def test_shared_prefix_4d_mask_is_not_packed_documents(monkeypatch):
    """transformers' test_custom_4d_attention_mask: three continuations of a shared prefix in
    one row, position ids [0 1 2 3 3 3] and a float 4-D mask where each continuation sees the
    prefix. The restarting positions are not separate documents (only a block-diagonal mask
    is): the patched model equals the unpatched one, and the batch of the three sequences."""
    calls = _spy(monkeypatch)
    model = make()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    shared = torch.cat([ids[0, :-1], ids[:, -1]])[None]
    allowed = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                            [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]])
    mask = (allowed == 0).to(torch.float64)[None, None] * torch.finfo(torch.float64).min
    pos = torch.tensor([[0, 1, 2, 3, 3, 3]])
    with torch.no_grad():
        got = model(shared, attention_mask=mask, position_ids=pos).logits
        exp = ref(shared, attention_mask=mask, position_ids=pos).logits
        batch = model(ids, position_ids=torch.arange(4).expand(3, 4)).logits
    assert calls == []
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[0, -3:], batch[:, -1], rtol=1e-6, atol=1e-6)
