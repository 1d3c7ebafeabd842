"""The sparse kernels give exactly the gradients dense autograd gives."""

import torch
import torch.nn.functional as F

from training.sae.kernels import sparse_decode, sparse_encode


def _dense_reference(x, w_enc, b_enc, w_dec, indices, mask):
    pre = F.linear(x, w_enc, b_enc)
    values = pre.gather(1, indices) * mask
    dense = torch.zeros_like(pre).scatter(1, indices, values)
    return values, dense @ w_dec


def test_sparse_gradients_match_dense_autograd():
    torch.manual_seed(0)
    b, d, n, k = 9, 5, 13, 3
    x = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(n, d, dtype=torch.float64, requires_grad=True),
              torch.randn(n, dtype=torch.float64, requires_grad=True),
              torch.randn(n, d, dtype=torch.float64, requires_grad=True)]
    w_enc, b_enc, w_dec = params
    with torch.no_grad():
        pre = F.relu(F.linear(x, w_enc, b_enc))
    indices = pre.topk(k, dim=1).indices
    mask = (pre.gather(1, indices) > 0).to(x.dtype)
    target = torch.randn(b, d, dtype=torch.float64)

    values = sparse_encode(x, w_enc, b_enc, pre, indices, mask)
    loss = ((sparse_decode(values, indices, w_dec) - target) ** 2).sum()
    grads = torch.autograd.grad(loss, [x, *params])

    ref_values, ref_out = _dense_reference(x, w_enc, b_enc, w_dec, indices, mask)
    ref_loss = ((ref_out - target) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, [x, *params])
    torch.testing.assert_close(values, ref_values)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_gradcheck_decode():
    torch.manual_seed(1)
    values = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w_dec = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 5], [1, 1], [2, 3], [4, 0]])
    assert torch.autograd.gradcheck(lambda v, w: sparse_decode(v, indices, w), (values, w_dec))
