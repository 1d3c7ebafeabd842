"""Examples an analysis keeps: the windows cut during the pass (``WindowTable``) and the
chosen examples of every latent as columns of tensors (``ExampleSet``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LatentExample:
    kind: str
    """``top`` or ``quantile``."""
    bucket: int | None
    rank: int
    context_index: int
    position: int
    tokens: list[int]
    activations: list[float]


@dataclass
class ExampleSet:
    """Every chosen example of every latent as columns [m], sorted by latent, then top
    examples by rank, then quantile buckets from the lowest by rank. Windows are
    [m, 2W+1] around the peak; outside the context the token is −1 (and the activation 0).
    Tensors, not m Python objects: a few MB where lists would take hundreds."""

    latent: Tensor
    bucket: Tensor
    """Quantile bucket, −1 for a top example."""
    rank: Tensor
    context: Tensor
    position: Tensor
    """Position of the peak within its context (BOS = 0)."""
    tokens: Tensor
    activations: Tensor

    def __len__(self) -> int:
        return len(self.latent)

    def token_ids(self) -> set[int]:
        return set(self.tokens.unique().tolist()) - {-1}

    def records(self, latents: Tensor | None = None) -> Iterator[tuple[int, LatentExample]]:
        """(latent, example) in order, with the padding cut off; only ``latents`` if given."""
        rows = torch.arange(len(self)) if latents is None else torch.cat([
            torch.arange(*self._span(int(f))) for f in latents])
        inside = (self.tokens[rows] >= 0).tolist()
        columns = [self.latent[rows], self.bucket[rows], self.rank[rows], self.context[rows],
                   self.position[rows], self.tokens[rows], self.activations[rows]]
        for (f, bucket, rank, context, position, tokens, acts), keep in zip(
                zip(*(c.tolist() for c in columns), strict=True), inside, strict=True):
            start, stop = keep.index(True), len(keep) - keep[::-1].index(True)
            yield f, LatentExample("top" if bucket < 0 else "quantile",
                                   None if bucket < 0 else bucket, rank, context, position,
                                   tokens[start:stop], acts[start:stop])

    def of(self, latent: int) -> list[LatentExample]:
        return [ex for _, ex in self.records(torch.tensor([latent]))]

    def _span(self, latent: int) -> tuple[int, int]:
        lo = int(torch.searchsorted(self.latent, latent))
        return lo, int(torch.searchsorted(self.latent, latent, right=True))


PRUNE_FLOOR = 1 << 16
"""Window rows below which the table is never pruned."""


class WindowTable:
    """Example windows kept by the pass: for each (context, latent) key = context·n + latent
    that entered a latent's top or reservoir set (a key enters at most once: each context
    is in one chunk), the latent's activations over peak ± W, [m, 2W+1]. Chunks' windows
    are kept as parts and joined only when pruned (rows whose key has since left every
    set are dropped whenever the table doubles, so it stays O(n × examples))."""

    def __init__(self, width: int) -> None:
        self.keys = [torch.empty(0, dtype=torch.long)]
        self.acts = [torch.empty(0, 2 * width + 1)]
        self.rows = self.live_after_prune = 0

    def add(self, keys: Tensor, acts: Tensor) -> None:
        self.keys.append(keys)
        self.acts.append(acts)
        self.rows += len(keys)

    def prune_if_large(self, live: Callable[[], Tensor]) -> None:
        if self.rows >= 2 * max(self.live_after_prune, PRUNE_FLOOR):
            self.prune(live())

    def prune(self, live: Tensor) -> None:
        keys, acts = torch.cat(self.keys), torch.cat(self.acts)
        keep = torch.isin(keys, live)
        self.keys, self.acts = [keys[keep]], [acts[keep]]
        self.rows = self.live_after_prune = int(keep.sum())

    def lookup(self, keys: Tensor) -> Tensor:
        """Windows [len(keys), 2W+1] of keys that are all in the table."""
        table, acts = torch.cat(self.keys), torch.cat(self.acts)
        order = table.argsort()
        found = order[torch.searchsorted(table[order], keys).clamp_max(len(table) - 1)]
        if not torch.equal(table[found], keys):
            raise RuntimeError("analysis lost an example window")  # a bug, not bad input
        return acts[found]
