"""What stands between the explorer and a stranger: the Host allow-list, the request body
limit, sign-in attempt rate limiting, and error messages without server paths.

* Host: a page on another site can point a name it controls at 127.0.0.1 (DNS rebinding)
  and so reach a loopback server from the user's own browser; such requests carry that
  name in their Host header, so only the operator's names are answered (400 otherwise).
* Bodies: a request body over ``max_body_bytes`` is refused with 413 before it is read
  (by its Content-Length, or by reading a body sent without one up to the limit).
* Sign-in: at most ``SIGNIN_ATTEMPTS`` failed attempts per client per ``SIGNIN_WINDOW_S``;
  later ones get 429 until the window passes.
* Errors: for a client that is not signed in (when a token is set), absolute paths in an
  error message are replaced by ``<path>``; an operator sees them whole.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict, deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SIGNIN_ATTEMPTS = 5
SIGNIN_WINDOW_S = 60.0
_PATH = re.compile(r"(?<![\w:/])/(?:[\w.@+-]+/)*[\w.@+-]+")


class HostAndBodyGuard:
    """ASGI middleware: refuse unknown Host headers (400) and oversized bodies (413)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str], max_body_bytes: int) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self.any_host and host_name(headers.get("host", "")) not in self.hosts:
            await _plain(send, 400, "this server does not answer that Host name (the "
                                    "operator lists the allowed ones in "
                                    "SAELAB_ALLOWED_HOSTS)")
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            await _plain(send, 413, f"the request body is over {self.max_body:,} bytes")
            return
        if not length and scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_within_limit(receive)
            if body is None:
                await _plain(send, 413, f"the request body is over {self.max_body:,} bytes")
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_within_limit(self, receive: Receive) -> bytes | None:
        """A body sent without Content-Length, read whole; None once it passes the limit."""
        parts, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(parts)
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.max_body:
                return None
            if not message.get("more_body", False):
                return b"".join(parts)


def _replay(body: bytes, then: Receive) -> Receive:
    """The body read already, then the client's own messages (its disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return await then()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def host_name(host: str) -> str:
    """The name of a Host header, without its port (IPv6 brackets kept apart)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SigninLimiter:
    """Failed sign-ins per client address in a sliding window."""

    def __init__(self, attempts: int = SIGNIN_ATTEMPTS, window_s: float = SIGNIN_WINDOW_S):
        self.attempts, self.window_s = attempts, window_s
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    def blocked(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None when it may now."""
        now = time.monotonic()
        recent = self.failures[client]
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if len(recent) < self.attempts:
            return None
        return self.window_s - (now - recent[0])

    def failed(self, client: str) -> None:
        self.failures[client].append(time.monotonic())


def without_paths(message: str) -> str:
    """``message`` with absolute file-system paths replaced by ``<path>``."""
    return _PATH.sub("<path>", message)
