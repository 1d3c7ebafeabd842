"""Choosing the tokens a ``maxact`` label names, for the best expected detection score.

A label "fires on t₁, t₂, …" calls a window activating when one of those tokens is in it.
Each token added catches more activating windows (true positives) but also more windows
where the latent is silent (false positives). Both are estimated from what the explainer
may see, never from the held-out windows:

* hit rate: the share of the shown activating windows with a marked token in the set;
* silent rate: the share of the explainer's own silent windows (windows of the capture
  where the latent never fires, drawn apart from the ones detection is scored on) that
  hold none of the set's tokens. With fewer than ``MIN_SILENT`` of them (a latent that
  fires almost everywhere) it is modelled instead: for a window of W tokens,
  Π_t (1 − f_t·(1 − precision_t))^W, with f_t the token's frequency in the analysed text
  and precision_t the share of its occurrences in the shown windows on which the latent
  fires.

Tokens are added greedily while hit rate + silent rate grows (balanced accuracy is their
mean), at most ``MAX_TOKENS``. Tokens equal up to case and surrounding spaces count as one,
as the simulator reads them. Every set of windows is a bit mask per token, so a trial
costs a few popcounts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from training.autointerp.records import Window

SilentRate = Callable[[Sequence[str]], float]
"""A set of loose keys -> the share of silent windows it leaves alone."""
MAX_TOKENS = 12
MIN_SILENT = 20
"""Fewest silent windows the silent rate is counted on (else it is modelled)."""
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


def choose_tokens(shown: Sequence[Window], frequencies: Mapping[str, float],
                  silent: Sequence[Sequence[str]] = ()) -> list[str]:
    """The loose keys to name (see the module docstring), best first. ``silent`` holds
    the token texts of the explainer's silent windows."""
    active = [w for w in shown if w.max_activation > 0]
    if not active:
        return []
    hits = _masks([[window.tokens[i] for i in window.marked_positions()] for window in active])
    silent_rate = (_counted(hits, silent) if len(silent) >= MIN_SILENT
                   else _modelled(active, frequencies))
    chosen: list[str] = []
    covered = 0
    best = silent_rate(chosen)
    while len(chosen) < MAX_TOKENS:
        trials = [((covered | mask).bit_count() / len(active) + silent_rate([*chosen, key]),
                   key) for key, mask in sorted(hits.items()) if key not in chosen]
        if not trials:
            break
        value, key = max(trials, key=lambda trial: trial[0])
        if value <= best + 1e-12:
            break
        best, covered = value, covered | hits[key]
        chosen.append(key)
    return chosen


def _masks(windows: Sequence[Sequence[str]]) -> dict[str, int]:
    """Each loose key -> the bit mask of the windows holding it."""
    masks: dict[str, int] = {}
    for bit, tokens in enumerate(windows):
        for key in {loose(token) for token in tokens}:
            masks[key] = masks.get(key, 0) | (1 << bit)
    return masks


def _counted(hits: Mapping[str, int], silent: Sequence[Sequence[str]]) -> SilentRate:
    """The share of ``silent`` windows holding none of a set's keys."""
    wanted = set(hits)
    alarms = _masks([[t for t in tokens if loose(t) in wanted] for tokens in silent])

    def rate(keys: Sequence[str]) -> float:
        raised = 0
        for key in keys:
            raised |= alarms.get(key, 0)
        return 1 - raised.bit_count() / len(silent)
    return rate


def _modelled(active: Sequence[Window], frequencies: Mapping[str, float]) -> SilentRate:
    """The modelled silent rate: Π over a set's keys of (1 − f·(1 − precision))^W."""
    seen, fired = Counter(), Counter()
    for window in active:
        for token, value in zip(window.tokens, window.activations, strict=True):
            seen[loose(token)] += 1
            fired[loose(token)] += value > 0
    width = max(len(w.tokens) for w in active)
    factor = {key: (1 - frequencies.get(key, UNSEEN) * (1 - fired[key] / seen[key])) ** width
              for key in seen}

    def rate(keys: Sequence[str]) -> float:
        out = 1.0
        for key in keys:
            out *= factor[key]
        return out
    return rate
