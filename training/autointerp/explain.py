"""Automated interpretability: label SAE latents with an explainer, score the labels.

Per latent: split its examples (``split_examples``), ask the explainer for a short label
from the shown ones (``explain_prompt``), then score the label on held-out data by
detection and fuzzing (``scoring``), asking the same explainer. Everything
arrives as plain data (``LatentRecord``, ``Window``) so this engine knows nothing about
where examples are stored.

Two drivers: ``explain_latent`` makes live calls (judge questions run ``concurrency`` at
a time); ``explain_latents_batched`` sends every label request of many latents as one
Message Batch and then every judge question as a second one (half price on Claude).
Failures never raise out of a driver: they end up in ``ExplainResult.errors``, and
``fatal`` tells the caller that later latents would fail the same way.

``settings_key`` hashes everything that shapes an explanation (explainer, model, prompt
version, example counts), so a re-run with the same settings can skip finished latents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from training.autointerp import maxact, simulation
from training.autointerp.prompts import (
    PROMPT_VERSION,
    detection_prompt,
    explain_prompt,
    fuzzing_prompt,
    parse_label,
    render_window,
)
from training.autointerp.protocol import (
    JUDGE_MAX_TOKENS,
    BatchExplainer,
    Completion,
    Explainer,
    ExplainerError,
    Usage,
    parse_yes_no,
)
from training.autointerp.records import MARK_FRACTION, LatentRecord, Split, Window, split_examples
from training.autointerp.scoring import (
    Answer,
    JudgeItem,
    Score,
    detection_items,
    detection_score,
    fuzzing_items,
    fuzzing_score,
    judge_all,
    score_answers,
)

__all__ = ["MARK_FRACTION", "MAXACT_SETTINGS", "PROMPT_VERSION", "ExplainResult",
           "ExplainSettings", "LatentRecord", "Score", "Split", "Window", "detection_prompt",
           "detection_score", "explain_latent", "explain_latents_batched", "explain_offline",
           "explain_prompt", "fuzzing_prompt", "fuzzing_score", "parse_label",
           "render_window", "settings_key", "split_examples"]


@dataclass(frozen=True)
class ExplainSettings:
    """How many examples an explanation sees and how many questions score it."""

    explain_top: int = 10
    """Top examples shown to the explainer."""
    explain_quantile: int = 1
    """Samples shown from each activation-quantile bucket (out of those not held out)."""
    held_out_quantile: int = 2
    """Samples held out for scoring from each bucket (the analysis keeps 5 per bucket by
    default), whatever the number shown: every explainer is scored on the same windows."""
    detection_n: int = 5
    """Held-out activating windows for detection, and as many non-activating ones."""
    fuzzing_n: int = 5
    """Windows marked correctly for fuzzing, and as many marked at random."""
    label_max_tokens: int = 48
    """Reply length allowed for the label."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0 (got {value})")
        if self.explain_top + self.explain_quantile == 0:
            raise ValueError("the explainer must be shown some examples")
        if self.label_max_tokens < 1:
            raise ValueError("label_max_tokens must be >= 1")


@dataclass
class ExplainResult:
    """One latent's label, its scores (balanced accuracy in [0, 1]; None when not
    measured) and what it cost."""

    index: int
    label: str | None
    detection: float | None = None
    fuzzing: float | None = None
    simulation: float | None = None
    """Correlation of simulated and true activations (simulating explainers only)."""
    detection_n: int | None = None
    """Questions judged for the detection score; the same for fuzzing and (windows) for
    simulation: every score travels with its sample size."""
    fuzzing_n: int | None = None
    simulation_n: int | None = None
    usage: dict[str, float | int] = field(default_factory=lambda: Usage().as_dict())
    """``{requests, input_tokens, output_tokens, cost_usd}`` spent on this latent."""
    errors: list[str] = field(default_factory=list)
    fatal: bool = False
    """An error no later call can escape (bad key, no credit): stop explaining."""

    @property
    def score(self) -> float | None:
        """The headline score: the mean of the measured scores."""
        measured = [s for s in (self.detection, self.fuzzing) if s is not None]
        return sum(measured) / len(measured) if measured else None


