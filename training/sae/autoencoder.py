"""TopK and BatchTopK sparse autoencoders (Gao et al. 2024; Bussmann et al. 2024).

Maths (x [B, d] residual-stream activations, n latents)::

    pre = ReLU(W_enc (x − b_dec) + b_enc)             [B, n]
    z   = TopK_k(pre)         (topk: per token)
        | top k·B of pre over the whole batch        (batchtopk, training)
        | pre · [pre > θ]                            (batchtopk, inference; θ learned)
        | pre · [pre > θ_f]                          (jumprelu: a threshold per latent)
    x̂  = W_dec z + b_dec

Transcoders (``site = "mlp"``; Dunefsky et al. 2024) read the input of block L's MLP x and
predict its output y instead of reconstructing x: the encoder takes x as it is (no b_dec
offset: b_dec lives in the output space), ŷ = W_dec z + b_dec, and the loss is the FVU of
y. A skip-transcoder (Paulo et al. 2025) adds a linear path: ŷ = W_dec z + W_skip x + b_dec,
W_skip [d, d] starting at zero.

JumpReLU SAEs (SAELens' ``jumprelu``, and ``gated`` and ReLU ones, which convert to it
exactly) are imported for analysis and steering, not trained here.

Loss = FVU + α·AuxK where FVU = ‖x − x̂‖² / ‖x − x̄‖² and AuxK is the FVU of the
reconstruction error e = x − x̂ by the top-k_aux *dead* latents (no activation in the last
``dead_tokens`` tokens), α = 1/32, k_aux = d/2 by default.

Matryoshka (Bussmann et al. 2025; ``matryoshka_widths`` m_1 < … < m_L < n): the same
selected latents, and every prefix of the dictionary must reconstruct x on its own::

    x̂_m = Σ_{i selected, i < m} z_i W_dec[i] + b_dec
    loss = FVU(x̂) + Σ_l FVU(x̂_{m_l}) + α·AuxK

so the first latents learn general directions and later ones refine them (SAELens sums
the levels' losses the same way). Inference is unchanged: a Matryoshka BatchTopK SAE is
a BatchTopK SAE, saved as SAELens saves one (JumpReLU with the learned threshold).

Weights are stored latent-major: ``w_enc`` and ``w_dec`` are [n, d], so each latent's
encoder/decoder vector is a contiguous row (the sparse kernels gather rows). Decoder rows
are kept unit-norm during training. On disk the SAELens layout is used instead
(``W_enc`` [d, n], ``W_dec`` [n, d]) — see ``training.sae.folder``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.sae.kernels import sparse_decode, sparse_encode

Architecture = Literal["topk", "batchtopk", "jumprelu"]
Site = Literal["resid", "mlp"]
SITES: tuple[str, ...] = ("resid", "mlp")
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu")
TRAINABLE: tuple[str, ...] = ("topk", "batchtopk")

# Cross-process reductions used by the loss; identity in a single process. Distributed
# training passes all-reduce / all-gather so that every rank computes the *global*
# batch statistics and the summed gradients equal the single-process ones.
SumFn = Callable[[Tensor], Tensor]
GatherFn = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class SaeConfig:
    """Shape and sparsity of an SAE (saved in ``cfg.json``)."""

    d_in: int
    """Width of the activations (the model's hidden size)."""
    n_latents: int
    """Number of dictionary latents n."""
    k: int
    """Active latents per token (on average over the batch, for batchtopk)."""
    architecture: Architecture = "topk"
    """``topk`` (exactly k per token) or ``batchtopk`` (k·B per batch; a threshold at inference)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss; None means d_in // 2."""
    aux_coef: float = 1 / 32
    """α, the AuxK loss weight."""
    dead_tokens: int | None = None
    """A latent that has not fired in this many tokens counts as dead (and AuxK trains it);
    None: scaled to the run (``dead_window``), so that short runs can revive latents too."""
    matryoshka_widths: tuple[int, ...] = ()
    """Nested prefix widths that must each reconstruct the input (empty: a plain SAE)."""
    site: Site = "resid"
    """``resid``: an SAE of block L's output; ``mlp``: a transcoder from block L's MLP input
    to its output."""
    skip: bool = False
    """A transcoder's linear skip path W_skip (a skip-transcoder)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--arch {self.architecture!r} is unknown: "
                             f"choose one of {', '.join(ARCHITECTURES)}")
        if self.d_in < 1:
            raise ValueError(f"d_in must be positive (got {self.d_in})")
        if self.n_latents < 2:
            raise ValueError(f"--latents must be at least 2 (got {self.n_latents})")
        if not 1 <= self.k < self.n_latents:
            raise ValueError(f"--k must be between 1 and --latents - 1 (got --k {self.k}, "
                             f"--latents {self.n_latents})")
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)
        if self.dead_tokens is not None and self.dead_tokens < 1:
            raise ValueError(f"--dead-tokens must be positive (got {self.dead_tokens})")
        self.matryoshka_widths = check_matryoshka_widths(self.matryoshka_widths,
                                                         self.n_latents)
        if self.site not in SITES:
            raise ValueError(f"--site {self.site!r} is unknown: choose resid or mlp")
        if self.site == "mlp" and self.architecture == "topk":
            raise ValueError("--arch topk: a transcoder trains as batchtopk (SAELens loads "
                             "transcoders as JumpReLU, which BatchTopK is exactly at "
                             "inference; TopK has no SAELens transcoder)")
        if self.skip and self.site != "mlp":
            raise ValueError("--skip: a skip connection is for transcoders (a capture "
                             "made with --site mlp)")

    @property
    def transcoder(self) -> bool:
        return self.site == "mlp"

    def to_dict(self) -> dict:
        return asdict(self)

    def for_run(self, run_tokens: int, batch: int) -> SaeConfig:
        """This config with ``dead_tokens`` fixed for a run of ``run_tokens`` tokens."""
        if self.dead_tokens is not None:
            return self
        return replace(self, dead_tokens=dead_window(run_tokens, batch))

    @classmethod
    def from_dict(cls, data: dict) -> SaeConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def check_matryoshka_widths(widths, n_latents: int) -> tuple[int, ...]:
    """Strictly increasing prefix widths in [1, n); n itself (the whole SAE) is dropped."""
    widths = tuple(int(w) for w in widths or ())
    if widths and widths[-1] == n_latents:
        widths = widths[:-1]
    if any(not 1 <= w < n_latents for w in widths) or any(
            a >= b for a, b in itertools.pairwise(widths)):
        raise ValueError(f"--matryoshka: widths must increase strictly and stay below "
                         f"--latents {n_latents} (got {','.join(map(str, widths))})")
    return widths


DEAD_WINDOW_MAX = 10_000_000
"""The dead window of long runs (OpenAI's and sparsify's choice: 10M tokens)."""


def dead_window(run_tokens: int, batch: int) -> int:
    """Tokens without firing after which a latent counts as dead: half the run, at least
    two batches and at most ``DEAD_WINDOW_MAX``. A fixed 1M-token window is longer than a
    131k-token run, so AuxK could never switch on there; a much shorter one calls rare but
    live latents dead, and AuxK then pushes their activations down (the residual they are
    asked to reconstruct is far smaller than their summed codes): on the demo's capture, with
    16,384 latents and k = 16, a tenth of the run left 19.7% of the latents dead where no
    AuxK left 2.9%, and half the run 3.1%."""
    return max(2 * batch, min(DEAD_WINDOW_MAX, run_tokens // 2))


class Encoding(NamedTuple):
    """Sparse code of a batch: ``values``/``indices`` [B, m] (m = k for topk; unselected
    slots hold value 0) and the detached post-ReLU pre-activations ``pre`` [B, n]."""

    values: Tensor
    indices: Tensor
    pre: Tensor


class ForwardOutput(NamedTuple):
    """What a training step needs: reconstruction [B, d] and the loss terms (scalars;
    ``nested_fvu`` is the Matryoshka prefixes' summed FVU, 0 for a plain SAE)."""

    x_hat: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    encoding: Encoding
    nested_fvu: Tensor


def variance_sum(x: Tensor, reduce_sum: SumFn = _identity) -> Tensor:
    """Σ_b ‖x_b − x̄‖² over the (global) batch; x [B, d] -> scalar.

    Computed from reduced first and second moments so that every rank of a distributed
    run gets the same global value.
    """
    stats = torch.cat([x.sum(0), (x * x).sum().reshape(1),
                       x.new_tensor([x.shape[0]])])
    stats = reduce_sum(stats)
    total, sq, count = stats[:-2], stats[-2], stats[-1]
    return sq - (total * total).sum() / count


def fvu_loss(x: Tensor, x_hat: Tensor, denominator: Tensor) -> Tensor:
    """‖x − x̂‖² / denominator, x/x_hat [B, d]; the denominator is the (global) variance sum."""
    return (x - x_hat).pow(2).sum() / denominator.clamp_min(1e-12)


def batch_threshold(pre: Tensor, count: int, gather: GatherFn = _identity) -> Tensor:
    """The ``count``-th largest value of ``pre`` across the (global) batch.

    Each rank contributes its local top-``count`` (the global top-``count`` is a subset of
    their union), so the result is exact in a distributed run.
    """
    flat = pre.reshape(-1)
    local = flat.topk(min(count, flat.numel()), sorted=False).values
    if local.numel() < count:
        local = torch.cat([local, local.new_full((count - local.numel(),), -math.inf)])
    return gather(local).topk(count, sorted=False).values.min()


def top_columns(scores: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The ``width`` largest entries of each row of scores [B, n]: their column indices
    [B, width], ascending (sparse CSR wants sorted columns), and a 0/1 mask [B, width] of
    the positive ones."""
    top = scores.topk(width, dim=1, sorted=False)
    indices, order = top.indices.sort(dim=1)
    return indices, (top.values.gather(1, order) > 0).to(scores.dtype)


class SparseAutoencoder(nn.Module):
    """A TopK / BatchTopK SAE; see the module docstring for the maths."""

    def __init__(self, cfg: SaeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.n_latents, cfg.d_in
        w_dec = torch.randn(n, d)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.w_dec = nn.Parameter(w_dec)
        self.w_enc = nn.Parameter(w_dec.clone())  # W_enc = W_decᵀ at init
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.skip:  # a skip-transcoder's linear path, from zero
            self.w_skip = nn.Parameter(torch.zeros(d, d))
        # BatchTopK's inference threshold θ (an EMA of the smallest selected activation);
        # JumpReLU's per-latent thresholds [n]
        self.register_buffer("threshold", torch.zeros(n) if cfg.architecture == "jumprelu"
                             else torch.tensor(0.0))

    matmul_dtype: torch.dtype = torch.float32
    """dtype of the encoder's dense matmul (bf16 in ``--precision bf16`` training; the
    parameters stay fp32 and the result is cast back)."""

    # -- encoding ---------------------------------------------------------------------
    def encoder_input(self, x: Tensor) -> Tensor:
        """What W_enc multiplies: x − b_dec for an SAE, x itself for a transcoder."""
        return x if self.cfg.transcoder else x - self.b_dec

    def pre_activations(self, x: Tensor) -> Tensor:
        """ReLU(W_enc (x − b_dec) + b_enc) without grad: [B, d] -> [B, n]."""
        with torch.no_grad():
            if self.matmul_dtype == torch.float32:
                return F.relu(F.linear(self.encoder_input(x), self.w_enc, self.b_enc))
            low = self.matmul_dtype
            pre = F.linear(self.encoder_input(x).to(low), self.w_enc.to(low),
                           self.b_enc.to(low))
            return F.relu(pre).float()

    def select(self, pre: Tensor, *, training: bool, gather: GatherFn = _identity
               ) -> tuple[Tensor, Tensor]:
        """Choose the active latents: indices [B, m] and a 0/1 mask [B, m]."""
        k = self.cfg.k
        if self.cfg.architecture == "topk":
            return top_columns(pre, k)
        if training and self.cfg.architecture == "batchtopk":
            world = int(gather(pre.new_ones(1)).numel())
            theta = batch_threshold(pre, k * pre.shape[0] * world, gather)
            self._update_threshold(theta)
            keep = (pre >= theta) & (pre > 0)
        else:  # θ: BatchTopK's scalar, or JumpReLU's [n]
            keep = (pre > self.threshold) & (pre > 0)
        return top_columns(pre * keep, max(1, int(keep.sum(1).max())))

    def _update_threshold(self, theta: Tensor, decay: float = 0.9) -> None:
        """EMA of the per-batch threshold. A short memory (0.9): each batch's θ is a quantile
        over k·B values, hence precise, while θ drifts down all through training — a slow
        EMA (0.99) lags so far behind that short runs infer with L0 well below k."""
        with torch.no_grad():
            theta = theta.clamp_min(0).to(self.threshold)
            if self.threshold == 0:
                self.threshold.copy_(theta)
            else:
                self.threshold.mul_(decay).add_(theta, alpha=1 - decay)

    def encode(self, x: Tensor, *, gather: GatherFn = _identity) -> Encoding:
        """Sparse code of x [B, d]; differentiable w.r.t. the parameters."""
        pre = self.pre_activations(x)
        indices, mask = self.select(pre, training=self.training, gather=gather)
        values = sparse_encode(self.encoder_input(x), self.w_enc, self.b_enc, pre, indices,
                               mask)
        return Encoding(values, indices, pre)

    def decode(self, values: Tensor, indices: Tensor, source: Tensor | None = None) -> Tensor:
        """x̂ = W_dec z + b_dec: values/indices [B, m] -> [B, d]; a skip-transcoder adds
        W_skip·source, source [B, d] being the input it encoded."""
        out = sparse_decode(values, indices, self.w_dec) + self.b_dec
        if self.cfg.skip:
            if source is None:
                raise ValueError("a skip-transcoder decodes with the input it encoded")
            out = out + F.linear(source, self.w_skip)
        return out

    def forward_output(self, x: Tensor) -> Tensor:
        """x̂ (an SAE) or ŷ (a transcoder) of inputs x [B, d], in inference mode."""
        enc = self.encode(x)
        return self.decode(enc.values, enc.indices, x)

    def dense_latents(self, x: Tensor) -> Tensor:
        """z as a dense [B, n] tensor (analysis and steering; no grad)."""
        with torch.no_grad():
            enc = self.encode(x)
            return torch.zeros_like(enc.pre).scatter_(1, enc.indices, enc.values)

    # -- training ---------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None, *,
                target: Tensor | None = None, reduce_sum: SumFn = _identity,
                gather: GatherFn = _identity) -> ForwardOutput:
        """Reconstruct x [B, d] (or predict a transcoder's ``target`` y [B, d]); FVU and AuxK
        use global statistics via ``reduce_sum``.

        ``dead_mask`` [n] (bool) marks dead latents; it must agree across ranks.
        """
        y = x if target is None else target
        enc = self.encode(x, gather=gather)
        y_hat = self.decode(enc.values, enc.indices, x)
        variance = variance_sum(y, reduce_sum)
        fvu = fvu_loss(y, y_hat, variance)
        nested = y.new_zeros(())
        for width in self.cfg.matryoshka_widths:
            nested = nested + fvu_loss(y, self.decode_prefix(enc, width, x), variance)
        auxk = y.new_zeros(())
        if dead_mask is not None and bool(dead_mask.any()):
            auxk = self.auxk_loss(x, y - y_hat.detach(), enc.pre, dead_mask, reduce_sum)
        return ForwardOutput(y_hat, fvu, auxk, enc, nested)

    def decode_prefix(self, enc: Encoding, width: int, source: Tensor | None = None
                      ) -> Tensor:
        """x̂ from the selected latents below ``width`` only: [B, d]."""
        return self.decode(enc.values * (enc.indices < width), enc.indices, source)

    def auxk_loss(self, x: Tensor, residual: Tensor, pre: Tensor, dead_mask: Tensor,
                  reduce_sum: SumFn = _identity) -> Tensor:
        """FVU of the residual e = x − x̂ [B, d] reconstructed (without b_dec) by each
        token's top-k_aux dead latents; gives dead latents a gradient towards useful work."""
        k_aux = min(int(self.cfg.k_aux or 1), int(dead_mask.sum()))
        indices, mask = top_columns(pre * dead_mask, k_aux)
        values = sparse_encode(self.encoder_input(x), self.w_enc, self.b_enc, pre, indices,
                               mask)
        e_hat = sparse_decode(values, indices, self.w_dec)
        return fvu_loss(residual, e_hat, variance_sum(residual, reduce_sum))

    # -- constraints ------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Drop the gradient component along each decoder row (keeps ‖row‖ = 1 to first order)."""
        grad = self.w_dec.grad
        if grad is None:
            return
        grad -= (grad * self.w_dec).sum(1, keepdim=True) * self.w_dec

    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        self.w_dec /= self.w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
