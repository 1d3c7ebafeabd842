"""Semantic search of latent explanations, and its fusion with full-text search.

Each explanation can carry a unit-norm sentence embedding (``Explanation.embedding``, a
JSON list, filled by ``embed_missing``). A query is embedded the same way and compared by
cosine similarity with the embedding of every latent's best embedded explanation (highest
score, newest on ties: the one the explorer shows, once it is embedded; until then the
latent is matched by its previous one). The vectors of an SAE are read with one query and
kept in a small in-process cache, keyed by the database, the SAE and a fingerprint of its
embedded explanations (count, newest id, score total), so a search after the first costs
one aggregate query and one matrix-vector product, and explanations written but not yet
embedded (an explain job at work) do not invalidate it.

Full-text search finds explanations holding the query's words; semantic search finds
those meaning the same thing in other words ("town in france" -> "names of cities in
Europe"). ``combined_hits`` merges both rankings by reciprocal-rank fusion.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import numpy as np
from sqlalchemy import Text, bindparam, cast, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.store.models import Explanation, Latent
from app.store.queries import search_explanations
from training.autointerp.maxact import search_words

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

RRF_K = 60
"""Reciprocal-rank fusion constant: a hit at rank r (from 1) scores 1 / (RRF_K + r) in
each list it appears in; 60 is the value of Cormack et al. (2009)."""
MIN_SIMILARITY = 0.3
"""Cosine below which a semantic hit is not offered by combined search: all-MiniLM-L6-v2
gives unrelated short texts about -0.1 to 0.2 and paraphrases 0.4 and more."""
EMBED_BATCH = 256
_CACHE_SIZE = 8
_STORED_DECIMALS = 6

Match = Literal["text", "meaning", "both"]


class Embedder(Protocol):
    """What ``training.autointerp.embeddings.TextEmbedder`` offers: [N, dim] unit vectors."""

    def embed(self, texts: list[str], batch: int = ...) -> Tensor: ...


class SearchHit(NamedTuple):
    latent: Latent
    match: Match
    """"text" (full-text hit only), "meaning" (semantic only) or "both"."""
    similarity: float | None
    """Cosine of the query with the latent's explanation (None: not a semantic hit)."""


class _Vectors(NamedTuple):
    stamp: tuple
    latent_ids: np.ndarray
    """[N] ids of the latents (``Latent.id``, not the index)."""
    matrix: np.ndarray
    """[N, dim] float32 unit rows."""


_cache: OrderedDict[tuple[str, int], _Vectors] = OrderedDict()
_cache_lock = threading.Lock()


def semantic_search(session: Session, sae_id: int, query_vector: list[float] | Tensor,
                    limit: int = 20, *, min_similarity: float | None = None
                    ) -> list[tuple[Latent, float]]:
    """(latent, cosine) of SAE ``sae_id``'s latents whose best embedded explanation is
    closest to ``query_vector`` [dim], most similar first (latent id breaks ties); at most
    ``limit``, and none below ``min_similarity`` when given. Latents without an embedded
    explanation are not searched."""
    query = _unit_vector(query_vector)
    vectors = _vectors(session, sae_id)
    if limit < 1 or not len(vectors.latent_ids):
        return []
    if vectors.matrix.shape[1] != query.shape[0]:
        raise ValueError(f"the query vector has {query.shape[0]} dimensions but SAE "
                         f"{sae_id}'s explanations were embedded with "
                         f"{vectors.matrix.shape[1]}")
    similarity = vectors.matrix @ query  # [N]
    best = _top(similarity, vectors.latent_ids, limit)
    if min_similarity is not None:
        best = [i for i in best if similarity[i] >= min_similarity]
    ids = [int(vectors.latent_ids[i]) for i in best]
    rows = {lat.id: lat for lat in session.scalars(select(Latent).where(Latent.id.in_(ids)))}
    return [(rows[lid], float(similarity[i])) for lid, i in zip(ids, best, strict=True)
            if lid in rows]


