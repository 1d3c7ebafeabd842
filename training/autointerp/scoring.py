"""Scoring an explanation on held-out data by asking yes/no questions about it.

* Detection: shown one window without marks, does the latent described fire on it?
  Positives are held-out activating windows, negatives windows where it never fires.
* Fuzzing: shown an activating window with some tokens marked, are the marked tokens the
  ones it fires on? Half the questions mark the truly activating tokens, half mark the
  same number of other tokens chosen at random.

Both scores are balanced accuracy, (TPR + TNR) / 2, so a judge that always says yes (or
always no) scores 0.5 whatever the class sizes. A question whose call fails after the
explainer's retries is excluded and its error reported: an outage must not read as a bad
explanation. A score needs at least one judged question of each class, else it is None.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from training.autointerp.prompts import detection_prompt, fuzzing_prompt
from training.autointerp.protocol import Explainer, ExplainerError, Messages
from training.autointerp.records import Window

Answer = bool | ExplainerError


@dataclass(frozen=True)
class JudgeItem:
    """One yes/no question and its correct answer."""

    messages: Messages
    truth: bool


@dataclass(frozen=True)
class Score:
    """Balanced accuracy over the judged questions (None when a class had none)."""

    value: float | None
    tpr: float | None
    tnr: float | None
    judged: int
    errors: list[str] = field(default_factory=list)
    """One line per excluded question (or why there is no score)."""


def detection_items(label: str, positives: Sequence[Window],
                    negatives: Sequence[Window]) -> list[JudgeItem]:
    return ([JudgeItem(detection_prompt(label, w), True) for w in positives]
            + [JudgeItem(detection_prompt(label, w), False) for w in negatives])


def fuzzing_items(label: str, correct: Sequence[Window], fuzzed: Sequence[Window], *,
                  seed: int = 0) -> list[JudgeItem]:
    """Questions with the true marks on ``correct`` and random marks on ``fuzzed``; a
    fuzzed window with too few other tokens to mark is left out."""
    rng = random.Random(seed)
    items = [JudgeItem(fuzzing_prompt(label, w, w.marked_positions()), True) for w in correct]
    for window in fuzzed:
        marks = random_marks(window, rng)
        if marks is not None:
            items.append(JudgeItem(fuzzing_prompt(label, window, marks), False))
    return items


def random_marks(window: Window, rng: random.Random) -> list[int] | None:
    """As many positions as the window has marked ones, drawn from tokens where the latent
    does not fire at all (else from any unmarked token); None if there are too few."""
    true = window.marked_positions()
    silent = [i for i, a in enumerate(window.activations) if a <= 0]
    if len(silent) < len(true):
        silent = [i for i in range(len(window.tokens)) if i not in set(true)]
    if not true or len(silent) < len(true):
        return None
    return sorted(rng.sample(silent, len(true)))


def judge_all(explainer: Explainer, items: Sequence[JudgeItem]) -> list[Answer]:
    """Every item's answer, or the ExplainerError that replaced it; up to
    ``explainer.concurrency`` calls at once. After a fatal error the remaining questions
    are not sent (they get the same error)."""
    fatal: list[ExplainerError] = []

    def ask(item: JudgeItem) -> Answer:
        if fatal:
            return fatal[0]
        try:
            return explainer.judge(item.messages)
        except ExplainerError as exc:
            if exc.fatal:
                fatal.append(exc)
            return exc

    workers = max(1, min(int(explainer.concurrency), len(items)))
    if workers == 1:
        return [ask(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
        return list(pool.map(ask, items))


def score_answers(items: Sequence[JudgeItem], answers: Sequence[Answer]) -> Score:
    """Balanced accuracy of ``answers`` against the items' truths, errors excluded."""
    if len(items) != len(answers):
        raise ValueError(f"{len(items)} questions but {len(answers)} answers")
    errors = [f"judge call failed: {a}" for a in answers if isinstance(a, ExplainerError)]
    pairs = [(item.truth, a) for item, a in zip(items, answers, strict=True)
             if not isinstance(a, ExplainerError)]
    tpr = _rate([a for t, a in pairs if t], True)
    tnr = _rate([a for t, a in pairs if not t], False)
    if tpr is None or tnr is None:
        missing = "positive" if tpr is None else "negative"
        errors.append(f"no score: no {missing} question could be judged")
        return Score(None, tpr, tnr, len(pairs), errors)
    return Score((tpr + tnr) / 2, tpr, tnr, len(pairs), errors)


def _rate(answers: list[bool], wanted: bool) -> float | None:
    """Fraction of ``answers`` equal to ``wanted``; None when there are none."""
    if not answers:
        return None
    return sum(a == wanted for a in answers) / len(answers)


def detection_score(explainer: Explainer, label: str, positives: Sequence[Window],
                    negatives: Sequence[Window]) -> Score:
    """Balanced accuracy of telling ``positives`` (activating) from ``negatives``."""
    items = detection_items(label, positives, negatives)
    return score_answers(items, judge_all(explainer, items))


def fuzzing_score(explainer: Explainer, label: str, correct: Sequence[Window],
                  fuzzed: Sequence[Window], *, seed: int = 0) -> Score:
    """Balanced accuracy of telling true marks (on ``correct``) from random ones (on
    ``fuzzed``)."""
    items = fuzzing_items(label, correct, fuzzed, seed=seed)
    return score_answers(items, judge_all(explainer, items))
