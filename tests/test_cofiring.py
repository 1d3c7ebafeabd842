"""Co-firing partners against brute force on random sparse codes."""

from __future__ import annotations

import torch

from training.analysis.cofiring import CoFiringCounter


def test_partners_match_a_dense_count() -> None:
    g = torch.Generator().manual_seed(0)
    n, tokens, k = 40, 300, 5
    fires = torch.zeros(tokens, n, dtype=torch.bool)
    for t in range(tokens):
        fires[t, torch.randperm(n, generator=g)[:k]] = True
    fires[:, 1] = fires[:, 0]  # 0 and 1 always together
    counter = CoFiringCounter(n, sample_tokens=250)  # the last 50 tokens are not sampled
    for start in range(0, tokens, 64):  # chunks of 64 tokens
        rows, latents = fires[start:start + 64].nonzero(as_tuple=True)
        counter.add(rows, latents, min(64, tokens - start))
    result = counter.result(count=3)
    assert result.tokens == 250
    z = fires[:250].float()
    both = z.t() @ z
    own = both.diag()
    jaccard = both / (own[:, None] + own[None, :] - both).clamp_min(1)
    jaccard.fill_diagonal_(-1)
    for i in range(n):
        best = jaccard[i].topk(3)
        torch.testing.assert_close(result.jaccard[i], best.values)
        # ties may pick either partner: each one named has the Jaccard shown
        torch.testing.assert_close(jaccard[i, result.ids[i]], result.jaccard[i])
        j = int(result.ids[i, 0])
        assert float(result.conditional[i, 0]) == float(both[i, j] / own[i])
    assert int(result.ids[0, 0]) == 1 and float(result.jaccard[0, 0]) == 1.0
