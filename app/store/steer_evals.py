"""Choosing latents for steer-eval and storing what it measured on them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.store.models import Latent


def most_active_non_sink(session: Session, sae_id: int, count: int) -> list[int]:
    """The ``count`` latents that fire most often, attention-sink latents left out."""
    stmt = (select(Latent.index).where(Latent.sae_id == sae_id, Latent.density > 0,
                                       Latent.sink.is_(False))
            .order_by(Latent.density.desc(), Latent.index).limit(count))
    return sorted(session.scalars(stmt))


def maxima_of(session: Session, sae_id: int, indices: Sequence[int]) -> dict[int, float]:
    """Max activation of each latent that fired (steering's unit)."""
    rows = session.execute(select(Latent.index, Latent.max_activation).where(
        Latent.sae_id == sae_id, Latent.index.in_(list(indices)), Latent.max_activation > 0))
    return {index: float(value) for index, value in rows.all()}


def save_steer_eval(sessions: sessionmaker[Session], sae_id: int,
                    records: Sequence[dict[str, Any]]) -> None:
    """Store each latent's steer-eval record (``index``, ``steerability``, ...) on its row,
    replacing an earlier one."""
    with sessions.begin() as session:
        rows = {lat.index: lat for lat in session.scalars(select(Latent).where(
            Latent.sae_id == sae_id, Latent.index.in_([r["index"] for r in records])))}
        for record in records:
            latent = rows[record["index"]]
            latent.steerability = record["steerability"]
            latent.steer_eval = record
