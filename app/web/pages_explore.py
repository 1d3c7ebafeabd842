"""Seeing an SAE whole: the feature map (every latent placed by its decoder direction,
drawn with WebGL) and the comparison of two SAEs (latents matched by decoder cosine)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from app.store.models import Latent
from app.store.queries import explanations_of, list_saes
from app.web import views
from app.web.deps import RenderDep, SessionDep

router = APIRouter()
PAGE = 50
_MATCHES: OrderedDict = OrderedDict()
"""The last few comparisons (by SAE paths): a match of 4k × 4k latents takes a second."""


@router.get("/saes/{sae_id}/map", include_in_schema=False)
def map_page(request: Request, sae_id: int, session: SessionDep, render: RenderDep) -> Response:
    sae = views.sae_or_404(session, sae_id)
    placed = session.scalar(select(Latent.id).where(Latent.sae_id == sae_id,
                                                    Latent.map_x.is_not(None)).limit(1))
    return render(request, "map.html", {"sae": sae, "placed": placed is not None})


@router.get("/api/v1/saes/{sae_id}/map")
def map_points(sae_id: int, session: SessionDep) -> dict:
    """Every placed latent as columns: index, x, y, density, steerability, sink, label."""
    views.sae_or_404(session, sae_id)
    rows = session.execute(select(Latent.index, Latent.map_x, Latent.map_y, Latent.density,
                                  Latent.steerability, Latent.sink, Latent.explanation)
                           .where(Latent.sae_id == sae_id, Latent.map_x.is_not(None))
                           .order_by(Latent.index)).all()
    names = ("index", "x", "y", "density", "steerability", "sink", "label")
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


@router.get("/compare", include_in_schema=False)
async def compare_page(request: Request, session: SessionDep, render: RenderDep,
                       a: Annotated[int | None, Query(ge=1)] = None,
                       b: Annotated[int | None, Query(ge=1)] = None,
                       threshold: Annotated[float, Query(ge=0, le=1)] = 0.7,
                       offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    """Two SAEs side by side: each latent of A with its nearest latent of B."""
    saes = list_saes(session)
    context = {"saes": saes, "a": a, "b": b, "threshold": threshold, "offset": offset}
    if a is None or b is None:
        return render(request, "compare.html", context)
    sae_a, sae_b = views.sae_or_404(session, a), views.sae_or_404(session, b)
    try:
        matching = await run_in_threadpool(_matching, sae_a.path, sae_b.path)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    context.update(sae_a=sae_a, sae_b=sae_b, **_rows(session, matching, a, b, threshold,
                                                       offset))
    return render(request, "compare.html", context)


def _matching(path_a: str, path_b: str):
    from training.analysis.compare import match_decoders
    from training.sae.folder import load_sae

    key = (path_a, path_b)
    if key not in _MATCHES:
        w_a = load_sae(Path(path_a))[0].w_dec.detach()
        w_b = load_sae(Path(path_b))[0].w_dec.detach()
        _MATCHES[key] = match_decoders(w_a, w_b)
        while len(_MATCHES) > 4:
            _MATCHES.popitem(last=False)
    return _MATCHES[key]


def _rows(session, matching, a: int, b: int, threshold: float, offset: int) -> dict:
    """One page of A's latents by descending match, with both labels, and the shares."""
    order = matching.a_cosine.argsort(descending=True)[offset:offset + PAGE].tolist()
    partners = matching.a_to_b[order].tolist()
    labels_a = explanations_of(session, a, order)
    labels_b = explanations_of(session, b, partners)
    mutual = matching.mutual()
    rows = [{"a": i, "b": j, "cosine": float(matching.a_cosine[i]), "mutual": bool(mutual[i]),
             "label_a": labels_a.get(i), "label_b": labels_b.get(j)}
            for i, j in zip(order, partners, strict=True)]
    share_a, share_b = matching.unmatched_share(threshold)
    cosines = matching.a_cosine.tolist()
    return {"rows": rows, "unmatched_a": share_a, "unmatched_b": share_b,
            "mutual_count": int(mutual.sum()), "cosines": cosines,
            "more": offset + PAGE < len(cosines)}
