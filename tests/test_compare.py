"""Matching two SAEs' latents by decoder cosine, against brute force."""

from __future__ import annotations

import pytest
import torch

from training.analysis.compare import match_decoders


def test_nearest_partners_both_ways_and_unmatched_shares() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 16, generator=g)
    b = torch.cat([a[:30] + 0.05 * torch.randn(30, 16, generator=g),  # 30 shared features
                   torch.randn(20, 16, generator=g)])
    m = match_decoders(a, b, chunk=16)
    cos = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).t()
    assert torch.equal(m.a_to_b, cos.argmax(1)) and torch.equal(m.b_to_a, cos.argmax(0))
    torch.testing.assert_close(m.a_cosine, cos.max(1).values)
    assert torch.equal(m.a_to_b[:30], torch.arange(30)) and bool(m.mutual()[:30].all())
    share_a, share_b = m.unmatched_share(0.7)
    assert share_a == pytest.approx(float((cos.max(1).values < 0.7).float().mean()))
    assert share_b == pytest.approx(float((cos.max(0).values < 0.7).float().mean()))
    assert share_a >= 40 / 70 - 0.05
    with pytest.raises(ValueError, match="different widths"):
        match_decoders(a, torch.randn(5, 8))
