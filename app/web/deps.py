"""Typed dependencies shared by the routers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.settings import Settings
from app.web.engine import InferenceEngine
from app.web.render import Renderer


def _session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _engine(request: Request) -> InferenceEngine:
    return request.app.state.engine


def _render(request: Request) -> Renderer:
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
