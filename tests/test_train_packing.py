"""train --data packs documents (blank-line separated) into rows without attention across
them (issue #15): the batches' position_ids and targets, and a short run both ways."""
import torch

from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.train import IGNORE, TextData, train

TEXT = b"first doc\nline two\n\nsecond\n\nthird document here\n\n" * 20


def test_text_batches_restart_positions_at_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(TEXT)
    task = TextData(str(path), 24)
    tokens, targets, kw = task.batch(6, torch.Generator().manual_seed(0))
    pos = kw["position_ids"]
    for row in range(6):
        t, y, p = tokens[row].tolist(), targets[row].tolist(), pos[row].tolist()
        assert p[0] == 0, "positions restart at the window start"
        for i in range(1, 24):
            assert p[i] in (0, p[i - 1] + 1)
            if i >= 2:  # a document opens right after a blank line, and only there
                assert (p[i] == 0) == (t[i - 2:i] == [10, 10])
            # the byte before a document's first predicts nothing; the others the next byte
            assert y[i - 1] == (IGNORE if p[i] == 0 else t[i])
    assert int((targets == IGNORE).sum()) > 0
    plain = TextData(str(path), 24, pack=False)
    t2, y2, kw2 = plain.batch(6, torch.Generator().manual_seed(0))
    assert kw2 == {} and torch.equal(t2, tokens) and not bool((y2 == IGNORE).any())


def test_train_on_packed_and_plain_text(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(TEXT)
    cfg = TransformerConfig.preset("tiny", max_seq_len=64)
    for pack in (True, False):
        _, result = train(cfg, steps=3, batch_size=4, data=str(path), seq_len=32, pack=pack,
                          progress=False, evaluate=True)
        assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
