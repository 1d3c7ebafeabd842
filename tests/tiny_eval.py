"""Inputs for evaluating on the tiny random Llama (tests/conftest.py's ``tiny_model``):
batches of random token ids and SAEs or transcoders of its width that fire."""

from __future__ import annotations

import torch

from training.sae.autoencoder import SaeConfig, SparseAutoencoder


def tiny_batches(seed: int = 0) -> list[torch.Tensor]:
    """Two batches [3, 40] of random ids, BOS (1) first."""
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(4, 512, (3, 40), generator=generator) for _ in range(2)]
    for ids in batches:
        ids[:, 0] = 1
    return batches


def tiny_sae(site: str = "resid", seed: int = 0, n: int = 128) -> SparseAutoencoder:
    """A random TopK SAE of block outputs (d = 64, k = 8), or at the ``mlp`` site a
    BatchTopK skip-transcoder whose skip path and threshold let its latents fire."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=n, k=8, site=site,
                                      architecture="batchtopk" if site == "mlp" else "topk",
                                      skip=site == "mlp"))
    if site == "mlp":
        with torch.no_grad():
            sae.w_skip.copy_(torch.randn(64, 64) * 0.1)
            sae.threshold.fill_(0.05)
    return sae
