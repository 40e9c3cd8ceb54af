import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk


def test_fused_linear_cross_entropy_loss_module():
    """The module is tk.linear_cross_entropy with its options stored; x (B, S, d) with
    target (B, S) is flattened."""
    head = torch.nn.Linear(16, 50, bias=False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    t = torch.randint(0, 50, (2, 5))
    t[0, :2] = -100
    loss_fn = tk.FusedLinearCrossEntropyLoss(label_smoothing=0.1, reduction="sum")
    assert "label_smoothing=0.1" in repr(loss_fn)
    loss = loss_fn(x, head.weight, t)
    expected = F.cross_entropy(head(x).flatten(0, 1), t.flatten(), label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected)
    loss.backward()
    gx, gw = torch.autograd.grad(expected, (x, head.weight))
    torch.testing.assert_close(x.grad, gx)
    torch.testing.assert_close(head.weight.grad, gw)
    loss, z = tk.FusedLinearCrossEntropyLoss(z_loss=1e-4, return_z_loss=True)(x, head.weight, t)
    assert z.item() > 0 and not z.requires_grad
    with pytest.raises(ValueError, match=r"target must have shape \(2, 5\)"):
        loss_fn(x, head.weight, t[:, :4])
    low = tk.FusedLinearCrossEntropyLoss(loss_dtype=torch.float32)(x.bfloat16(), head.weight.bfloat16(), t)
    assert low.dtype == torch.float32
