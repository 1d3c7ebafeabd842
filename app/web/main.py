"""The explorer's app factory: ``create_app(settings)`` wires the store, the inference
engine, the routers, CSRF and the error pages. Nothing happens at import time."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException

from app.jobs import plain
from app.settings import Settings, get_settings
from app.web import (
    api,
    api_search,
    openai_api,
    pages,
    pages_add_sae,
    pages_explore,
    pages_jobs,
    pages_lists,
)
from app.web.engine import EngineBusy, EngineInputError, InferenceEngine
from app.web.guards import HostAndBodyGuard, SigninLimiter, without_paths
from app.web.render import STATIC, Renderer
from app.web.security import csrf_token, is_admin, set_csrf_cookie, verify_csrf

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: InferenceEngine | None = None
               ) -> FastAPI:
    """The ASGI app on ``settings``' store (migrated first); ``engine`` may be given to
    share already loaded models (tests, benchmarks)."""
    from app.store.db import open_store

    settings = settings or get_settings()
    app = FastAPI(title="saelab", version="0.1.0", dependencies=[Depends(verify_csrf)],
                  description="Browse SAE features, probe text, steer chat, queue jobs.",
                  lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.sessions = open_store(settings.database_url)
    app.state.engine = engine or InferenceEngine(settings)
    app.state.owns_engine = engine is None
    app.state.render = Renderer()
    app.state.celery = None  # made on the first job submission
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(api.router)
    app.include_router(api_search.router)
    app.include_router(openai_api.router)
    app.include_router(pages_add_sae.router)  # before pages' /saes/{sae_id}
    app.include_router(pages.router)
    app.include_router(pages_jobs.router)
    app.include_router(pages_lists.router)
    app.include_router(pages_explore.router)
    app.middleware("http")(_csrf_cookie)
    app.add_middleware(HostAndBodyGuard, allowed_hosts=settings.allowed_hosts,
                       max_body_bytes=settings.max_body_bytes)
    app.state.signin_limiter = SigninLimiter()
    _error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    _offline_docs(app)

    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Frees the inference thread (unless the engine was given), the store's connections
    and the broker connection when the server stops."""
    yield
    if app.state.owns_engine:
        app.state.engine.close()
    app.state.sessions.kw["bind"].dispose()
    if app.state.celery is not None:
        app.state.celery.close()


async def _csrf_cookie(request: Request, call_next) -> Response:
    request.state.csrf_token = csrf_token(request)
    request.state.admin = is_admin(request)
    response = await call_next(request)
    set_csrf_cookie(request, response)
    return response


def _offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc from the vendored assets (FastAPI's default
    pages load them from a CDN, so they are blank offline), and the favicon."""
    vendor = "/static/vendor"

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="saelab API",
                                   swagger_js_url=f"{vendor}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{vendor}/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title="saelab API",
                              redoc_js_url=f"{vendor}/redoc.standalone.js",
                              redoc_favicon_url="/static/favicon.svg", with_google_fonts=False)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return RedirectResponse("/static/favicon.svg", status_code=301)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, validation_message(exc))

    @app.exception_handler(EngineBusy)
    async def busy(request: Request, exc: EngineBusy) -> Response:
        return error_response(request, 503, str(exc))

    @app.exception_handler(EngineInputError)
    async def bad_input(request: Request, exc: EngineInputError) -> Response:
        return error_response(request, 422, str(exc))

    @app.exception_handler(OverflowError)
    async def overflow(request: Request, exc: OverflowError) -> Response:
        return error_response(request, 422, "a number in the request is out of range")

    @app.exception_handler(DataError)
    async def unstorable(request: Request, exc: DataError) -> Response:
        """A value the database's column cannot hold (an id past 32 bits on PostgreSQL):
        the request's fault, and its transaction was rolled back."""
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "invalid value"
        return error_response(request, 422, f"a value in the request does not fit the "
                                            f"store ({reason})")


def validation_message(exc: RequestValidationError) -> str:
    """'field: problem; ...' from FastAPI's validation errors."""
    parts = []
    for error in exc.errors():
        where = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        parts.append(f"{'.'.join(where) or 'request'}: {plain(error.get('msg', 'invalid'))}")
    return "; ".join(parts)


def error_response(request: Request, status: int, message: str) -> Response:
    """JSON for the API, a fragment for HTMX, an error page otherwise; server paths are
    left out for clients that are not signed in when a token is set."""
    if request.app.state.settings.admin_token and not getattr(request.state, "admin", False):
        message = without_paths(message)
    if request.url.path.startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    if not hasattr(request.state, "csrf_token"):
        request.state.csrf_token = csrf_token(request)
    render: Renderer = request.app.state.render
    block = "message" if request.headers.get("HX-Request") == "true" else None
    return render(request, "error.html", {"status": status, "message": message},
                  status=status, block=block)