def settings_key(explainer_name: str, model: str, **settings: object) -> str:
    """sha256 hex (64 chars) of the explainer, model, ``PROMPT_VERSION`` and ``settings``."""
    payload = {"explainer": explainer_name, "model": model, "prompt_version": PROMPT_VERSION,
               "settings": settings}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def scoring_items(label: str, held_out: Sequence[Window], negatives: Sequence[Window],
                  settings: ExplainSettings, seed: int) -> tuple[list[JudgeItem],
                                                                 list[JudgeItem]]:
    """The detection and the fuzzing questions for ``label``, on windows sampled (with
    ``seed``) from the held-out activating ones and the negatives."""
    rng = random.Random(seed)
    positives = _sample(rng, held_out, settings.detection_n)
    silent = _sample(rng, negatives, settings.detection_n)
    correct = _sample(rng, held_out, settings.fuzzing_n)
    fuzzed = _sample(rng, held_out, settings.fuzzing_n)
    return (detection_items(label, positives, silent),
            fuzzing_items(label, correct, fuzzed, seed=seed))


def _sample(rng: random.Random, windows: Sequence[Window], n: int) -> list[Window]:
    return rng.sample(list(windows), min(n, len(windows)))


def explain_latent(record: LatentRecord, negatives: Sequence[Window], explainer: Explainer, *,
                   seed: int = 0, score: bool = True,
                   settings: ExplainSettings | None = None) -> ExplainResult:
    """Label ``record`` with ``explainer`` and (``score``) measure the label by detection
    against ``negatives`` and by fuzzing. Usage is the explainer's running total before
    and after, so one explainer should serve one latent at a time."""
    settings = settings or ExplainSettings()
    before = explainer.usage.total
    result = ExplainResult(record.index, None)
    split = _split(record, settings, seed)
    if not split.shown:
        result.errors.append("no examples to explain")
        return result
    try:
        completion = explainer.complete(explain_prompt(record, split.shown),
                                        settings.label_max_tokens)
        result.label = parse_label(completion.text)
    except (ExplainerError, ValueError) as exc:
        result.errors.append(f"explain: {exc}")
        result.fatal = getattr(exc, "fatal", False)
    if result.label is not None and score:
        if not split.held_out:
            result.errors.append("no held-out activating windows to score on")
        detection, fuzzing = scoring_items(result.label, split.held_out, negatives, settings,
                                           seed)
        answers = judge_all(explainer, detection + fuzzing)
        _add_scores(result, detection, fuzzing, answers)
    result.usage = (explainer.usage.total - before).as_dict()
    return result


def _split(record: LatentRecord, settings: ExplainSettings, seed: int) -> Split:
    return split_examples(record, explain_top=settings.explain_top,
                          explain_quantile=settings.explain_quantile,
                          held_out_quantile=settings.held_out_quantile, seed=seed)


def _add_scores(result: ExplainResult, detection: list[JudgeItem], fuzzing: list[JudgeItem],
                answers: Sequence[Answer]) -> None:
    """Score the answers (detection questions first) into ``result``."""
    cut = len(detection)
    for name, items, part in (("detection", detection, answers[:cut]),
                              ("fuzzing", fuzzing, answers[cut:])):
        if not items:  # not asked for (n = 0) or nothing to ask about
            continue
        measured = score_answers(items, part)
        setattr(result, name, measured.value)
        setattr(result, f"{name}_n", measured.judged)
        result.errors += [f"{name}: {e}" for e in measured.errors]
    result.fatal = result.fatal or any(
        isinstance(a, ExplainerError) and a.fatal for a in answers)


def explain_latents_batched(latents: Sequence[tuple[LatentRecord, Sequence[Window]]],
                            explainer: BatchExplainer, *, seed: int = 0, score: bool = True,
                            settings: ExplainSettings | None = None) -> list[ExplainResult]:
    """``explain_latent`` for many (record, negatives) pairs through two message batches:
    all labels, then all judge questions (answers parsed from the reply text)."""
    settings = settings or ExplainSettings()
    results = [ExplainResult(record.index, None) for record, _ in latents]
    splits = [_split(record, settings, seed) for record, _ in latents]
    usages = [Usage() for _ in latents]
    todo = [i for i, split in enumerate(splits) if split.shown]
    for i in set(range(len(latents))) - set(todo):
        results[i].errors.append("no examples to explain")
    prompts = [explain_prompt(latents[i][0], splits[i].shown) for i in todo]
    for i, reply in zip(todo, explainer.complete_batch(prompts, settings.label_max_tokens),
                        strict=True):
        usages[i] += _usage(reply)
        _set_label(results[i], reply)
    if score:
        _score_batched(explainer, latents, splits, results, usages, settings, seed)
    for result, usage in zip(results, usages, strict=True):
        result.usage = usage.as_dict()
    return results


