"""JSON API for finding latents: by what their explanations say (full-text and semantic
search fused) and by contrasting two sets of texts.

Both need tensor work (embedding the query, running the model over the texts), which
goes to the inference engine's thread so the event loop stays free; the store queries
run in the thread pool. Without the embedding model installed, search is full-text only.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.store.queries import explanations_of
from app.store.records import latent_record
from app.store.semantic import SearchHit, combined_hits
from app.web import views
from app.web.deps import EngineDep, SessionDep
from app.web.engine import InferenceEngine, SaeHandle

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["search"])

MAX_TEXTS = 32
"""Texts per side of a contrast (``training.inference.probe.MAX_CONTRAST_TEXTS``, not imported here:
the app starts without loading torch)."""
MAX_TEXT_CHARS = 2000
ContrastText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class ContrastRequest(BaseModel):
    a: list[ContrastText] = Field(min_length=1, max_length=MAX_TEXTS,
                                  description="texts whose specific latents are wanted")
    b: list[ContrastText] = Field(min_length=1, max_length=MAX_TEXTS,
                                  description="texts to contrast them with")
    limit: int = Field(20, ge=1, le=200)


class _BadTexts(ValueError):
    """A text the model cannot take (too long in tokens, no tokens)."""


@router.get("/saes/{sae_id}/search")
async def search(sae_id: int, session: SessionDep, engine: EngineDep,
                 q: Annotated[str, Query(min_length=1, max_length=200,
                                         description="words or a description")],
                 limit: Annotated[int, Query(ge=1, le=100)] = 20) -> list[dict]:
    """Latents whose explanation holds the words of ``q`` or means what it says, best
    first; ``match`` says which: "text", "meaning" or "both" (``similarity``: the
    cosine of ``q`` with the explanation, for semantic hits)."""
    hits = await search_hits(session, engine, sae_id, q, limit)
    return [{**latent_record(hit.latent), "match": hit.match, "similarity": hit.similarity}
            for hit in hits]


@router.post("/saes/{sae_id}/contrast")
async def contrast(sae_id: int, body: ContrastRequest, session: SessionDep,
                   engine: EngineDep) -> list[dict]:
    """The latents most specific to texts ``a`` against texts ``b``, best first: ``score``
    = (mean over a of each text's max activation − the same over b) / the latent's max
    over all the texts, in (0, 1]; ``mean_max_a`` and ``mean_max_b`` are those means."""
    return await contrast_records(session, engine, sae_id, body)


async def search_hits(session: Session, engine: InferenceEngine, sae_id: int, query: str,
                      limit: int) -> list[SearchHit]:
    """Combined search for the API and the pages: 404 for an unknown SAE, 422 for an
    empty query; the query is embedded on the engine thread, the store is read in the
    thread pool."""
    if not query.strip():
        raise HTTPException(422, "q: give some words to search for")
    views.sae_or_404(session, sae_id)
    session.close()  # no database connection held while waiting for the engine
    vector = await query_vector(engine, query)
    return await run_in_threadpool(combined_hits, session, sae_id, query, vector, limit)


async def contrast_records(session: Session, engine: InferenceEngine, sae_id: int,
                           body: ContrastRequest) -> list[dict]:
    """{"index", "score", "mean_max_a", "mean_max_b", "explanation"} of the latents most
    specific to ``body.a`` (for the API and the pages): 404 for an unknown SAE, 422 for a
    text the model cannot take."""
    handle = views.handle(views.sae_or_404(session, sae_id))
    session.close()  # no database connection held while waiting for the engine
    try:
        found = await engine.run(_contrast, engine, handle, body)
    except _BadTexts as exc:
        raise HTTPException(422, str(exc)) from None
    explained = explanations_of(session, sae_id, [f for f, *_ in found])
    return [{"index": f, "score": score, "mean_max_a": mean_a, "mean_max_b": mean_b,
             "explanation": explained.get(f)} for f, score, mean_a, mean_b in found]


def _contrast(engine: InferenceEngine, handle: SaeHandle, body: ContrastRequest
              ) -> list[tuple[int, float, float, float]]:
    """On the engine thread: the model and SAE (loaded once), then the contrast."""
    from training.inference.probe import contrast_texts

    lm, sae = engine.sae(handle)
    try:
        return contrast_texts(lm, sae, handle.layer, body.a, body.b, body.limit)
    except ValueError as exc:
        raise _BadTexts(str(exc).replace("texts_a", "a").replace("texts_b", "b")) from None


async def query_vector(engine: InferenceEngine, query: str) -> list[float] | None:
    """The query's embedding (computed on the engine thread; the model loads on first
    use), or None when the embedding model is not installed."""
    from training.autointerp.embeddings import EmbedderUnavailable

    try:
        return await engine.run(_embed, query)
    except EmbedderUnavailable as exc:
        _warn_once(str(exc))
        return None


def _embed(query: str) -> list[float]:
    from training.autointerp.embeddings import text_embedder

    return text_embedder().embed([query])[0].tolist()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("search is full-text only: %s", message)
