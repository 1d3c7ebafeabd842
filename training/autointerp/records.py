"""A latent's examples as the autointerp engine sees them, and how they are split.

The explainer is shown the strongest examples plus a few samples of every activation
quantile (so a label covers weak activations too, not only the peak); scoring uses the
activating windows it was not shown, so a label is judged on data it could not memorise.
Windows that appear twice in the analysis (a top example that was also drawn as a quantile
sample) count as one, and the held-out set never contains a shown window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import NamedTuple

MARK_FRACTION = 0.25
"""A token is marked as activating when its activation exceeds this fraction of its own
window's maximum. Relative to the window (not the latent's max) so that samples from low
quantiles still show where in them the latent fires."""


@dataclass(frozen=True)
class Window:
    """A context window around an activation: token texts (whitespace and newlines kept)
    and the latent's activation on each token, both of length T."""

    tokens: list[str]
    activations: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.activations):
            raise ValueError(f"a window has {len(self.tokens)} tokens but "
                             f"{len(self.activations)} activations")

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def marked_positions(self, fraction: float = MARK_FRACTION) -> list[int]:
        """Positions whose activation is > fraction × the window max (none if it never
        fires)."""
        peak = self.max_activation
        if peak <= 0:
            return []
        return [i for i, a in enumerate(self.activations) if a > fraction * peak]

    def key(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """Identity for de-duplication: the same text with the same activations."""
        return tuple(self.tokens), tuple(self.activations)


@dataclass(frozen=True)
class LatentRecord:
    """What the analysis knows about one latent."""

    index: int
    max_activation: float
    top: list[Window]
    """Top activating examples, highest first."""
    quantiles: list[list[Window]] = field(default_factory=list)
    """Samples per activation-quantile bucket, highest bucket first."""
    top_logits: list[str] = field(default_factory=list)
    """Token texts the latent's decoder direction promotes most."""
    bottom_logits: list[str] = field(default_factory=list)
    """Token texts it suppresses most."""


class Split(NamedTuple):
    """The windows shown to the explainer and the activating ones held out for scoring."""

    shown: list[Window]
    held_out: list[Window]


def split_examples(record: LatentRecord, *, explain_top: int = 10, explain_quantile: int = 1,
                   held_out_quantile: int = 2, seed: int = 0) -> Split:
    """Held out: the top examples after the ``explain_top`` strongest and
    ``held_out_quantile`` random samples of each quantile bucket, the activating ones,
    without repeats. Shown: the ``explain_top`` strongest, then up to ``explain_quantile``
    of each bucket's other samples (highest bucket first). Which samples are held out does
    not depend on ``explain_quantile``, so explainers shown more or fewer examples are
    scored on the same windows. Deterministic for a given seed."""
    if min(explain_top, explain_quantile, held_out_quantile) < 0:
        raise ValueError("explain_top, explain_quantile and held_out_quantile must be >= 0")
    rng = random.Random(seed)
    shown = _distinct(record.top[:explain_top], set())
    rest = list(record.top[explain_top:])
    for bucket in record.quantiles:
        order = rng.sample(range(len(bucket)), len(bucket))
        rest += [bucket[i] for i in order[:held_out_quantile]]
        picks = sorted(order[held_out_quantile:held_out_quantile + explain_quantile])
        shown += _distinct([bucket[i] for i in picks], {w.key() for w in shown})
    seen = {w.key() for w in shown}
    held_out = [w for w in _distinct(rest, seen) if w.max_activation > 0]
    return Split(shown, held_out)


def _distinct(windows: list[Window], seen: set) -> list[Window]:
    """``windows`` without repeats or any whose key is already in ``seen`` (updated)."""
    out = []
    for window in windows:
        if window.key() not in seen:
            seen.add(window.key())
            out.append(window)
    return out
