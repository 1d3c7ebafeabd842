"""Sparse autograd functions for TopK-style SAEs.

After TopK only ``k`` of ``n`` latents per token are non-zero, so everything after the
encoder's one dense matmul can be sparse, the backward pass included. Autograd through
``pre.gather(...)`` would instead produce a dense [B, n] gradient and a second dense
matmul for ``dW_enc`` (doubling the cost); these functions compute the same gradients
from the [B, k] selection only (cf. OpenAI's sparse_autoencoder kernels and sparsify's
fused encoder).

Shapes: B tokens, d model dim, n latents, k selected per token. Weight matrices are stored
latent-major, [n, d], so a latent's encoder or decoder vector is one contiguous row.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# CSR support is stable for the three ops used here; the blanket beta notice is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _csr(indices: Tensor, values: Tensor, n: int) -> Tensor:
    """The [B, n] matrix with ``values[b, i]`` at column ``indices[b, i]`` as sparse CSR.

    Every row has the same number m of stored entries, so the row pointer is arange·m.
    Column indices within a row must be distinct and ascending (``sae.top_columns``).
    """
    batch, width = indices.shape
    crow = torch.arange(0, batch * width + 1, width, device=indices.device)
    return torch.sparse_csr_tensor(crow, indices.reshape(-1), values.reshape(-1), (batch, n),
                                   check_invariants=False)


def _scatter_outer(rows: Tensor, indices: Tensor, coeffs: Tensor, n: int) -> Tensor:
    """``out[j] = Σ_{b,i: indices[b,i]=j} coeffs[b,i] · rows[b]`` for j < n.

    rows [B, d], indices/coeffs [B, m] -> [n, d]: Zᵀ·rows with Z the sparse code, the
    weight gradient of a gathered linear map, in O(B·m·d).
    """
    return (_csr(indices, coeffs.to(rows.dtype), n).t() @ rows).to_dense()


def _gather_rows_dot(grad: Tensor, weight: Tensor, indices: Tensor) -> Tensor:
    """``out[b, i] = grad[b] · weight[indices[b, i]]``: grad [B, d], weight [n, d] -> [B, m].

    The product grad·weightᵀ sampled only at the selected entries (SDDMM).
    """
    pattern = _csr(indices, grad.new_zeros(indices.shape), weight.shape[0])
    sampled = torch.sparse.sampled_addmm(pattern, grad, weight.t(), beta=0.0)
    return sampled.values().reshape(indices.shape)


class SparseEncode(torch.autograd.Function):
    """Selected encoder activations with a sparse backward.

    Forward: ``values = pre[b, indices[b]] · mask`` where ``pre = x @ w_enc.T + b_enc`` was
    computed (without grad) by the caller, who needed it to choose ``indices``.
    Backward: gradients for x [B, d], w_enc [n, d] and b_enc [n] touching only the
    selected (b, latent) pairs: O(B·k·d) instead of O(B·n·d).
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, pre: Tensor,
                indices: Tensor, mask: Tensor) -> Tensor:
        values = pre.gather(1, indices) * mask
        ctx.save_for_backward(x, w_enc, indices, mask)
        return values

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        x, w_enc, indices, mask = ctx.saved_tensors
        grad = grad_values * mask
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, w_enc, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_w = _scatter_outer(x, indices, grad, w_enc.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = grad.new_zeros(w_enc.shape[0]).index_add_(0, indices.reshape(-1),
                                                               grad.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """``out[b] = Σ_i values[b, i] · w_dec[indices[b, i]]`` with a sparse backward.

    values/indices [B, k], w_dec [n, d] -> [B, d]. The forward is an ``embedding_bag``
    (a gathered sum, never a dense [B, n] @ [n, d] matmul).
    """

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, w_dec: Tensor) -> Tensor:
        ctx.save_for_backward(values, indices, w_dec)
        return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, w_dec = ctx.saved_tensors
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = _gather_rows_dot(grad_out, w_dec, indices)
        if ctx.needs_input_grad[2]:
            grad_w = _scatter_outer(grad_out, indices, values, w_dec.shape[0])
        return grad_values, None, grad_w


def sparse_encode(x: Tensor, w_enc: Tensor, b_enc: Tensor, pre: Tensor, indices: Tensor,
                  mask: Tensor) -> Tensor:
    return SparseEncode.apply(x, w_enc, b_enc, pre, indices, mask)


def sparse_decode(values: Tensor, indices: Tensor, w_dec: Tensor) -> Tensor:
    return SparseDecode.apply(values, indices, w_dec)
