"""Windows of captured text with every latent's code, for scoring explanations.

Detection scoring needs, for each latent, contexts where it does *not* fire. Stored
examples only hold a latent's own activations, so a pool of windows is encoded once with
the SAE (from the end of the capture: the analysis reads it from the start) and each latent
takes the windows on which its code is zero everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def silent_windows(self, feature: int) -> list[int]:
        """Windows on which ``feature`` never fires."""
        fires = ((self.indices == feature) & (self.values > 0)).flatten(1).any(1)
        return torch.nonzero(~fires).flatten().tolist()

    def activations(self, window: int, feature: int) -> list[float]:
        """``feature``'s activation on each token of ``window`` ([T])."""
        hit = (self.indices[window] == feature) & (self.values[window] > 0)
        return (self.values[window] * hit).sum(-1).tolist()


@torch.no_grad()
def window_pool(sae: SparseAutoencoder, store: ActivationStore, *, contexts: int = 48,
                width: int = 32) -> WindowPool:
    """Encode the last ``contexts`` contexts of the capture's last shard and cut them into
    windows of ``width`` tokens."""
    if contexts < 1 or width < 1:
        raise ValueError("contexts and width must be positive")
    per_context = store.manifest.context - 1  # rows per context: BOS is not captured
    last = len(store.manifest.shards) - 1
    rows = store.shard(last)
    first_context = store.shard_offsets()[last] // per_context
    count = min(contexts, rows.shape[0] // per_context)
    if count == 0:
        raise ValueError("the capture's last shard holds no whole context")
    keep = rows[-count * per_context:].float().to(sae.w_dec.device)
    encoding = sae.encode(keep)
    ids = store.tokens()[first_context + rows.shape[0] // per_context - count:
                         first_context + rows.shape[0] // per_context, 1:]
    usable = per_context // width * width
    if usable == 0:
        raise ValueError(f"contexts of {per_context} tokens are shorter than width {width}")

    def windows(t: Tensor) -> Tensor:  # [count * per_context, ...] -> [W, width, ...]
        t = t.reshape(count, per_context, *t.shape[1:])[:, :usable]
        return t.reshape(count * (usable // width), width, *t.shape[2:])

    return WindowPool(token_ids=windows(ids.reshape(count * per_context).long()),
                      values=windows(encoding.values.cpu()),
                      indices=windows(encoding.indices.cpu()))
