"""The feature map: latents with alike decoder directions land together."""

from __future__ import annotations

import torch

from training.analysis.feature_map import decoder_map


def test_clusters_of_directions_stay_together() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 5
    rows = torch.cat([c + 0.3 * torch.randn(40, 32, generator=g) for c in centres])
    positions = decoder_map(rows, seed=0)
    assert positions.shape == (160, 2) and torch.isfinite(positions).all()
    groups = positions.reshape(4, 40, 2)
    inside = torch.stack([torch.cdist(p, p).mean() for p in groups]).mean()
    between = torch.cdist(groups.mean(1), groups.mean(1)).sum() / (4 * 3)
    assert between > 3 * inside, (float(between), float(inside))
    assert torch.equal(positions, decoder_map(rows, seed=0)), "a fixed seed repeats"
