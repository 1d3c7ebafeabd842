"""Typed dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings
from app.web.engine import InferenceEngine
from app.web.render import Renderer


# The dependencies are ``async``: FastAPI runs a plain ``def`` one in the thread pool, and
# each hop there costs more than these do (a sync generator costs two, in and out).
async def _session(request: Request) -> AsyncIterator[Session]:
    """A session for the request; making one does no I/O, and closing it releases its
    connection (a rollback) in a thread when it holds one, even when the request was
    cancelled. The close has a limiter of its own, as FastAPI gives a generator's exit:
    behind the shared one it could wait for endpoints that wait for its connection."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close,
                                               limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


async def _render(request: Request) -> Renderer:
    return request.app.state.render


def celery_app(request: Request):
    """The Celery app jobs are sent with (made on first use: pages never need a broker)."""
    from app.queue import make_celery

    if request.app.state.celery is None:
        request.app.state.celery = make_celery(request.app.state.settings)
    return request.app.state.celery


SessionDep = Annotated[Session, Depends(_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[InferenceEngine, Depends(_engine)]
RenderDep = Annotated[Renderer, Depends(_render)]
