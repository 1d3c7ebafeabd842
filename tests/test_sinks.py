"""Attention-sink latents: flagged by scale and concentration, not by either alone."""

from __future__ import annotations

import torch

from training.analysis.examples import ExampleSet
from training.analysis.sinks import detect_sinks, sink_reason

W = 2


def _examples(spec: dict[int, list[tuple[int, int]]]) -> ExampleSet:
    """Top examples per latent from (position, peak token) pairs."""
    rows = [(f, rank, pos, tok) for f, items in spec.items()
            for rank, (pos, tok) in enumerate(items)]
    n = len(rows)
    tokens = torch.full((n, 2 * W + 1), 5)
    tokens[:, W] = torch.tensor([tok for *_, tok in rows])
    return ExampleSet(latent=torch.tensor([f for f, *_ in rows]),
                      bucket=torch.full((n,), -1), rank=torch.tensor([r for _, r, *_ in rows]),
                      context=torch.arange(n), position=torch.tensor([p for _, _, p, _ in rows]),
                      tokens=tokens, activations=torch.ones(n, 2 * W + 1))


def test_sinks_need_a_huge_scale_and_concentrated_examples() -> None:
    spread = [(10 + i, 100 + i) for i in range(10)]
    at_one_position = [(1, 100 + i) for i in range(10)]
    on_one_token = [(10 + i, 42) for i in range(10)]
    examples = _examples({0: spread, 1: at_one_position, 2: on_one_token, 3: on_one_token,
                          4: spread, 5: at_one_position, 6: spread})
    maxima = torch.tensor([3.0, 30.0, 28.0, 3.0, 31.0, 2.5, 2.8, 0.0])
    report = detect_sinks(maxima, examples, W)
    # 1 and 2: huge and concentrated; 3 is a clean single-token latent at an ordinary
    # scale; 4 is huge but spread; 5 concentrated but ordinary; 7 never fired
    assert report.sink.tolist() == [False, True, True, False, False, False, False, False]
    assert report.position_share[1] == 1.0 and report.token_share[2] == 1.0
    assert report.median_max == float(maxima[maxima > 0].median())
    assert "at one position" in sink_reason(report, 1)
    assert "on one token" in sink_reason(report, 2) and sink_reason(report, 3) is None
