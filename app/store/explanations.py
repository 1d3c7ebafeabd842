"""Reading latents for the explainer and writing its explanations."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.store.models import Explanation, Latent
from app.store.queries import get_latent


def explained_with(session: Session, sae_id: int, settings_key: str) -> set[int]:
    """Indices of the SAE's latents that already have an explanation made with
    ``settings_key`` (a re-run skips them)."""
    stmt = (select(Latent.index).join(Explanation, Explanation.latent_id == Latent.id)
            .where(Latent.sae_id == sae_id, Explanation.settings_key == settings_key))
    return set(session.scalars(stmt))


def most_active(session: Session, sae_id: int, count: int) -> list[int]:
    """The ``count`` latents that fire most often (never-firing ones excluded)."""
    stmt = (select(Latent.index).where(Latent.sae_id == sae_id, Latent.density > 0)
            .order_by(Latent.density.desc(), Latent.index).limit(count))
    return sorted(session.scalars(stmt))


def latent_for_explaining(session: Session, sae_id: int, index: int) -> dict[str, Any]:
    """A latent's examples and logit tokens as plain data: {"id", "index",
    "max_activation", "top": [(tokens, activations)], "quantiles": [[...] per bucket,
    highest first], "top_logits": [str], "bottom_logits": [str]}."""
    latent = get_latent(session, sae_id, index)
    if latent is None:
        raise ValueError(f"SAE {sae_id} has no latent {index}")
    top = sorted((e for e in latent.examples if e.kind == "top"), key=lambda e: e.rank)
    buckets: dict[int, list] = {}
    for example in latent.examples:
        if example.kind == "quantile":
            buckets.setdefault(example.bucket or 0, []).append(example)
    return {"id": latent.id, "index": latent.index, "max_activation": latent.max_activation,
            "top": [(e.tokens, e.activations) for e in top],
            "quantiles": [[(e.tokens, e.activations) for e in sorted(buckets[b],
                                                                     key=lambda e: e.rank)]
                          for b in sorted(buckets, reverse=True)],
            "top_logits": [token for token, _ in latent.top_logits],
            "bottom_logits": [token for token, _ in latent.bottom_logits]}


def save_explanation(sessions: sessionmaker[Session], latent_id: int, *, text: str,
                     source: str, settings_key: str, detection: float | None,
                     fuzzing: float | None, usage: dict[str, Any]) -> None:
    """Store an explanation; it becomes the latent's shown one unless a better-scored
    explanation exists. ``score`` is the mean of the measured scores."""
    measured = [s for s in (detection, fuzzing) if s is not None]
    score = sum(measured) / len(measured) if measured else None
    with sessions.begin() as session:
        best = session.scalar(select(func.max(Explanation.score)).where(
            Explanation.latent_id == latent_id))
        session.add(Explanation(latent_id=latent_id, text=text, source=source, score=score,
                                detection_score=detection, fuzzing_score=fuzzing,
                                settings_key=settings_key, usage=usage))
        if best is None or (score is not None and score >= best):
            session.get(Latent, latent_id).explanation = text
