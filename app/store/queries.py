"""Read queries of the store (what the explorer and the CLI show)."""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from sqlalchemy import Row, String, and_, bindparam, cast, func, or_, select, text
from sqlalchemy.orm import Session, defer, selectinload

from app.store.models import Example, Explanation, Latent, Model, Sae

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
_QUANTILE_BUCKETS = (select(func.aggregate_strings(cast(Example.bucket, String), ","))
                     .where(Example.latent_id == Latent.id, Example.kind == "quantile")
                     .scalar_subquery())
_LATENT_WITH_SAE = select(Latent, Sae, _QUANTILE_BUCKETS).join(Latent.sae).where(
    Latent.sae_id == bindparam("sae_id"), Latent.index == bindparam("index"))


class FeatureRows(NamedTuple):
    latent: Latent
    """Without its examples."""
    sae: Sae
    """Without its model."""
    bucket_counts: dict[int, int]
    """Quantile samples per bucket."""


def explanations_of(session: Session, sae_id: int, indices: list[int]) -> dict[int, str | None]:
    """index -> explanation for some latents (a light query: no JSON columns)."""
    rows = session.connection().execute(_LABELS, {"sae_id": sae_id, "indices": indices})
    return dict(rows.all())


def latent_with_sae(session: Session, sae_id: int, index: int) -> FeatureRows | None:
    """A latent, its SAE and its quantile buckets' sample counts, in one query (one row)."""
    row = session.execute(_LATENT_WITH_SAE, {"sae_id": sae_id, "index": index}).first()
    if row is None:
        return None
    buckets = Counter(int(bucket) for bucket in (row[2] or "").split(",") if bucket)
    return FeatureRows(row[0], row[1], dict(buckets))


def get_latent(session: Session, sae_id: int, index: int, *, examples: bool = True
               ) -> Latent | None:
    """A latent, with its examples loaded (top first, then quantile buckets) unless
    ``examples`` is False."""
    stmt = select(Latent).where(Latent.sae_id == sae_id, Latent.index == index)
    if examples:
        stmt = stmt.options(selectinload(Latent.examples))
    return session.scalars(stmt).one_or_none()


def quantile_counts(session: Session, latent_id: int) -> dict[int, int]:
    """Examples per quantile bucket of a latent."""
    stmt = (select(Example.bucket, func.count()).where(
        Example.latent_id == latent_id, Example.kind == "quantile").group_by(Example.bucket))
    return {int(bucket or 0): count for bucket, count in session.execute(stmt)}


def examples_of(session: Session, latent_id: int, *, top: bool = True,
                buckets: tuple[int, ...] = ()) -> list[Example]:
    """A latent's top examples and/or those of some quantile buckets, by rank."""
    wanted = []
    if top:
        wanted.append(Example.kind == "top")
    if buckets:
        wanted.append(and_(Example.kind == "quantile", Example.bucket.in_(buckets)))
    if not wanted:
        return []
    stmt = (select(Example).where(Example.latent_id == latent_id, or_(*wanted))
            .order_by(Example.kind.desc(), Example.bucket, Example.rank))
    return list(session.scalars(stmt))


_SHOWN_EXAMPLES = (
    select(Example.kind, Example.bucket, Example.tokens, Example.activations)
    .where(Example.latent_id == bindparam("latent_id"),
           or_(Example.kind == "top",
               and_(Example.kind == "quantile", Example.bucket == bindparam("bucket"))))
    .order_by(Example.kind.desc(), Example.rank))


def shown_examples(session: Session, latent_id: int, bucket: int | None) -> list[Row]:
    """A latent's top examples, then quantile bucket ``bucket``'s (none when None), by
    rank, as (kind, bucket, tokens, activations): what a feature page shows at once."""
    return list(session.connection().execute(_SHOWN_EXAMPLES, {"latent_id": latent_id,
                                                               "bucket": bucket}))


_EXPLANATIONS = (select(Explanation).where(Explanation.latent_id == bindparam("latent_id"))
                 .options(defer(Explanation.embedding))
                 .order_by(Explanation.score.desc().nulls_last(), Explanation.id.desc()))


def explanations_for(session: Session, latent_id: int) -> list[Explanation]:
    """A latent's explanations, best score first (unscored last, newest first), without
    their embeddings."""
    return list(session.scalars(_EXPLANATIONS, {"latent_id": latent_id}))
