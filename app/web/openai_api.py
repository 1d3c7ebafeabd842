"""The steered model as an OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``
and ``/v1/completions``, streaming (server-sent ``chat.completion.chunk`` events ending in
``[DONE]``) or not, so any OpenAI client or chat UI can talk to a Llama steered by SAE
latents.

The steering rides in an extra body field, ``steer``:
``{"sae": ID, "latents": [{"index": 12, "mode": "clamp", "value": 4}]}`` (value in units of
the latent's max activation, as on the steer page; modes ``clamp``, ``add`` and ``cap``), or
in a saved steering preset named as the ``model`` (``preset-<id>``). A plain ``model`` (the
SAE's language model) with no ``steer`` runs it unsteered. When the admin token is set it
is the API key: ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.web import views
from app.web.deps import EngineDep, SessionDep
from app.web.security import require_admin

router = APIRouter(prefix="/v1", tags=["openai-compatible"])
PRESET_PREFIX = "preset-"


class SteerLatent(BaseModel):
    index: int = Field(ge=0)
    mode: Literal["clamp", "add", "cap"] = "clamp"
    value: float = Field(ge=-1000, le=1000)


class SteerSpec(BaseModel):
    sae: int = Field(ge=1, le=2**62)
    latents: list[SteerLatent] = Field(default_factory=list, max_length=32)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=16_000)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use
    model: str = Field(max_length=300)
    max_tokens: int | None = Field(None, ge=1, le=512)
    max_completion_tokens: int | None = Field(None, ge=1, le=512)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    stream: bool = False
    steer: SteerSpec | None = None
    steer_special: bool = False

    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 128


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=64)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1, max_length=16_000)


@router.get("/models")
def models(session: SessionDep) -> dict:
    """The language models of the store's SAEs and every steering preset."""
    from app.store.presets import list_presets
    from app.store.queries import list_saes

    names = sorted({sae.model.name for sae in list_saes(session)})
    now = int(time.time())
    data = [{"id": name, "object": "model", "created": now, "owned_by": "saelab"}
            for name in names]
    data += [{"id": f"{PRESET_PREFIX}{p.id}", "object": "model", "created": now,
              "owned_by": "saelab", "description": p.name} for p in list_presets(session)]
    return {"object": "list", "data": data}


@router.post("/chat/completions", dependencies=[Depends(require_admin)])
async def chat_completions(body: ChatRequest, request: Request, session: SessionDep,
                           engine: EngineDep):
    messages = [m.model_dump() for m in body.messages]
    return await _complete(body, "chat", lambda lm: chat_ids(lm, messages), session, engine)


@router.post("/completions", dependencies=[Depends(require_admin)])
async def completions(body: CompletionRequest, request: Request, session: SessionDep,
                      engine: EngineDep):
    return await _complete(body, "text", lambda lm: text_ids(lm, body.prompt), session,
                           engine)


def chat_ids(lm, messages: list[dict]) -> list[int]:
    from training.inference.steering import conversation_ids

    return conversation_ids(lm, messages)


def text_ids(lm, prompt: str) -> list[int]:
    from training.inference.steering import text_prompt_ids

    return text_prompt_ids(lm, prompt)


async def _complete(body: _Common, kind: str, ids_of, session, engine):
    from training.inference.sampling import Sampling
    from training.inference.steering import Steer

    sae_row, spec = _resolve(session, body)
    features = [lat.index for lat in spec.latents] if spec else []
    maxima = views.latent_maxima(session, sae_row.id, features) if features else {}
    steers = [Steer(lat.index, lat.mode, lat.value) for lat in spec.latents] if spec else []
    sampling = Sampling(temperature=body.temperature, max_tokens=body.new_tokens(),
                        seed=body.seed, top_p=body.top_p,
                        frequency_penalty=body.frequency_penalty,
                        steer_special=body.steer_special)
    engine.check_capacity()
    handle = views.handle(sae_row)
    session.close()  # the reply may take a while: hold no database connection
    run = engine.complete(handle, ids_of, steers, maxima, sampling)
    reply_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        return StreamingResponse(_chunks(run, reply_id, body.model, kind),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _whole(run, reply_id, body.model, kind)


def _resolve(session, body: _Common):
    """(the SAE row, the steering) a request names: a preset, or ``steer`` with a model."""
    from app.store.presets import get_preset

    spec = body.steer
    if body.model.startswith(PRESET_PREFIX):
        key = body.model.removeprefix(PRESET_PREFIX)
        preset = get_preset(session, int(key)) if key.isdecimal() and len(key) < 18 else None
        if preset is None:
            raise HTTPException(404, f"model: there is no steering preset {body.model!r}")
        spec = SteerSpec(sae=preset.sae_id, latents=preset.latents)
    if spec is None:
        raise HTTPException(422, "steer: name the SAE to steer with ({\"sae\": ID, "
                                 "\"latents\": [...]}) or a preset as the model")
    sae_row = views.sae_or_404(session, spec.sae)
    if not body.model.startswith(PRESET_PREFIX) and body.model != sae_row.model.name:
        raise HTTPException(422, f"model: SAE {sae_row.id} reads {sae_row.model.name!r}, "
                                 f"not {body.model!r}")
    return sae_row, spec


async def _whole(run: AsyncIterator, reply_id: str, model: str, kind: str) -> dict:
    text, usage, finish = "", {}, "stop"
    async for piece in run:
        if isinstance(piece, dict):
            usage, finish = piece["usage"], piece["finish_reason"]
        else:
            text += piece
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": reply_id, "object": "chat.completion" if kind == "chat" else
            "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage}


async def _chunks(run: AsyncIterator, reply_id: str, model: str, kind: str
                  ) -> AsyncIterator[str]:
    created, obj = int(time.time()), ("chat.completion.chunk" if kind == "chat" else
                                      "text_completion")

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            content = {"role": "assistant", "content": ""} if first else (
                {} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish}
        return "data: " + json.dumps({"id": reply_id, "object": obj, "created": created,
                                      "model": model, "choices": [choice]}) + "\n\n"

    try:
        if kind == "chat":
            yield chunk(None, None, first=True)
        async for piece in run:
            if isinstance(piece, dict):
                yield chunk(None, piece["finish_reason"])
            else:
                yield chunk(piece, None)
    except Exception as exc:  # the stream has started: report in-band, as OpenAI does
        yield "data: " + json.dumps({"error": {"message": str(exc)}}) + "\n\n"
    yield "data: [DONE]\n\n"
