"""Reading latents for the explainer, choosing which to explain, and writing explanations."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.store.models import Explanation, Latent


def explained_with(session: Session, sae_id: int, settings_key: str) -> set[int]:
    """Indices of the SAE's latents that already have an explanation made with
    ``settings_key`` (a re-run skips them)."""
    stmt = (select(Latent.index).join(Explanation, Explanation.latent_id == Latent.id)
            .where(Latent.sae_id == sae_id, Explanation.settings_key == settings_key))
    return set(session.scalars(stmt))


def live_latents(session: Session, sae_id: int) -> list[int]:
    """Indices of the latents that fired over the analysed tokens."""
    stmt = (select(Latent.index).where(Latent.sae_id == sae_id, Latent.density > 0)
            .order_by(Latent.index))
    return list(session.scalars(stmt))


def stratified_sample(session: Session, sae_id: int, count: int, seed: int = 0) -> list[int]:
    """``count`` live, non-sink latents spread over the density range: the latents sorted
    by density are cut into ``count`` equal groups and one is drawn from each, so rare and
    frequent latents are explained alike (the densest ones are mostly attention sinks and
    generic features)."""
    stmt = (select(Latent.index).where(Latent.sae_id == sae_id, Latent.density > 0,
                                       Latent.sink.is_(False))
            .order_by(Latent.density, Latent.index))
    ordered = list(session.scalars(stmt))
    if count >= len(ordered):
        return ordered
    rng = random.Random(seed)
    bounds = [round(i * len(ordered) / count) for i in range(count + 1)]
    return sorted(ordered[rng.randrange(lo, hi)] for lo, hi in itertools.pairwise(bounds))


def latents_for_explaining(session: Session, sae_id: int, indices: Sequence[int]
                           ) -> list[dict[str, Any]]:
    """Latents ``indices`` (one query, examples loaded) as plain data, in the order given:
    {"id", "index", "max_activation", "top": [(tokens, activations)], "quantiles":
    [[...] per bucket, highest first], "top_logits": [str], "bottom_logits": [str]}."""
    stmt = (select(Latent).where(Latent.sae_id == sae_id, Latent.index.in_(list(indices)))
            .options(selectinload(Latent.example_pack)))
    found = {latent.index: latent for latent in session.scalars(stmt)}
    missing = [i for i in indices if i not in found]
    if missing:
        raise ValueError(f"SAE {sae_id} has no latent {missing[0]}")
    return [_record(found[i]) for i in indices]


def latent_for_explaining(session: Session, sae_id: int, index: int) -> dict[str, Any]:
    return latents_for_explaining(session, sae_id, [index])[0]


def _record(latent: Latent) -> dict[str, Any]:
    examples = latent.examples
    top = sorted((e for e in examples if e.kind == "top"), key=lambda e: e.rank)
    buckets: dict[int, list] = {}
    for example in examples:
        if example.kind == "quantile":
            buckets.setdefault(example.bucket or 0, []).append(example)
    return {"id": latent.id, "index": latent.index, "max_activation": latent.max_activation,
            "top": [(e.tokens, e.activations) for e in top],
            "quantiles": [[(e.tokens, e.activations) for e in sorted(buckets[b],
                                                                     key=lambda e: e.rank)]
                          for b in sorted(buckets, reverse=True)],
            "top_logits": [token for token, _ in latent.top_logits],
            "bottom_logits": [token for token, _ in latent.bottom_logits]}


@dataclass
class NewExplanation:
    """An explanation to store with its scores (None: not measured) and sample sizes."""

    latent_id: int
    text: str
    source: str
    settings_key: str
    detection: float | None = None
    fuzzing: float | None = None
    simulation: float | None = None
    detection_n: int | None = None
    fuzzing_n: int | None = None
    simulation_n: int | None = None
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float | None:
        """The headline score: the mean of detection and fuzzing where measured."""
        measured = [s for s in (self.detection, self.fuzzing) if s is not None]
        return sum(measured) / len(measured) if measured else None


def save_explanations(sessions: sessionmaker[Session], items: Sequence[NewExplanation],
                      *, supersede: str | None = None) -> None:
    """Store explanations in one transaction; each becomes its latent's shown one unless
    a better-scored explanation exists. ``supersede`` (a source prefix, e.g. ``maxact-``)
    first deletes these latents' explanations from other versions of that source: an
    older deterministic labeller's labels, whose scores the new ones replace (a latent
    that showed one of them shows its best remaining explanation)."""
    if not items:
        return
    with sessions.begin() as session:
        ids = [item.latent_id for item in items]
        if supersede is not None:
            _drop_superseded(session, ids, supersede, {item.source for item in items})
        best = dict(session.execute(select(Explanation.latent_id, func.max(Explanation.score))
                                    .where(Explanation.latent_id.in_(ids))
                                    .group_by(Explanation.latent_id)).all())
        for item in items:
            session.add(Explanation(
                latent_id=item.latent_id, text=item.text, source=item.source,
                score=item.score, detection_score=item.detection,
                fuzzing_score=item.fuzzing, simulation_score=item.simulation,
                detection_n=item.detection_n, fuzzing_n=item.fuzzing_n,
                simulation_n=item.simulation_n, settings_key=item.settings_key,
                usage=item.usage))
            previous = best.get(item.latent_id)
            if previous is None or (item.score is not None and item.score >= previous):
                session.get(Latent, item.latent_id).explanation = item.text
                best[item.latent_id] = item.score if item.score is not None else previous


def _drop_superseded(session: Session, latent_ids: Sequence[int], prefix: str,
                     current: set[str]) -> None:
    """Delete the latents' explanations whose source starts with ``prefix`` but is not in
    ``current``; a latent showing one of them shows its best-scored remaining one."""
    old = session.execute(select(Explanation.id, Explanation.latent_id, Explanation.text)
                          .where(Explanation.latent_id.in_(latent_ids),
                                 Explanation.source.startswith(prefix, autoescape=True),
                                 Explanation.source.not_in(current))).all()
    if not old:
        return
    session.execute(delete(Explanation).where(Explanation.id.in_([row.id for row in old])))
    dropped = {(row.latent_id, row.text) for row in old}
    for latent_id in {row.latent_id for row in old}:
        latent = session.get(Latent, latent_id)
        if (latent_id, latent.explanation) in dropped:
            latent.explanation = session.scalar(
                select(Explanation.text).where(Explanation.latent_id == latent_id)
                .order_by(Explanation.score.desc().nulls_last(), Explanation.id.desc())
                .limit(1))


def save_explanation(sessions: sessionmaker[Session], latent_id: int, *, text: str,
                     source: str, settings_key: str, detection: float | None,
                     fuzzing: float | None, usage: dict[str, Any]) -> None:
    """One explanation (see ``save_explanations``)."""
    save_explanations(sessions, [NewExplanation(latent_id, text, source, settings_key,
                                                detection, fuzzing, usage=usage)])
