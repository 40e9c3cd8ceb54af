"""tk.embedding / modules.Embedding against F.embedding / nn.Embedding: the same lookup and the
same weight gradient (the CPU kernel sums the rows of a token's gradient in token order, as
torch does: equal to the bit), padding_idx, int32 indices, the fallbacks, gradcheck, opcheck,
torch.compile, bad inputs."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.modules.embeddings import Embedding

CPU_BUILT = not backends.unavailable_reason("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("padding_idx", [None, 3, -2])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_matches_torch(dtype, padding_idx, index_dtype):
    torch.manual_seed(0)
    n, d = 40, 24
    idx = torch.randint(0, n, (3, 17), dtype=index_dtype)
    idx[0, :5] = 3  # repeated rows, and the padding row when padding_idx == 3
    idx[1, :4] = n - 2
    w = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w2 = w.detach().clone().requires_grad_()
    g = torch.randn(3, 17, d, dtype=dtype)
    out = tk.embedding(idx, w, padding_idx)
    out.backward(g)
    ref = F.embedding(idx, w2, padding_idx)
    ref.backward(g)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(w.grad, w2.grad)


def test_cpu_kernel_runs_and_large_vocab():
    if not CPU_BUILT:
        pytest.skip("C++ CPU extension not built")
    from torch.profiler import profile
    torch.manual_seed(0)
    w = torch.randn(5000, 64, requires_grad=True)
    idx = torch.randint(0, 5000, (2, 300))
    g = torch.randn(2, 300, 64)
    with profile() as prof:
        tk.embedding(idx, w).backward(g)
    assert "truthgpt::embedding_bwd" in {e.key for e in prof.key_averages()}
    w2 = w.detach().clone().requires_grad_()
    F.embedding(idx, w2).backward(g)
    assert torch.equal(w.grad, w2.grad)


def test_gradcheck_and_opcheck():
    torch.manual_seed(0)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[1, 2, 2], [8, 0, 1]])
    # (no padding_idx here: its row is looked up but gets no gradient, by definition)
    assert torch.autograd.gradcheck(lambda w: tk.embedding(idx, w), (w,))
    # double backward (the CPU kernel's gradient is not differentiable: create_graph takes
    # torch's; it used to return a weight gradient detached from grad_output, silently)
    assert torch.autograd.gradgradcheck(lambda w: tk.embedding(idx, w), (w,))
    assert torch.autograd.gradgradcheck(lambda w: tk.embedding(idx, w, padding_idx=2), (w,))
    torch.library.opcheck(torch.ops.truthgpt.embedding.default, (w, idx, 2))


def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    idx = torch.randint(0, 30, (2, 5))

    def fn(w):
        return (tk.embedding(idx, w, 1) ** 2).sum()
    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        w = torch.arange(30 * 6, dtype=torch.float32).reshape(30, 6).div(100).requires_grad_()
        f(w).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_module_is_nn_embedding():
    torch.manual_seed(0)
    m = Embedding(20, 8, padding_idx=0)
    ref = torch.nn.Embedding(20, 8, padding_idx=0)
    ref.load_state_dict(m.state_dict())
    assert isinstance(m, torch.nn.Embedding) and m.state_dict().keys() == ref.state_dict().keys()
    idx = torch.tensor([[0, 3, 3, 19]])
    m(idx).sum().backward()
    ref(idx).sum().backward()
    assert torch.equal(m.weight.grad, ref.weight.grad)
    sparse = Embedding(20, 8, sparse=True)  # options torch's path serves
    sparse(idx).sum().backward()
    assert sparse.weight.grad.is_sparse


def test_no_grad_and_frozen_weight():
    w = torch.randn(10, 3)
    idx = torch.tensor([1, 2])
    assert torch.equal(tk.embedding(idx, w), w[idx])
    w.requires_grad_()
    with torch.no_grad():
        assert not tk.embedding(idx, w).requires_grad


def test_bad_inputs():
    w = torch.randn(10, 3, requires_grad=True)
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        tk.embedding(torch.tensor([1]), w[0])
    with pytest.raises(TypeError, match="indices must be an int64 or int32 tensor"):
        tk.embedding(torch.tensor([1.0]), w)
    with pytest.raises(ValueError, match="padding_idx must be within"):
        tk.embedding(torch.tensor([1]), w, 10)
    with pytest.raises(IndexError):
        tk.embedding(torch.tensor([10]), w)
    if CPU_BUILT:
        with pytest.raises(IndexError, match="out of range"):
            torch.ops.truthgpt.embedding_bwd(torch.randn(1, 3), torch.tensor([10]), 10, -1)
