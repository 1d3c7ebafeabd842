"""Read queries of the store (what the explorer and the CLI show)."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.store.models import Latent

_SQLITE_SEARCH = text(
    "SELECT latents.* FROM latents JOIN latents_fts ON latents_fts.rowid = latents.id "
    "WHERE latents_fts MATCH :match AND latents.sae_id = :sae_id "
    "ORDER BY latents_fts.rank LIMIT :limit")
_PG_VECTOR = "to_tsvector('english', coalesce(latents.explanation, ''))"
_PG_SEARCH = text(
    f"SELECT latents.* FROM latents WHERE latents.sae_id = :sae_id "
    f"AND {_PG_VECTOR} @@ plainto_tsquery('english', :words) "
    f"ORDER BY ts_rank({_PG_VECTOR}, plainto_tsquery('english', :words)) DESC LIMIT :limit")


def search_explanations(session: Session, sae_id: int, query: str, limit: int = 100
                        ) -> list[Latent]:
    """Latents of SAE ``sae_id`` whose explanation holds every word of ``query``
    (SQLite FTS5 / PostgreSQL full-text search, best match first)."""
    words = [w for w in query.replace('"', " ").split() if w]
    if not words:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        stmt = select(Latent).from_statement(_SQLITE_SEARCH)
        params = {"match": " ".join(f'"{w}"' for w in words)}
    elif dialect == "postgresql":
        stmt = select(Latent).from_statement(_PG_SEARCH)
        params = {"words": " ".join(words)}
    else:
        raise ValueError(f"full-text search is not supported on {dialect}")
    return list(session.scalars(stmt, {**params, "sae_id": sae_id, "limit": limit}))
