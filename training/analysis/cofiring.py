"""Co-firing latents: for each latent, the latents that fire on the same tokens most often.

Counted on a bounded sample of the analysed tokens (the first ``sample_tokens``): with Z
the 0/1 firing matrix of the sample [T, n], C = ZᵀZ holds in C[i, j] the tokens on which
latents i and j both fire and in C[i, i] those on which i fires. It is accumulated chunk by
chunk as a sparse matrix (a token adds at most k² pairs), so memory is bounded by the pairs
that occur, never n². Each latent keeps its ``count`` partners with the highest Jaccard
index C[i, j] / (C[i, i] + C[j, j] − C[i, j]), with P(j fires | i fires) = C[i, j] / C[i, i]
beside it: decoder-cosine neighbours say which directions are alike, these say which
features travel together in text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CoFiring:
    """Per latent [n, count]: partner indices (−1: none), Jaccard, P(partner | latent)."""

    ids: Tensor
    jaccard: Tensor
    conditional: Tensor
    tokens: int
    """Tokens in the sample."""


class CoFiringCounter:
    """Accumulates C = ZᵀZ over the first ``sample_tokens`` tokens of an analysis."""

    def __init__(self, n: int, sample_tokens: int = 16_384) -> None:
        self.n, self.budget, self.tokens = n, sample_tokens, 0
        self.pairs = torch.empty(2, 0, dtype=torch.long)
        self.counts = torch.empty(0, dtype=torch.float32)

    def add(self, rows: Tensor, latents: Tensor, tokens: int) -> None:
        """Firing entries of a chunk: token ``rows`` [m] (in [0, tokens)) and ``latents``
        [m]; only the part within the sample budget is counted."""
        take = min(tokens, self.budget - self.tokens)
        if take <= 0:
            return
        keep = rows < take
        rows, latents = rows[keep], latents[keep]
        z = torch.sparse_coo_tensor(torch.stack([rows, latents]), torch.ones(len(rows)),
                                    (take, self.n), check_invariants=False).coalesce()
        chunk = torch.sparse.mm(z.t().coalesce(), z).coalesce()
        merged = torch.sparse_coo_tensor(
            torch.cat([self.pairs, chunk.indices()], 1),
            torch.cat([self.counts, chunk.values()]), (self.n, self.n),
            check_invariants=False).coalesce()
        self.pairs, self.counts = merged.indices(), merged.values()
        self.tokens += take

    def result(self, count: int = 10) -> CoFiring:
        """The ``count`` partners of every latent by Jaccard index."""
        i, j = self.pairs
        own = torch.zeros(self.n).index_put_((i[i == j],), self.counts[i == j])
        off = i != j
        i, j, both = i[off], j[off], self.counts[off]
        jaccard = both / (own[i] + own[j] - both).clamp_min(1)
        conditional = both / own[i].clamp_min(1)
        order = _lexsort_rows(i, -jaccard)
        i, j, jaccard, conditional = i[order], j[order], jaccard[order], conditional[order]
        start = torch.searchsorted(i, torch.arange(self.n))
        rank = torch.arange(len(i)) - start[i]
        keep = rank < count
        ids = torch.full((self.n, count), -1, dtype=torch.long)
        jac = torch.zeros(self.n, count)
        cond = torch.zeros(self.n, count)
        ids[i[keep], rank[keep]] = j[keep]
        jac[i[keep], rank[keep]] = jaccard[keep]
        cond[i[keep], rank[keep]] = conditional[keep]
        return CoFiring(ids=ids, jaccard=jac, conditional=cond, tokens=self.tokens)


def _lexsort_rows(primary: Tensor, secondary: Tensor) -> Tensor:
    """Indices sorting by ``primary``, then ``secondary`` (both ascending)."""
    order = secondary.argsort(stable=True)
    return order[primary[order].argsort(stable=True)]
