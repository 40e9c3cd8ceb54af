"""Packed batches in the Transformer: several documents per row through tk.attention_varlen
give the same loss and gradients as the same documents padded one per row (issue #15)."""
import pytest
import torch

from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.modules import Transformer
from truthgpt_kernels.modules.packing import Packed

f64 = torch.float64
LENGTHS = [[5, 9, 2], [16]]  # two rows of 16 tokens: row 0 packs three documents


def _docs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for row in LENGTHS for n in row]


def _packed_batch(docs):
    rows, pos, i = [], [], 0
    for row in LENGTHS:
        rows.append(torch.cat(docs[i:i + len(row)]))
        pos.append(torch.cat([torch.arange(n) for n in row]))
        i += len(row)
    return torch.stack(rows), torch.stack(pos)


def _targets(tok, pos):
    """Next-token targets within each document; the last token of a document predicts nothing."""
    t = torch.full_like(tok, -100)
    nxt = torch.roll(pos, -1, dims=1)
    same_doc = nxt == pos + 1
    same_doc[:, -1] = False
    t[same_doc] = torch.roll(tok, -1, dims=1)[same_doc]
    return t


@pytest.mark.parametrize("position, model_type", [("rope", "decoder"), ("alibi", "decoder"),
                                                  ("learned", "decoder"), ("rope", "encoder"),
                                                  ("relative", "decoder"), ("relative", "encoder")])
def test_packed_step_equals_padded_documents(position, model_type):
    cfg = TransformerConfig.preset("tiny", position=position, model_type=model_type,
                                   dtype="float64", max_seq_len=32, n_kv_heads=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    docs = _docs(cfg.vocab_size)
    tok, pos = _packed_batch(docs)
    tgt = _targets(tok, pos)
    # packed: one forward over both rows, documents separated by position restarts
    _, loss = model(tok, tgt, position_ids=pos)
    loss.backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # reference: each document alone (no padding needed), token-weighted mean of the losses
    total, count = 0.0, 0
    for d in docs:
        t = torch.full_like(d, -100)
        t[:-1] = d[1:]
        n = int((t != -100).sum())
        if n == 0:
            continue
        _, l_doc = model(d[None], t[None])
        total = total + l_doc * n
        count += n
    (total / count).backward()
    torch.testing.assert_close(loss, total / count, rtol=1e-10, atol=1e-12)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_cu_seqlens_equals_position_ids():
    cfg = TransformerConfig.preset("tiny", dtype="float64", max_seq_len=32)
    torch.manual_seed(1)
    model = Transformer(cfg)
    tok, pos = _packed_batch(_docs(cfg.vocab_size))
    cu = torch.tensor([0, 5, 14, 16, 32], dtype=torch.int32)
    torch.testing.assert_close(model(tok, cu_seqlens=cu), model(tok, position_ids=pos), rtol=0, atol=0)
    p = Packed.from_cu_seqlens(cu, 2, 16)
    assert torch.equal(p.position_ids, pos) and p.max_seqlen == 16


def test_packed_bad_input():
    model = Transformer(TransformerConfig.preset("tiny", max_seq_len=32))
    tok = torch.randint(0, 100, (2, 16))
    with pytest.raises(ValueError, match="every row start"):
        model(tok, cu_seqlens=torch.tensor([0, 20, 32], dtype=torch.int32))
    with pytest.raises(ValueError, match="rise from 0"):
        model(tok, cu_seqlens=torch.tensor([0, 16, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        model(tok, cu_seqlens=torch.tensor([0, 16, 32]))
    with pytest.raises(ValueError, match="position_ids must have the shape"):
        model(tok, position_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="not both"):
        model(tok, position_ids=torch.zeros(2, 16, dtype=torch.long),
              cu_seqlens=torch.tensor([0, 16, 32], dtype=torch.int32))


def test_packed_step_with_attention_dropout():
    """attn_dropout in training reaches packed documents (tk.attention_varlen's dropout): the
    loss changes in training, repeats under the same torch seed, has gradients, and eval mode
    drops nothing (equal to the model without attn_dropout)."""
    cfg = TransformerConfig.preset("tiny", dtype="float64", max_seq_len=32, attn_dropout=0.3)
    torch.manual_seed(2)
    model = Transformer(cfg)
    tok, pos = _packed_batch(_docs(cfg.vocab_size))
    tgt = _targets(tok, pos)
    model.eval()
    _, eval_loss = model(tok, tgt, position_ids=pos)
    plain = Transformer(TransformerConfig.preset("tiny", dtype="float64", max_seq_len=32))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(plain(tok, tgt, position_ids=pos)[1], eval_loss, rtol=0, atol=0)
    model.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)
        _, loss = model(tok, tgt, position_ids=pos)
        losses.append(loss)
    assert torch.equal(losses[0], losses[1]) and not torch.allclose(losses[0], eval_loss)
    losses[0].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
