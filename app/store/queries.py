"""Read queries of the store (what the explorer and the CLI show)."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session, defer, selectinload

from app.store.example_pack import ExamplePack, StoredExample
from app.store.models import Explanation, Latent, LatentExamples, Model, Sae

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
    # quotes and NUL bytes are never syntax here: every word is matched as a plain word
    words = [w for w in query.replace('"', " ").replace("\x00", " ").split() if w]
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


SORTS = {"index": Latent.index, "density": Latent.density.desc(),
         "max_activation": Latent.max_activation.desc(),
         "mean_activation": Latent.mean_activation.desc(),
         "steerability": Latent.steerability.desc().nulls_last()}


def list_saes(session: Session, model: str | None = None) -> list[Sae]:
    """SAEs, newest first; only those of ``model`` when given."""
    stmt = select(Sae).join(Model).order_by(Sae.id.desc())
    if model:
        stmt = stmt.where(Model.name == model)
    return list(session.scalars(stmt))


def list_latents(session: Session, sae_id: int, *, search: str | None = None,
                 sort: str = "index", limit: int = 50, offset: int = 0) -> list[Latent]:
    """One page of an SAE's latents, sorted by ``sort``, or the explanation matches of
    ``search`` (best first)."""
    if sort not in SORTS:
        raise ValueError(f"--sort {sort!r} is unknown: choose one of {', '.join(SORTS)}")
    if search:
        return search_explanations(session, sae_id, search, limit)
    stmt = (select(Latent).where(Latent.sae_id == sae_id).order_by(SORTS[sort], Latent.index)
            .limit(limit).offset(offset))
    return list(session.scalars(stmt))


def latents_by_index(session: Session, sae_id: int, indices: list[int]) -> list[Latent]:
    stmt = select(Latent).where(Latent.sae_id == sae_id, Latent.index.in_(indices))
    return sorted(session.scalars(stmt), key=lambda lat: indices.index(lat.index))


# The explorer's per-page statements are built once, with bind parameters: building a
# statement costs more than SQLite takes to run it. Those that load no ORM objects run on
# the session's connection (the ORM's execution adds ~0.1 ms each), and they fetch few rows:
# SQLite hands the GIL to other threads at every row.
_LABELS = select(Latent.index, Latent.explanation).where(
    Latent.sae_id == bindparam("sae_id"), Latent.index.in_(bindparam("indices", expanding=True)))
_LATENT_WITH_SAE = (select(Latent, Sae, LatentExamples.data).join(Latent.sae)
                    .outerjoin(LatentExamples, LatentExamples.latent_id == Latent.id)
                    .where(Latent.sae_id == bindparam("sae_id"),
                           Latent.index == bindparam("index")))
_PACK = select(LatentExamples.data).where(LatentExamples.latent_id == bindparam("latent_id"))


class FeatureRows(NamedTuple):
    latent: Latent
    """Without its examples."""
    sae: Sae
    """Without its model."""
    examples: ExamplePack
    """The latent's packed examples (decoded as they are read)."""


def explanations_of(session: Session, sae_id: int, indices: list[int]) -> dict[int, str | None]:
    """index -> explanation for some latents (a light query: no JSON columns)."""
    rows = session.connection().execute(_LABELS, {"sae_id": sae_id, "indices": indices})
    return dict(rows.all())


def latent_with_sae(session: Session, sae_id: int, index: int) -> FeatureRows | None:
    """A latent, its SAE and its packed examples, in one query (one row)."""
    row = session.execute(_LATENT_WITH_SAE, {"sae_id": sae_id, "index": index}).first()
    if row is None:
        return None
    return FeatureRows(row[0], row[1], ExamplePack(row[2]))


def get_latent(session: Session, sae_id: int, index: int, *, examples: bool = True
               ) -> Latent | None:
    """A latent, with its examples loaded (top first, then quantile buckets) unless
    ``examples`` is False."""
    stmt = select(Latent).where(Latent.sae_id == sae_id, Latent.index == index)
    if examples:
        stmt = stmt.options(selectinload(Latent.example_pack))
    return session.scalars(stmt).one_or_none()


def example_pack(session: Session, latent_id: int) -> ExamplePack:
    """A latent's packed examples (empty when it has none)."""
    return ExamplePack(session.connection().execute(_PACK, {"latent_id": latent_id})
                       .scalar_one_or_none())


def top_examples(session: Session, latent_ids: list[int]) -> dict[int, StoredExample]:
    """Each latent's strongest example, by latent row id (one query)."""
    rows = session.execute(select(LatentExamples.latent_id, LatentExamples.data)
                           .where(LatentExamples.latent_id.in_(latent_ids))) if latent_ids else []
    found = {latent_id: ExamplePack(data).first_top() for latent_id, data in rows}
    return {latent_id: example for latent_id, example in found.items() if example}


_EXPLANATIONS = (select(Explanation).where(Explanation.latent_id == bindparam("latent_id"))
                 .options(defer(Explanation.embedding))
                 .order_by(Explanation.score.desc().nulls_last(), Explanation.id.desc()))


def explanations_for(session: Session, latent_id: int) -> list[Explanation]:
    """A latent's explanations, best score first (unscored last, newest first), without
    their embeddings."""
    return list(session.scalars(_EXPLANATIONS, {"latent_id": latent_id}))