def combined_hits(session: Session, sae_id: int, query: str,
                  query_vector: list[float] | Tensor | None, limit: int = 20, *,
                  min_similarity: float = MIN_SIMILARITY) -> list[SearchHit]:
    """Full-text and semantic hits fused by reciprocal rank (full-text first on ties), at
    most ``limit``. Without ``query_vector`` this is full-text search alone."""
    text_hits = search_explanations(session, sae_id, query, limit) if query.strip() else []
    meaning_hits = ([] if query_vector is None else
                    semantic_search(session, sae_id, query_vector, limit,
                                    min_similarity=min_similarity))
    fused: dict[int, dict[str, Any]] = {}
    for rank, latent in enumerate(text_hits, 1):
        fused[latent.id] = {"latent": latent, "score": 1 / (RRF_K + rank), "text": rank,
                            "meaning": None, "similarity": None}
    for rank, (latent, similarity) in enumerate(meaning_hits, 1):
        entry = fused.setdefault(latent.id, {"latent": latent, "score": 0.0, "text": None})
        entry.update(score=entry["score"] + 1 / (RRF_K + rank), meaning=rank,
                     similarity=similarity)
    order = sorted(fused.values(), key=lambda e: (-e["score"], e["text"] is None,
                                                   e["text"] or 0, e["meaning"] or 0))
    return [SearchHit(e["latent"], _match(e), e["similarity"]) for e in order[:limit]]


def combined_search(session: Session, sae_id: int, query: str, embedder: Embedder | None,
                    limit: int = 20) -> list[Latent]:
    """Latents whose explanation holds the query's words or means what it says, best
    first (see ``combined_hits``); full-text only when ``embedder`` is None."""
    vector = embedder.embed([query])[0] if embedder is not None and query.strip() else None
    return [hit.latent for hit in combined_hits(session, sae_id, query, vector, limit)]


_SET_EMBEDDING = (update(Explanation.__table__)
                  .where(Explanation.__table__.c.id == bindparam("eid"),
                         Explanation.__table__.c.text == bindparam("old_text"))
                  .values(embedding=bindparam("vector")))


def embed_missing(sessions: sessionmaker[Session], sae_id: int, embedder: Embedder,
                  batch: int = EMBED_BATCH) -> int:
    """Embed the explanations of SAE ``sae_id``'s latents that have no embedding yet, a
    batch at a time (the embedder runs outside any transaction); returns how many were
    embedded. An explanation whose text changed meanwhile is left for the next run."""
    done, after = 0, 0
    while True:
        with sessions() as session:
            rows = session.execute(_missing(sae_id, after, batch)).all()
        if not rows:
            return done
        vectors = np.asarray(embedder.embed([search_words(text) for _, text in rows]),
                             dtype=np.float32)
        with sessions.begin() as session:
            session.connection().execute(_SET_EMBEDDING, [
                {"eid": eid, "old_text": text, "vector": _stored(vector)}
                for (eid, text), vector in zip(rows, vectors, strict=True)])
        done += len(rows)
        after = rows[-1][0]


def _missing(sae_id: int, after: int, batch: int):
    """(id, text) of explanations past id ``after`` without an embedding: SQL NULL, or
    the JSON ``null`` that an explicit ``embedding=None`` stores."""
    lacking = or_(Explanation.embedding.is_(None), cast(Explanation.embedding, Text) == "null")
    return (select(Explanation.id, Explanation.text)
            .join(Latent, Latent.id == Explanation.latent_id)
            .where(Latent.sae_id == sae_id, Explanation.id > after, lacking)
            .order_by(Explanation.id).limit(batch))


def _stored(vector: np.ndarray) -> list[float]:
    """A vector as a JSON list, rounded: 6 decimals change a cosine by under 1e-5 and
    halve the stored size."""
    return [round(float(x), _STORED_DECIMALS) for x in vector]


