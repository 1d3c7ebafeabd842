"""Matching the latents of two SAEs by the cosine similarity of their decoder directions
(two widths, seeds, layers or checkpoints of one model).

Each latent of A gets its nearest latent of B (and the other way round); a pair is
*mutual* when each is the other's nearest. A latent counts as matched when its nearest
cosine reaches ``threshold`` (0.7 by default, where decoder directions are clearly the same
feature). The similarities are computed in chunks of A's latents, so memory stays at
chunk × n_B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_THRESHOLD = 0.7
MAX_PRODUCT = 1 << 28
"""Largest n_A × n_B compared at once (about 2.7·10⁸ cosines: seconds on a CPU)."""


@dataclass
class Matching:
    """Nearest partners both ways: indices and cosines [n_A] / [n_B]."""

    a_to_b: Tensor
    a_cosine: Tensor
    b_to_a: Tensor
    b_cosine: Tensor

    def mutual(self) -> Tensor:
        """[n_A] bool: A's nearest in B has A as its nearest too."""
        return self.b_to_a[self.a_to_b] == torch.arange(len(self.a_to_b))

    def unmatched_share(self, threshold: float = DEFAULT_THRESHOLD) -> tuple[float, float]:
        """Shares of A's and of B's latents whose nearest cosine is below ``threshold``."""
        return (float((self.a_cosine < threshold).float().mean()),
                float((self.b_cosine < threshold).float().mean()))


@torch.no_grad()
def match_decoders(w_a: Tensor, w_b: Tensor, chunk: int = 2048) -> Matching:
    """Match decoder rows ``w_a`` [n_A, d] and ``w_b`` [n_B, d] by cosine."""
    if w_a.shape[1] != w_b.shape[1]:
        raise ValueError(f"the SAEs read different widths ({w_a.shape[1]} and "
                         f"{w_b.shape[1]}): their directions cannot be compared")
    if w_a.shape[0] * w_b.shape[0] > MAX_PRODUCT:
        raise ValueError(f"{w_a.shape[0]:,} × {w_b.shape[0]:,} latents is too many to "
                         "compare here")
    a = torch.nn.functional.normalize(w_a.float(), dim=1)
    b = torch.nn.functional.normalize(w_b.float(), dim=1)
    a_best, a_idx = [], []
    b_best = torch.full((b.shape[0],), -2.0)
    b_idx = torch.zeros(b.shape[0], dtype=torch.long)
    for start in range(0, a.shape[0], chunk):
        sims = a[start:start + chunk] @ b.t()
        top = sims.max(dim=1)
        a_best.append(top.values)
        a_idx.append(top.indices)
        column = sims.max(dim=0)
        better = column.values > b_best
        b_best[better] = column.values[better]
        b_idx[better] = column.indices[better] + start
    return Matching(torch.cat(a_idx), torch.cat(a_best), b_idx, b_best)
