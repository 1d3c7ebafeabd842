"""What a latent does to the model's output and where it sits among the others, from the
decoder alone: logit effects (W_dec[f] · W_U) and decoder-cosine neighbours, computed in
chunks of latents so memory stays O(chunk × vocabulary)."""

from __future__ import annotations

import torch
from torch import Tensor

from training.sae.autoencoder import SparseAutoencoder


@torch.no_grad()
def logit_effects(sae: SparseAutoencoder, unembed: Tensor, count: int,
                   chunk: int = 1024) -> dict[str, Tensor]:
    """Top/bottom ``count`` entries of W_dec[f] · W_Uᵀ per latent: [n, count] each."""
    w_u = unembed.float().to(sae.w_dec.device)
    parts: dict[str, list[Tensor]] = {"top_logits": [], "top_logit_ids": [],
                                      "bottom_logits": [], "bottom_logit_ids": []}
    for rows in sae.w_dec.split(chunk):
        effects = rows.float() @ w_u.t()
        top, bottom = effects.topk(count, dim=1), (-effects).topk(count, dim=1)
        parts["top_logits"].append(top.values.cpu())
        parts["top_logit_ids"].append(top.indices.cpu())
        parts["bottom_logits"].append(-bottom.values.cpu())
        parts["bottom_logit_ids"].append(bottom.indices.cpu())
    return {key: torch.cat(value) for key, value in parts.items()}


@torch.no_grad()
def decoder_neighbours(sae: SparseAutoencoder, count: int, chunk: int = 1024) -> dict[str, Tensor]:
    """The ``count`` decoder rows most cosine-similar to each latent's: [n, count]."""
    w = sae.w_dec.float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    count = min(count, w.shape[0] - 1)
    ids, cos = [], []
    for start in range(0, w.shape[0], chunk):
        sims = w[start:start + chunk] @ w.t()
        own = torch.arange(start, start + sims.shape[0], device=w.device)
        sims[torch.arange(sims.shape[0]), own] = -2.0
        top = sims.topk(count, dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return {"neighbour_ids": torch.cat(ids), "neighbour_cosines": torch.cat(cos)}
