"""The JSON API under ``/api/v1``: the same data as the pages (OpenAPI docs at /docs)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, field_validator

from app import jobs
from app.store.queries import SORTS, explanations_for, list_latents, list_saes
from app.store.records import (
    example_record,
    explanation_record,
    job_record,
    latent_record,
    sae_record,
)
from app.web import views
from app.web.deps import EngineDep, SessionDep, celery_app
from app.web.security import require_admin

router = APIRouter(prefix="/api/v1", tags=["api"])


class ProbeRequest(BaseModel):
    sae_id: int
    text: str = Field(min_length=1, max_length=20_000)
    feature: int | None = Field(None, ge=0, description="latent whose activations to return")
    rank: Literal["relative", "raw"] = Field(
        "relative", description="top latents by their max here relative to their own max "
        "(relative) or by the raw max")
    include_sinks: bool = Field(False, description="rank attention-sink latents with the "
                                "others instead of last")


class SteerFeature(BaseModel):
    index: int = Field(ge=0)
    mode: Literal["clamp", "add", "cap"] = "clamp"
    value: float = Field(ge=-1000, le=1000, description="in units of the latent's max "
                         "activation: the clamp target, or the added strength")


class SteerRequest(BaseModel):
    sae_id: int
    prompt: str = Field(min_length=1, max_length=8_000)
    features: list[SteerFeature] = Field(default_factory=list, max_length=32)
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int = Field(128, ge=1, le=512)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    steer_special: bool = Field(False, description="also steer position 0 (BOS) and the "
                                "chat template's special tokens (left alone by default)")
    format: Literal["chat", "text"] = Field(
        "chat", description="chat: the prompt is a user turn in the chat template; text: "
        "BOS + the prompt, continued as plain text")
    top_p: float = Field(0.95, gt=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    top_logprobs: int = Field(0, ge=0, le=10, description="with each token event, this "
                              "many most likely tokens of its step and their log-probabilities")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("features")
    @classmethod
    def _distinct(cls, features: list[SteerFeature]) -> list[SteerFeature]:
        indices = [f.index for f in features]
        if len(indices) != len(set(indices)):
            raise ValueError("each latent may be steered once")
        return features


class JobRequest(BaseModel):
    kind: str
    params: dict[str, Any] = Field(default_factory=dict)


@router.get("/saes")
def saes(session: SessionDep, model: str | None = None) -> list[dict]:
    return [{**sae_record(s), "headline": views.headline(s)} for s in list_saes(session, model)]


@router.get("/saes/{sae_id}")
def sae(sae_id: int, session: SessionDep) -> dict:
    row = views.sae_or_404(session, sae_id)
    return {**sae_record(row), "headline": views.headline(row)}


@router.get("/saes/{sae_id}/features")
def features(sae_id: int, session: SessionDep,
             sort: Literal[tuple(SORTS)] = "index",  # type: ignore[valid-type]
             search: str | None = Query(None, max_length=200),
             limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)
             ) -> list[dict]:
    views.sae_or_404(session, sae_id)
    rows = list_latents(session, sae_id, search=search, sort=sort, limit=limit, offset=offset)
    return [latent_record(lat) for lat in rows]


@router.get("/saes/{sae_id}/features/{index}")
def feature(sae_id: int, index: int, session: SessionDep) -> dict:
    latent = views.latent_or_404(session, views.sae_or_404(session, sae_id), index)
    best = views.best_explanation(session, latent)
    return {**latent_record(latent),
            "explanation_score": best.score if best else None,
            "explanation_source": best.source if best else None,
            "explanations": [explanation_record(e)
                             for e in explanations_for(session, latent.id)],
            "examples": [example_record(e) for e in latent.examples]}


@router.post("/probe")
async def probe(body: ProbeRequest, session: SessionDep, engine: EngineDep) -> dict:
    row = views.sae_or_404(session, body.sae_id)
    if body.feature is not None and body.feature >= row.n_latents:
        raise HTTPException(422, f"feature: SAE {row.id} has latents 0 to {row.n_latents - 1}")
    handle = views.handle(row)
    session.close()  # no database connection held while waiting for the engine
    result = await engine.probe(handle, body.text)
    ranked = views.ranked_probe(session, row.id, result, by=body.rank,
                                sinks_last=not body.include_sinks)
    return probe_record(result, body.feature, ranked)


def probe_record(result, feature: int | None, ranked: list) -> dict:
    return {"tokens": result.tokens, "ids": result.ids,
            "activations": result.activations_of(feature) if feature is not None else None,
            "top_features": [{"index": r.index, "max": r.max, "relative": r.relative,
                              "count": r.count, "sink": r.sink} for r in ranked],
            "token_features": [[{"index": f, "value": v} for f, v in
                                result.token_features(t, 10)] for t in range(len(result.ids))]}


@router.post("/steer", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def steer(body: SteerRequest, session: SessionDep, engine: EngineDep
                ) -> StreamingResponse:
    """Baseline and steered replies as server-sent events: ``token`` events with
    ``{"side": "baseline"|"steered", "text": ...}`` (plus ``"top": [{"token", "logprob"}]``
    with ``top_logprobs``), then ``done`` (or ``error``)."""
    from training.inference.steering import (
        Sampling,
        Steer,
        chat_prompt_ids,
        text_prompt_ids,
    )

    row = views.sae_or_404(session, body.sae_id)
    maxima = views.latent_maxima(session, row.id, [f.index for f in body.features])
    steers = [Steer(feature=f.index, mode=f.mode, value=f.value) for f in body.features]
    sampling = Sampling(temperature=body.temperature, max_tokens=body.max_tokens,
                        seed=body.seed, steer_special=body.steer_special, top_p=body.top_p,
                        frequency_penalty=body.frequency_penalty)
    engine.check_capacity()
    handle = views.handle(row)
    session.close()  # the stream may last a minute: hold no database connection
    ids_of = partial(chat_prompt_ids if body.format == "chat" else text_prompt_ids,
                     prompt=body.prompt)
    pieces = engine.steer(handle, ids_of, steers, maxima, sampling, top=body.top_logprobs)
    return StreamingResponse(_events(pieces), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(pieces: AsyncIterator[tuple]) -> AsyncIterator[str]:
    try:
        async for row, text, *top in pieces:
            event = {"side": "steered" if row else "baseline", "text": text}
            if top:
                event["top"] = [{"token": t, "logprob": v} for t, v in top[0]]
            yield f"event: token\ndata: {json.dumps(event)}\n\n"
    except Exception as exc:  # the stream has started: report in-band
        yield f"event: error\ndata: {json.dumps({'detail': str(exc)})}\n\n"
        return
    yield "event: done\ndata: {}\n\n"


@router.get("/jobs")
def list_jobs(session: SessionDep, limit: int = Query(50, ge=1, le=500),
              state: str | None = None) -> list[dict]:
    return [job_record(j) for j in jobs.recent(session, limit, state)]


@router.post("/jobs", status_code=201, dependencies=[Depends(require_admin)])
def submit_job(body: JobRequest, request: Request) -> dict:
    try:
        job = jobs.submit(request.app.state.sessions, celery_app(request), body.kind,
                          body.params, request.app.state.settings, web=True)
    except jobs.JobError as exc:
        raise views.job_error(exc) from None
    return job_record(job)


@router.get("/jobs/{job_id}")
def job(job_id: int, session: SessionDep) -> dict:
    return job_record(views.job_or_404(session, job_id))


@router.post("/jobs/{job_id}/cancel", dependencies=[Depends(require_admin)])
def cancel_job(job_id: int, request: Request) -> dict:
    settings = request.app.state.settings
    try:
        job = jobs.cancel(request.app.state.sessions, job_id, settings)
    except jobs.JobError as exc:
        raise views.job_error(exc) from None
    return job_record(job)


class PresetRequest(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    sae_id: int = Field(ge=1, le=2**62)
    features: list[SteerFeature] = Field(min_length=1, max_length=32)


@router.get("/presets")
def presets(session: SessionDep) -> list[dict]:
    """Saved steering presets; each is also a model name (``preset-<id>``) of /v1."""
    from app.store.presets import list_presets

    return [_preset_record(p) for p in list_presets(session)]


@router.post("/presets", status_code=201, dependencies=[Depends(require_admin)])
def create_preset(body: PresetRequest, request: Request, session: SessionDep) -> dict:
    from app.store.presets import create_preset as store_preset

    sae = views.sae_or_404(session, body.sae_id)
    views.latent_maxima(session, sae.id, [f.index for f in body.features])  # 422: unknown
    session.close()
    preset = store_preset(request.app.state.sessions, body.name, sae.id,
                          [f.model_dump() for f in body.features])
    return _preset_record(preset)


def _preset_record(preset) -> dict:
    return {"id": preset.id, "model": f"preset-{preset.id}", "name": preset.name,
            "sae_id": preset.sae_id, "latents": preset.latents}
