"""Windows of captured text with every latent's code, for scoring explanations.

Detection scoring needs, for each latent, contexts where it does *not* fire. Stored
examples only hold a latent's own activations, so a pool of windows is encoded once with
the SAE (the capture's last contexts, across as many shards as they span) and each latent
takes the windows on which its code is zero everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from training.data.activations import ActivationStore
from training.sae.autoencoder import SparseAutoencoder


@dataclass
class WindowPool:
    """``W`` windows of ``T`` consecutive non-BOS tokens with the SAE's sparse codes."""

    token_ids: Tensor
    """[W, T] token ids."""
    values: Tensor
    """[W, T, k] code values (0 where a selected latent did not fire)."""
    indices: Tensor
    """[W, T, k] latent indices of the codes."""
    n_latents: int
    """The SAE's width."""

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def silent_windows(self, feature: int) -> list[int]:
        """Windows on which ``feature`` never fires."""
        return torch.nonzero(~self.fires[:, feature]).flatten().tolist()

    def activations(self, window: int, feature: int) -> list[float]:
        """``feature``'s activation on each token of ``window`` ([T])."""
        hit = (self.indices[window] == feature) & (self.values[window] > 0)
        return (self.values[window] * hit).sum(-1).tolist()

    @cached_property
    def fires(self) -> Tensor:
        """[W, n] bool: latent f fires somewhere in window w. One scatter over every code,
        built on first use, so a latent's silent windows are a column read, not a pass
        over all W·T·k codes."""
        flat = self.indices.flatten(1).long()
        fired = (self.values.flatten(1) > 0).to(torch.uint8)
        counts = torch.zeros(len(self), self.n_latents, dtype=torch.uint8)
        return counts.scatter_reduce_(1, flat, fired, "amax").bool()


@torch.no_grad()
def window_pool(sae: SparseAutoencoder, store: ActivationStore, *, contexts: int = 128,
                width: int = 32) -> WindowPool:
    """Encode the capture's last ``contexts`` whole contexts (fewer if it holds fewer),
    reading shards from the last back as far as they reach, and cut each context into
    windows of ``width`` tokens: [contexts · ⌊(context−1) / width⌋] windows."""
    if contexts < 1 or width < 1:
        raise ValueError("contexts and width must be positive")
    per_context = store.manifest.context - 1  # rows per context: BOS is not captured
    usable = per_context // width * width
    if usable == 0:
        raise ValueError(f"contexts of {per_context} tokens are shorter than width {width}")
    rows, first_context = _last_contexts(store, contexts, per_context)
    count = rows.shape[0] // per_context
    encoding = sae.encode(rows.float().to(sae.w_dec.device))
    ids = store.tokens()[first_context:first_context + count, 1:]

    def windows(t: Tensor) -> Tensor:  # [count * per_context, ...] -> [W, width, ...]
        t = t.reshape(count, per_context, *t.shape[1:])[:, :usable]
        return t.reshape(count * (usable // width), width, *t.shape[2:])

    return WindowPool(token_ids=windows(ids.reshape(count * per_context).long()),
                      values=windows(encoding.values.cpu()),
                      indices=windows(encoding.indices.cpu()),
                      n_latents=sae.cfg.n_latents)


def _last_contexts(store: ActivationStore, contexts: int, per_context: int
                   ) -> tuple[Tensor, int]:
    """The rows of the capture's last ``contexts`` whole contexts [count · per_context, d]
    and the index of the first of them. Shards hold whole contexts, so walking them from
    the end and keeping whole contexts lines rows up with ``store.tokens()``."""
    offsets = store.shard_offsets()
    parts: list[Tensor] = []
    taken = 0
    for index in range(len(store.manifest.shards) - 1, -1, -1):
        if taken == contexts:
            break
        shard = store.shard(index)
        whole = shard.shape[0] // per_context
        keep = min(whole, contexts - taken)
        if keep:
            parts.insert(0, shard[(whole - keep) * per_context:whole * per_context])
            first_context = (offsets[index] // per_context) + whole - keep
            taken += keep
    if not taken:
        raise ValueError("the capture holds no whole context")
    return torch.cat(parts), first_context