def _match(entry: dict[str, Any]) -> Match:
    if entry["text"] is not None and entry.get("meaning") is not None:
        return "both"
    return "text" if entry["text"] is not None else "meaning"


def _unit_vector(vector: list[float] | Tensor) -> np.ndarray:
    if hasattr(vector, "detach"):
        vector = vector.detach().float().cpu().numpy()
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    if not array.size or not np.isfinite(norm) or norm == 0:
        raise ValueError("the query vector is empty, zero or not finite")
    return array / norm


def _top(similarity: np.ndarray, latent_ids: np.ndarray, limit: int) -> list[int]:
    """Positions of the ``limit`` largest similarities, descending, ties by latent id."""
    if limit < len(similarity):
        candidates = np.argpartition(-similarity, limit - 1)[:limit]
    else:
        candidates = np.arange(len(similarity))
    order = np.lexsort((latent_ids[candidates], -similarity[candidates]))
    return [int(i) for i in candidates[order]]


# -- the vectors of an SAE, cached ----------------------------------------------------------
def _stamp(session: Session, sae_id: int) -> tuple:
    """Changes whenever an embedded explanation of the SAE is added, removed, rescored or
    (re-)embedded: the total stored size of the embeddings changes when an embedding
    replaces a JSON ``null`` or another model's. Reads sizes, not the vectors (tens of
    milliseconds for 16k explanations on SQLite, a few on PostgreSQL)."""
    row = session.execute(
        select(func.count(Explanation.id), func.max(Explanation.id),
               func.count(Explanation.score), func.sum(Explanation.score),
               func.sum(_stored_size(session)))
        .join(Latent, Latent.id == Explanation.latent_id)
        .where(Latent.sae_id == sae_id, Explanation.embedding.is_not(None))).one()
    return tuple(row)


def _stored_size(session: Session):
    """The size of each stored embedding, read without decoding it (PostgreSQL's
    ``pg_column_size`` does not even de-TOAST it)."""
    if session.get_bind().dialect.name == "postgresql":
        return func.pg_column_size(Explanation.embedding)
    return func.length(cast(Explanation.embedding, Text))


def _vectors(session: Session, sae_id: int) -> _Vectors:
    key = (str(session.get_bind().url), sae_id)
    stamp = _stamp(session, sae_id)
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached.stamp == stamp:
            _cache.move_to_end(key)
            return cached
    loaded = _load_vectors(session, sae_id, stamp)
    with _cache_lock:
        _cache[key] = loaded
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return loaded


def _load_vectors(session: Session, sae_id: int, stamp: tuple) -> _Vectors:
    """The embedding of each latent's best embedded explanation (one query; a window
    function picks the best), as unit rows. Rows of another width than most (an embedding
    made by another model) are left out."""
    best_first = (Explanation.score.desc().nulls_last(), Explanation.id.desc())
    ranked = (select(Explanation.latent_id, Explanation.embedding,
                     func.row_number().over(partition_by=Explanation.latent_id,
                                            order_by=best_first).label("rank"))
              .join(Latent, Latent.id == Explanation.latent_id)
              .where(Latent.sae_id == sae_id, Explanation.embedding.is_not(None)).subquery())
    rows = [(lid, vec) for lid, vec in session.execute(
        select(ranked.c.latent_id, ranked.c.embedding).where(ranked.c.rank == 1))
        if isinstance(vec, list) and vec]
    if not rows:
        return _Vectors(stamp, np.zeros(0, dtype=np.int64), np.zeros((0, 0), np.float32))
    width = Counter(len(vec) for _, vec in rows).most_common(1)[0][0]
    kept = [(lid, vec) for lid, vec in rows if len(vec) == width]
    if len(kept) < len(rows):
        log.warning("SAE %d: %d explanation embeddings are not %d-dimensional; left out",
                    sae_id, len(rows) - len(kept), width)
    matrix = np.asarray([vec for _, vec in kept], dtype=np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return _Vectors(stamp, np.asarray([lid for lid, _ in kept], dtype=np.int64), matrix)
