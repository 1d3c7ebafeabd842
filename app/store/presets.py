"""Saved steering presets: list, read, create."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.store.models import Sae, SteerPreset


def list_presets(session: Session) -> list[SteerPreset]:
    return list(session.scalars(select(SteerPreset).order_by(SteerPreset.id)))


def get_preset(session: Session, preset_id: int) -> SteerPreset | None:
    return session.get(SteerPreset, preset_id)


def create_preset(sessions: sessionmaker[Session], name: str, sae_id: int,
                  latents: list[dict[str, Any]]) -> SteerPreset:
    """Store a preset; ValueError when the SAE is not in the store."""
    with sessions.begin() as session:
        if session.get(Sae, sae_id) is None:
            raise ValueError(f"sae: there is no SAE {sae_id}")
        preset = SteerPreset(name=name, sae_id=sae_id, latents=latents)
        session.add(preset)
    return preset
