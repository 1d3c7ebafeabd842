"""Attention-sink / massive-activation latents: flagged so that rankings and labels do not
drown in them.

Such latents fire with a scale far outside the SAE's bulk (a max activation of 26–33
where ordinary latents reach 2–4) and their top examples sit on one position (the first
token after BOS) or on one token (a space before digits): they track the model's
attention-sink machinery rather than a concept of the text. A latent is flagged when both
hold: its max activation is at least ``SINK_SCALE`` × the median max of the live latents,
and at least ``SINK_CONCENTRATION`` of its top examples peak at one position or on one
token. A clean single-token latent (``' TypeError'``) is concentrated too but has an
ordinary scale, so it is not flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from training.analysis.examples import ExampleSet

SINK_SCALE = 5.0
SINK_CONCENTRATION = 0.8
MIN_TOP_EXAMPLES = 5
"""Concentration is only judged on latents with at least this many top examples."""


@dataclass
class SinkReport:
    """Per latent [n]: the flag and the figures behind it."""

    sink: Tensor
    """bool: an attention-sink / massive-activation latent."""
    scale_ratio: Tensor
    """max activation / the median max activation of the live latents."""
    position_share: Tensor
    """Share of the top examples peaking at the most common position."""
    token_share: Tensor
    """Share of the top examples peaking on the most common token."""
    median_max: float


def detect_sinks(max_activation: Tensor, examples: ExampleSet, window: int) -> SinkReport:
    """Flag sink latents (see the module docstring); ``window`` is the examples' W (the peak
    token of an example sits at column W of its token window)."""
    n = len(max_activation)
    live = max_activation > 0
    median = float(max_activation[live].median()) if bool(live.any()) else 0.0
    ratio = max_activation / median if median > 0 else torch.zeros(n)
    top = examples.bucket < 0
    latents = examples.latent[top]
    counts = torch.bincount(latents, minlength=n)
    position_share = _mode_share(latents, examples.position[top], counts)
    token_share = _mode_share(latents, examples.tokens[top, window], counts)
    concentrated = (torch.maximum(position_share, token_share) >= SINK_CONCENTRATION) & (
        counts >= MIN_TOP_EXAMPLES)
    sink = live & (ratio >= SINK_SCALE) & concentrated
    return SinkReport(sink=sink, scale_ratio=ratio, position_share=position_share,
                      token_share=token_share, median_max=median)


def _mode_share(latents: Tensor, values: Tensor, counts: Tensor) -> Tensor:
    """For each latent [n], the share of its entries holding its most common value."""
    n = len(counts)
    if not len(latents):
        return torch.zeros(n)
    span = int(values.max()) - int(values.min()) + 1
    keys, per_key = torch.unique(latents * span + (values - values.min()), return_counts=True)
    mode = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, keys // span, per_key, "amax")
    return mode.float() / counts.clamp_min(1).float()


def sink_reason(report: SinkReport, latent: int) -> str | None:
    """Why latent ``latent`` is flagged, in words (None when it is not)."""
    if not bool(report.sink[latent]):
        return None
    where = ("at one position" if report.position_share[latent] >= report.token_share[latent]
             else "on one token")
    share = max(float(report.position_share[latent]), float(report.token_share[latent]))
    return (f"max activation {float(report.scale_ratio[latent]):.1f}× the SAE's median "
            f"({report.median_max:.2f}); {share:.0%} of its top examples peak {where}")
