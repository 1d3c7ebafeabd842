"""Choosing the tokens a ``maxact`` label names, for the best expected detection score.

A label "fires on t₁, t₂, …" calls a window activating when one of those tokens is in it.
Each token added catches more activating windows (true positives) but also more windows
where the latent is silent (false positives). Both are estimated from what the explainer
may see, never from the held-out windows:

* hit rate: the share of the shown activating windows with a marked token in the set.
  Quantile samples count ``QUANTILE_WEIGHT`` times a top example: the windows a label is
  judged on are mostly weaker activations (quantile samples outnumber top examples), and
  the top examples' tokens are the easy ones;
* silent rate: for a window of W tokens, the chance that none of the set's tokens appears
  where the latent does not fire, Π_t (1 − f_t·(1 − precision_t))^W, with f_t the token's
  frequency in the analysed text (the capture's token counts) and precision_t the share
  of its occurrences in the shown windows on which the latent fires (a token that always
  fires it cannot make a window where it is silent).

Tokens are added greedily while hit rate + silent rate grows (balanced accuracy is their
mean), at most ``MAX_TOKENS``. Tokens equal up to case and surrounding spaces count as one,
as the simulator reads them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from training.autointerp.records import Window

MAX_TOKENS = 12
QUANTILE_WEIGHT = 6.0
UNSEEN = 1e-6
"""Frequency assumed for a token the counts do not know."""


def loose(token: str) -> str:
    """A token's key up to case and surrounding spaces (itself when that is empty)."""
    return token.strip().lower() or token


def loose_frequencies(counts: Mapping[str, int]) -> dict[str, float]:
    """Token texts' counts in the analysed text -> each loose key's share of all tokens."""
    total = sum(counts.values()) or 1
    out: dict[str, float] = {}
    for text, count in counts.items():
        out[loose(text)] = out.get(loose(text), 0.0) + count / total
    return out


def choose_tokens(shown: Sequence[Window], top_keys: set, frequencies: Mapping[str, float]
                  ) -> list[str]:
    """The loose keys to name (see the module docstring), best first; ``top_keys`` are the
    ``Window.key()`` of the latent's top examples (the rest of ``shown`` are quantile
    samples). Each key's windows are a bit mask, so a trial costs two popcounts."""
    active = [w for w in shown if w.max_activation > 0]
    if not active:
        return []
    masks: dict[str, int] = {}
    for bit, window in enumerate(active):
        for i in window.marked_positions():
            key = loose(window.tokens[i])
            masks[key] = masks.get(key, 0) | (1 << bit)
    tops = sum(1 << bit for bit, w in enumerate(active) if w.key() in top_keys)
    total = tops.bit_count() + QUANTILE_WEIGHT * (len(active) - tops.bit_count())
    silent = _silent_factors(active, frequencies, max(len(w.tokens) for w in active))

    def objective(covered: int, quiet: float) -> float:
        top = (covered & tops).bit_count()
        return (top + QUANTILE_WEIGHT * (covered.bit_count() - top)) / total + quiet

    chosen: list[str] = []
    covered, quiet = 0, 1.0
    best = objective(covered, quiet)
    while len(chosen) < MAX_TOKENS:
        trials = [(objective(covered | mask, quiet * silent[key]), key)
                  for key, mask in sorted(masks.items()) if key not in chosen]
        if not trials:
            break
        value, key = max(trials, key=lambda trial: trial[0])
        if value <= best + 1e-12:
            break
        best, covered, quiet = value, covered | masks[key], quiet * silent[key]
        chosen.append(key)
    return chosen


def _silent_factors(active: Sequence[Window], frequencies: Mapping[str, float],
                    width: int) -> dict[str, float]:
    """Each loose key's factor (1 − f·(1 − precision))^W on the silent rate."""
    seen, fired = Counter(), Counter()
    for window in active:
        for token, value in zip(window.tokens, window.activations, strict=True):
            seen[loose(token)] += 1
            fired[loose(token)] += value > 0
    return {key: (1 - frequencies.get(key, UNSEEN) * (1 - fired[key] / seen[key])) ** width
            for key in seen}
