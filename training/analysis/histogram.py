"""Activation histograms fitted to each latent's own range, in one streaming pass.

Fixed log-spaced bins shared by every latent (0.001 to 1000) leave most latents in three to
five bars, because each latent's activations span less than a decade. Here latent f has
B linear bins over [0, M_f), M_f a power of two at or above its running max. When a chunk
brings a larger value, M_f doubles as often as needed and neighbouring bins merge pairwise;
since every scale is a power of two times the first, the merged bins are exactly the bins
a histogram made with the final M_f would have, so the counts are exact. At the end the bins
span at least half of [0, max_f] (M_f < 2·max_f), B/2 bars or more.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class FittedHistograms:
    """Per-latent linear histograms: ``scale`` [n] (M_f, 0 until f first fires) and
    ``counts`` [n, B] (bin j counts values in [j·M_f/B, (j+1)·M_f/B))."""

    def __init__(self, n: int, bins: int) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"histogram bins must be a power of two >= 2 (got {bins})")
        self.bins = bins
        self.scale = torch.zeros(n)
        self.counts = torch.zeros(n, bins, dtype=torch.long)

    def add(self, latents: Tensor, values: Tensor) -> None:
        """Count firing entries: ``latents`` [m] and their ``values`` [m] (all > 0)."""
        if not len(values):
            return
        peak = torch.zeros_like(self.scale).scatter_reduce_(0, latents, values, "amax")
        grow = peak > self.scale
        if bool(grow.any()):
            self._grow(grow.nonzero().flatten(), peak[grow])
        bins = (values / self.scale[latents] * self.bins).long().clamp_(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, latents * self.bins + bins, torch.ones_like(bins))

    def _grow(self, rows: Tensor, peak: Tensor) -> None:
        """Raise M_f of ``rows`` to a power of two ≥ ``peak``, merging their bins."""
        old = self.scale[rows]
        fresh = old == 0
        self.scale[rows[fresh]] = torch.exp2(torch.ceil(torch.log2(peak[fresh])))
        factor = torch.exp2(torch.ceil(torch.log2(peak[~fresh] / old[~fresh])))
        growing = rows[~fresh]
        self.scale[growing] = old[~fresh] * factor
        for value in factor.unique().tolist():
            self._merge(growing[factor == value], int(value))

    def _merge(self, rows: Tensor, factor: int) -> None:
        """Sum each run of ``factor`` neighbouring bins of ``rows`` into one (the low end)."""
        if factor >= self.bins:
            merged = self.counts[rows].sum(1, keepdim=True)
        else:
            merged = self.counts[rows].view(len(rows), self.bins // factor, factor).sum(-1)
        out = torch.zeros(len(rows), self.bins, dtype=torch.long)
        out[:, :merged.shape[1]] = merged
        self.counts[rows] = out


def histogram_of(scale: float, counts: list[int], digits: int = 6) -> dict[str, list]:
    """One latent's histogram as stored: bin edges from 0 and counts, cut after the last
    non-empty bin (``{"edges": [], "counts": []}`` for a latent that never fired)."""
    return histograms_of(np.array([scale], dtype=np.float64),
                         np.array([counts], dtype=np.int64).reshape(1, -1), digits)[0]


def histograms_of(scales: np.ndarray, counts: np.ndarray, digits: int = 6
                  ) -> list[dict[str, list]]:
    """``histogram_of`` for every latent at once: ``scales`` [n], ``counts`` [n, bins]
    (numpy or torch); one rounding and one list conversion for all of them."""
    scales = np.asarray(scales, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    bins = counts.shape[1]
    nonzero = counts > 0
    used = np.where(nonzero.any(1), bins - nonzero[:, ::-1].argmax(1), 0).tolist()
    edges = np.round(np.arange(bins + 1)[None, :] * (scales / bins)[:, None], digits).tolist()
    return [{"edges": e[:u + 1], "counts": c[:u]} if u and s > 0 else {"edges": [], "counts": []}
            for e, c, u, s in zip(edges, counts.tolist(), used, scales.tolist(), strict=True)]
