"""CSRF protection and the admin token.

CSRF uses the double-submit pattern: every response sets an HttpOnly, SameSite=Strict
cookie holding a random token, pages carry the same token (HTMX sends it as the
``X-CSRF-Token`` header, plain forms as a ``csrf_token`` field), and a state-changing
request must present both, equal. A cross-site page can make a browser send the cookie but
cannot read it. JSON bodies are exempt: a browser cannot send ``application/json``
cross-site without a CORS preflight, which this app never grants.

Mutations (queueing and cancelling jobs) also need the admin token when the settings set
one: ``Authorization: Bearer <token>``, or the cookie the sign-in page sets: its issue time
and an HMAC of that time keyed by the token (never the token itself), so it expires after
``signin_ttl_s`` and every sign-in ends when the operator changes the token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import HTTPException, Request, Response

CSRF_COOKIE = "saelab_csrf"
ADMIN_COOKIE = "saelab_admin"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same(a: str, b: str) -> bool:
    """Constant-time equality of two strings, whatever characters they hold."""
    return hmac.compare_digest(a.encode(), b.encode())


def csrf_token(request: Request) -> str:
    """The request's CSRF token: its cookie's, or a new one (set on the response)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    return token if len(token) >= 32 else secrets.token_urlsafe(32)


def set_csrf_cookie(request: Request, response: Response) -> None:
    if request.cookies.get(CSRF_COOKIE) != request.state.csrf_token:
        response.set_cookie(CSRF_COOKIE, request.state.csrf_token, httponly=True,
                            samesite="strict", path="/")


async def verify_csrf(request: Request) -> None:
    """Dependency of every route: unsafe methods need a matching CSRF token."""
    if request.method in SAFE_METHODS or _is_json(request) or is_admin_bearer(request):
        return
    sent = request.headers.get("X-CSRF-Token")
    if sent is None and _is_form(request):
        sent = (await request.form()).get("csrf_token")
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not sent or not cookie or not same(str(sent), cookie):
        if request.url.path.startswith("/api/"):
            raise HTTPException(403, "API requests that change state must send "
                                     "'Content-Type: application/json' (a JSON body, {} if "
                                     "none)")
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page "
                                 "and try again")


def admin_cookie_value(token: str, issued: float | None = None) -> str:
    """``<issued>.<HMAC-SHA256(token, "saelab-admin:<issued>")>``."""
    issued = int(time.time() if issued is None else issued)
    mac = hmac.new(token.encode(), f"saelab-admin:{issued}".encode(), hashlib.sha256)
    return f"{issued}.{mac.hexdigest()}"


def valid_admin_cookie(cookie: str, token: str, ttl_s: float) -> bool:
    issued, _, _mac = cookie.partition(".")
    if not issued.isdecimal() or time.time() - int(issued) > ttl_s:
        return False
    return same(cookie, admin_cookie_value(token, int(issued)))


def is_admin_bearer(request: Request) -> bool:
    token = request.app.state.settings.admin_token
    header = request.headers.get("Authorization", "")
    return bool(token) and same(header, f"Bearer {token}")


def is_admin(request: Request) -> bool:
    """Whether the request may mutate: no token configured, a bearer token, or the
    sign-in cookie."""
    token = request.app.state.settings.admin_token
    if not token:
        return True
    cookie = request.cookies.get(ADMIN_COOKIE, "")
    ttl = request.app.state.settings.signin_ttl_s
    return is_admin_bearer(request) or valid_admin_cookie(cookie, token, ttl)


def require_admin(request: Request) -> None:
    """Dependency of mutating routes."""
    if not is_admin(request):
        raise HTTPException(401, "this needs the admin token: sign in at /signin or send "
                                 "'Authorization: Bearer <token>'")


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    return kind in ("application/x-www-form-urlencoded", "multipart/form-data")
