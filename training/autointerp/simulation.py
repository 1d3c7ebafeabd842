"""Scoring a label with a simulator: the label turned back into predicted activations.

The same held-out protocol as the LLM explainers (``split_examples``: the label never saw
these windows), with the simulator in the judge's place:

* detection: a window is called activating when the simulation predicts the latent fires
  somewhere in it (a simulated activation of at least 0.5); held-out activating windows
  against windows where the latent never fires; balanced accuracy.
* fuzzing: marks on a held-out window are called correct when the simulation predicts
  firing on most marked tokens (mean simulated activation ≥ 0.5); true marks against
  random ones (``scoring.random_marks``); balanced accuracy.
* simulation: the Pearson correlation of simulated and true activations over every token
  of the held-out activating and non-activating windows, as in OpenAI's automated
  interpretability ("all at once" scoring). A label that predicts nothing scores 0.

Each score comes with its sample size (questions or windows), so none is shown without
what it was measured on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from training.autointerp.records import Window
from training.autointerp.scoring import random_marks

Simulator = Callable[[Sequence[str]], list[float]]
"""Token texts of a window -> a predicted activation per token, in [0, 1]."""
FIRES = 0.5


@dataclass(frozen=True)
class Measured:
    """A score and the number of questions (or windows) behind it; None when a class had
    no example."""

    value: float | None
    n: int


def detection(simulator: Simulator, positives: Sequence[Window],
              negatives: Sequence[Window]) -> Measured:
    calls_pos = [max(simulator(w.tokens), default=0.0) >= FIRES for w in positives]
    calls_neg = [max(simulator(w.tokens), default=0.0) >= FIRES for w in negatives]
    return _balanced(calls_pos, calls_neg)


def fuzzing(simulator: Simulator, windows: Sequence[Window], seed: int) -> Measured:
    """True marks on every window of ``windows`` against random marks on each of them."""
    rng = random.Random(seed)
    correct, fuzzed = [], []
    for window in windows:
        predicted = simulator(window.tokens)
        true = window.marked_positions()
        wrong = random_marks(window, rng)
        if not true or wrong is None:
            continue
        correct.append(_mean(predicted, true) >= FIRES)
        fuzzed.append(_mean(predicted, wrong) >= FIRES)
    return _balanced(correct, fuzzed)


def correlation(simulator: Simulator, windows: Sequence[Window]) -> Measured:
    """Pearson correlation of simulated and true activations over all tokens of
    ``windows``."""
    predicted = [v for w in windows for v in simulator(w.tokens)]
    true = [a for w in windows for a in w.activations]
    if not true or _std(true) == 0:
        return Measured(None, len(windows))
    if _std(predicted) == 0:
        return Measured(0.0, len(windows))
    mp, mt = sum(predicted) / len(predicted), sum(true) / len(true)
    cov = sum((p - mp) * (t - mt) for p, t in zip(predicted, true, strict=True))
    return Measured(cov / (len(true) * _std(predicted) * _std(true)), len(windows))


def _balanced(positives: list[bool], negatives: list[bool]) -> Measured:
    """(TPR + TNR) / 2 of "yes" calls on positives and negatives."""
    n = len(positives) + len(negatives)
    if not positives or not negatives:
        return Measured(None, n)
    tpr = sum(positives) / len(positives)
    tnr = sum(not call for call in negatives) / len(negatives)
    return Measured((tpr + tnr) / 2, n)


def _mean(values: list[float], positions: list[int]) -> float:
    return sum(values[i] for i in positions) / len(positions)


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