def _set_label(result: ExplainResult, reply: Completion | ExplainerError) -> None:
    if isinstance(reply, ExplainerError):
        result.errors.append(f"explain: {reply}")
        result.fatal = reply.fatal
        return
    try:
        result.label = parse_label(reply.text)
    except ValueError as exc:
        result.errors.append(f"explain: {exc}")


def _score_batched(explainer: BatchExplainer,
                   latents: Sequence[tuple[LatentRecord, Sequence[Window]]],
                   splits: list[Split], results: list[ExplainResult], usages: list[Usage],
                   settings: ExplainSettings, seed: int) -> None:
    """Every labelled latent's judge questions as one batch, scored into ``results``."""
    plans: dict[int, tuple[list[JudgeItem], list[JudgeItem]]] = {}
    for i, result in enumerate(results):
        if result.label is not None and not splits[i].held_out:
            result.errors.append("no held-out activating windows to score on")
        if result.label is not None:
            plans[i] = scoring_items(result.label, splits[i].held_out, latents[i][1],
                                     settings, seed)
    flat = [item for det, fuzz in plans.values() for item in det + fuzz]
    replies = iter(explainer.complete_batch([item.messages for item in flat],
                                            JUDGE_MAX_TOKENS) if flat else [])
    for i, (det, fuzz) in plans.items():
        mine = [next(replies) for _ in range(len(det) + len(fuzz))]
        for reply in mine:
            usages[i] += _usage(reply)
        _add_scores(results[i], det, fuzz, [_answer(reply) for reply in mine])


def _answer(reply: Completion | ExplainerError) -> Answer:
    if isinstance(reply, ExplainerError):
        return reply
    try:
        return parse_yes_no(reply.text)
    except ValueError as exc:
        return ExplainerError(str(exc))


def _usage(reply: Completion | ExplainerError) -> Usage:
    return Usage() if isinstance(reply, ExplainerError) else Usage.of(reply)


MAXACT_SETTINGS = ExplainSettings(explain_quantile=3, detection_n=50, fuzzing_n=50)
"""Shown examples and questions cost nothing offline, so maxact reads every sample that is
not held out and is scored on every held-out window (up to 50, and as many
non-activating ones): the same held-out windows as an LLM explainer's."""


def explain_offline(record: LatentRecord, negatives: Sequence[Window], *, seed: int = 0,
                    score: bool = True, settings: ExplainSettings = MAXACT_SETTINGS,
                    frequencies: Mapping[str, float] | None = None,
                    silent: Sequence[Sequence[str]] = ()) -> ExplainResult:
    """The ``maxact`` label of ``record`` from its shown windows (and the analysed text's
    token ``frequencies`` and the token texts of ``silent`` windows, which must not be
    among ``negatives``; see ``maxact.describe``), scored (``score``) by simulation on the
    held-out ones: detection, fuzzing and the simulation correlation."""
    result = ExplainResult(record.index, None)
    split = _split(record, settings, seed)
    if not split.shown:
        result.errors.append("no examples to explain")
        return result
    result.label = maxact.explain_label(record, split.shown, frequencies, silent)
    if not score:
        return result
    if not split.held_out:
        result.errors.append("no held-out activating windows to score on")
        return result
    description = maxact.parse(result.label)
    simulator = functools.partial(maxact.simulate, description)
    rng = random.Random(seed)
    positives = _sample(rng, split.held_out, settings.detection_n)
    quiet = _sample(rng, negatives, settings.detection_n)
    measured = {"detection": simulation.detection(simulator, positives, quiet),
                "fuzzing": simulation.fuzzing(simulator, _sample(rng, split.held_out,
                                                                 settings.fuzzing_n), seed),
                "simulation": simulation.correlation(simulator, [*positives, *quiet])}
    for name, value in measured.items():
        setattr(result, name, value.value)
        setattr(result, f"{name}_n", value.n)
    return result
