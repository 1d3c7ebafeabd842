"""HTML pages: home, SAE, feature, probe, steer and sign-in. Each route loads by id, asks
``views``/queries and renders; HTMX requests get the targeted block of the same template."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, HTTPException, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from app import jobs
from app.store.queries import (
    SORTS,
    explanations_for,
    explanations_of,
    latents_by_index,
    list_latents,
    list_saes,
)
from app.web import views
from app.web.api_search import ContrastRequest, contrast_records, search_hits
from app.web.deps import EngineDep, RenderDep, SessionDep, SettingsDep
from app.web.render import fragment_name
from app.web.security import ADMIN_COOKIE, admin_cookie_value, same

router = APIRouter(include_in_schema=False)
PAGE = 50
SortParam = Literal[tuple(SORTS)]  # type: ignore[valid-type]
INT32 = 2**31 - 1
"""The largest value the store's INTEGER columns hold (PostgreSQL refuses to compare one
with a larger number: a 422 here, not a 500 there)."""
StoreInt = Annotated[int, Path(ge=0, le=INT32)]


@router.get("/")
def home(request: Request, session: SessionDep, render: RenderDep) -> Response:
    saes = list_saes(session)
    return render(request, "home.html", {
        "models": views.models_overview(session),
        "saes": [(s, views.headline(s)) for s in saes],
        "jobs": jobs.recent(session, 10)})


@router.get("/saes/{sae_id}")
async def sae_page(request: Request, sae_id: int, session: SessionDep, render: RenderDep,
                   engine: EngineDep, sort: SortParam = "index",
                   q: Annotated[str, Query(max_length=200)] = "",
                   offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    """The SAE's metrics, charts and latents; ``q`` searches explanations by words and by
    meaning (fused), otherwise the latents are listed by ``sort`` with infinite scroll."""
    sae = await run_in_threadpool(views.sae_or_404, session, sae_id)
    matches: dict[int, str] = {}
    if q.strip():
        hits = await search_hits(session, engine, sae_id, q, PAGE)
        latents, matches = [h.latent for h in hits], {h.latent.id: h.match for h in hits}
    else:
        latents = await run_in_threadpool(lambda: list_latents(
            session, sae_id, sort=sort, limit=PAGE, offset=offset))
    snippets = await run_in_threadpool(views.top_snippets, session, latents)
    context = {"sae": sae, "headline": views.headline(sae), "latents": latents, "sort": sort,
               "snippets": snippets,
               "q": q, "offset": offset, "page": PAGE, "matches": matches,
               "more": not q.strip() and len(latents) == PAGE}
    if request.headers.get("HX-Request") == "true" and offset:
        return render(request, "sae.html", context, block="latent_rows")
    if fragment_name(request) != "latent_list":
        context.update(await run_in_threadpool(lambda: {
            "curve": views.loss_curve(sae), "frontier": views.frontier(session, sae),
            "frontier_of": (views.training_source(sae.config) or ("capture",))[0],
            "density": views.density_histogram(session, sae_id)}))
    return render(request, "sae.html", context)


@router.get("/saes/{sae_id}/goto")
def goto_latent(sae_id: int, session: SessionDep,
                index: Annotated[int, Query(ge=0)]) -> Response:
    sae = views.sae_or_404(session, sae_id)
    if index >= sae.n_latents:
        raise HTTPException(404, f"SAE {sae_id} has latents 0 to {sae.n_latents - 1}")
    return RedirectResponse(f"/saes/{sae_id}/features/{index}", status_code=303)


@router.get("/saes/{sae_id}/features/{index}")
def feature_page(request: Request, sae_id: StoreInt, index: StoreInt, session: SessionDep,
                 render: RenderDep,
                 bucket: Annotated[int | None, Query(ge=0, le=INT32)] = None) -> Response:
    """The feature page; ``?bucket=B`` (HTMX) renders one quantile group's examples, which
    the page loads when its section is opened."""
    sae, latent, pack = views.feature_or_404(session, sae_id, index)
    if bucket is not None:
        items = pack.examples(top=False, buckets=(bucket,))
        if not items:
            raise HTTPException(404, f"latent {index} has no quantile group {bucket}")
        return render(request, "feature.html", {"latent": latent, "bucket_items": items},
                      block="bucket")
    labels = explanations_of(session, sae_id, [int(i) for i, *_ in latent.neighbours]
                             + [int(i) for i, *_ in latent.cofiring or []])
    return render(request, "feature.html", {
        "sae": sae, "latent": latent, "explanations": explanations_for(session, latent.id),
        "steer": latent.steer_eval, "examples": views.example_groups(pack),
        "neighbours": labels, "cofiring": labels})


@router.get("/saes/{sae_id}/probe")
def probe_page(request: Request, sae_id: int, session: SessionDep, render: RenderDep,
               feature: Annotated[int | None, Query(ge=0)] = None) -> Response:
    sae = views.sae_or_404(session, sae_id)
    return render(request, "probe.html", {"sae": sae, "feature": feature, "text": ""})


@router.post("/saes/{sae_id}/probe")
async def probe_run(request: Request, sae_id: int, session: SessionDep, render: RenderDep,
                    engine: EngineDep, text: Annotated[str, Form(max_length=20_000)] = "",
                    feature: Annotated[str, Form()] = "",
                    rank: Annotated[Literal["relative", "raw"], Form()] = "relative",
                    include_sinks: Annotated[bool, Form()] = False) -> Response:
    sae = views.sae_or_404(session, sae_id)
    chosen = _feature_field(feature, sae.n_latents)
    if not text.strip():
        raise HTTPException(422, "text: paste some text to probe")
    handle = views.handle(sae)
    session.close()  # no database connection held while waiting for the engine
    result = await engine.probe(handle, text)
    top = views.ranked_probe(session, sae_id, result, by=rank, sinks_last=not include_sinks)
    explained = {lat.index: lat for lat in latents_by_index(session, sae_id,
                                                            [r.index for r in top])}
    maximum = views.latent_maxima(session, sae_id, [chosen])[chosen] if chosen is not None \
        else None
    return render(request, "probe.html", {
        "sae": sae, "feature": chosen, "text": text, "result": result, "top": top,
        "rank": rank, "include_sinks": include_sinks,
        "explained": explained, "maximum": maximum,
        "activations": result.activations_of(chosen) if chosen is not None else None},
        block="result" if request.headers.get("HX-Request") == "true" else None)


@router.post("/saes/{sae_id}/contrast")
async def contrast_run(request: Request, sae_id: int, session: SessionDep, render: RenderDep,
                       engine: EngineDep, a: Annotated[str, Form(max_length=64_000)] = "",
                       b: Annotated[str, Form(max_length=64_000)] = "") -> Response:
    """Latents specific to the texts of A against those of B (texts separated by blank
    lines)."""
    from pydantic import ValidationError

    sae = views.sae_or_404(session, sae_id)
    try:
        body = ContrastRequest(a=_texts(a), b=_texts(b))
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                           for e in exc.errors())) from None
    rows = await contrast_records(session, engine, sae_id, body)
    return render(request, "probe.html", {"sae": sae, "contrast": rows, "a": a, "b": b},
                  block="contrast_result" if request.headers.get("HX-Request") == "true"
                  else None)


def _texts(raw: str) -> list[str]:
    """Texts of a textarea, one per blank-line-separated paragraph."""
    return [part.strip() for part in raw.replace("\r\n", "\n").split("\n\n") if part.strip()]


def _feature_field(raw: str, n_latents: int) -> int | None:
    if not raw.strip():
        return None
    raw = raw.strip()
    if not (raw.isascii() and raw.isdecimal()) or int(raw) >= n_latents:
        raise HTTPException(422, f"feature: give a latent index from 0 to {n_latents - 1}")
    return int(raw)


@router.get("/steer")
def steer_page(request: Request, session: SessionDep, render: RenderDep,
               sae: Annotated[int | None, Query(ge=1)] = None,
               feature: Annotated[int | None, Query(ge=0)] = None,
               value: Annotated[float | None, Query(ge=-1000, le=1000)] = None) -> Response:
    """The steer page; ``feature`` starts the set with that latent, clamped at ``value``
    (default: its best strength from steer-eval, else 2× its max)."""
    saes = list_saes(session)
    current = views.sae_or_404(session, sae) if sae is not None else (saes[0] if saes else None)
    preset = []
    if current is not None and feature is not None:
        preset = latents_by_index(session, current.id, [feature])
        if not preset:
            raise HTTPException(404, f"SAE {current.id} has no latent {feature}")
    start = value if value is not None else (
        ((preset[0].steer_eval or {}).get("best_strength") or 2.0) if preset else 2.0)
    return render(request, "steer.html", {"saes": saes, "current": current, "preset": preset,
                                          "start_value": start})


@router.get("/steer/sweep")
def sweep_page(request: Request, session: SessionDep, render: RenderDep,
               sae: Annotated[int, Query(ge=1)], feature: Annotated[int, Query(ge=0)],
               strengths: Annotated[str, Query(max_length=200)] = "0,1,2,4,8") -> Response:
    """One prompt answered with the latent at several strengths, side by side."""
    row = views.sae_or_404(session, sae)
    found = latents_by_index(session, row.id, [feature])
    if not found:
        raise HTTPException(404, f"SAE {row.id} has no latent {feature}")
    return render(request, "sweep.html", {"sae": row, "latent": found[0],
                                          "strengths": strengths})


@router.get("/steer/search")
def steer_search(request: Request, session: SessionDep, render: RenderDep,
                 sae: Annotated[int, Query(ge=1)],
                 q: Annotated[str, Query(max_length=200)] = "") -> Response:
    """Latents to add to the steering set: by index, or by explanation words."""
    row = views.sae_or_404(session, sae)
    words = q.strip()
    if words.isascii() and words.isdecimal() and len(words) < 10:
        found = latents_by_index(session, row.id, [int(words)])
    elif words:
        found = list_latents(session, row.id, search=words, limit=12)
    else:
        found = list_latents(session, row.id, sort="max_activation", limit=12)
    return render(request, "steer.html", {"current": row, "found": found},
                  block="search_results")


@router.get("/signin")
def signin_page(request: Request, render: RenderDep) -> Response:
    return render(request, "signin.html", {"error": None})


@router.post("/signin")
def signin(request: Request, render: RenderDep, settings: SettingsDep,
           token: Annotated[str, Form(max_length=1000)] = "") -> Response:
    """Sets the sign-in cookie; failed attempts are rate-limited per client address."""
    if not settings.admin_token:
        return RedirectResponse("/", status_code=303)
    limiter, client = request.app.state.signin_limiter, _client(request)
    wait = limiter.blocked(client)
    if wait is not None:
        return render(request, "signin.html", {
            "error": f"too many failed attempts: try again in {wait:.0f} s"}, status=429)
    if not same(token, settings.admin_token):
        limiter.failed(client)
        return render(request, "signin.html", {"error": "that is not the admin token"},
                      status=401)
    response = RedirectResponse("/jobs", status_code=303)
    response.set_cookie(ADMIN_COOKIE, admin_cookie_value(token), httponly=True,
                        samesite="strict", max_age=int(settings.signin_ttl_s))
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"
