"""A local HTTP server speaking enough of Anthropic's Messages and Message Batches APIs for
the real ``anthropic`` SDK, with scripted answers and injected errors.

It listens on 127.0.0.1 (a free port) in a daemon thread, records every request, limits
request bodies, and stops when its ``with`` block ends.

* ``POST /v1/messages`` answers ``responder(body)``: a text, or a ``Fault`` to send back.
* ``fail_next(*faults)`` queues errors the next requests get (any endpoint), in order;
  ``fail_always(fault)`` makes every request fail until ``fail_always(None)``.
* ``POST /v1/messages/batches`` stores the requests; ``GET /v1/messages/batches/{id}``
  reports ``in_progress`` for the first ``batch_polls`` polls, then ``ended`` with a
  ``results_url``; ``GET …/results`` streams one JSON line per request (``succeeded`` or,
  when the responder returns a Fault, ``errored``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 16 << 20
MAX_RECORDED = 10_000
_BATCH_TIME = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class Fault:
    """An HTTP error reply."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def api_error(status: int, kind: str, message: str, **headers: str) -> Fault:
    return Fault(status, {"type": "error", "error": {"type": kind, "message": message}},
                 {k.replace("_", "-"): v for k, v in headers.items()})


def rate_limited(retry_after: str = "0") -> Fault:
    return api_error(429, "rate_limit_error", "Number of requests has exceeded your rate limit",
                     retry_after=retry_after)


def overloaded() -> Fault:
    return api_error(529, "overloaded_error", "Overloaded")


def server_error() -> Fault:
    return api_error(500, "api_error", "Internal server error")


def credit_too_low() -> Fault:
    return api_error(400, "invalid_request_error",
                     "Your credit balance is too low to access the Anthropic API. "
                     "Please go to Plans & Billing to upgrade or purchase credits.")


def unauthorized() -> Fault:
    return api_error(401, "authentication_error", "invalid x-api-key")


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Responder = Callable[[dict[str, Any]], "str | Fault"]


def user_text(body: dict[str, Any]) -> str:
    """All user-turn text of a Messages request body."""
    return "\n".join(m["content"] if isinstance(m["content"], str)
                     else "".join(b.get("text", "") for b in m["content"])
                     for m in body["messages"] if m["role"] == "user")


class FakeAnthropic:
    """The server; use as ``with FakeAnthropic(responder) as api: …api.url…``."""

    def __init__(self, responder: Responder = lambda body: "ok", *, batch_polls: int = 1):
        self.responder = responder
        self.batch_polls = batch_polls
        self.requests: list[Recorded] = []
        self.replies: list[dict[str, Any]] = []
        self.batches: dict[str, dict[str, Any]] = {}
        self._faults: list[Fault] = []
        self._always: Fault | None = None
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fake-anthropic")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeAnthropic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail_next(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        self._always = fault

    def paths(self, method: str = "POST") -> list[str]:
        return [r.path for r in self.requests if r.method == method]

    # -- called by the handler -------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str],
               body: Any) -> tuple[int, Any, dict[str, str]]:
        """(status, JSON body or JSONL text, headers) for one request."""
        with self._lock:
            if len(self.requests) < MAX_RECORDED:
                self.requests.append(Recorded(method, path, headers, body))
            fault = self._always or (self._faults.pop(0) if self._faults else None)
        if fault is not None:
            return fault.status, fault.body, fault.headers
        if (method, path) == ("POST", "/v1/messages"):
            reply = self._message(body)
            return (reply.status, reply.body, reply.headers) if isinstance(reply, Fault) \
                else (200, reply, {})
        if (method, path) == ("POST", "/v1/messages/batches"):
            return 200, self._create_batch(body), {}
        parts = path.removeprefix("/v1/messages/batches/").split("/")
        if method == "GET" and path.startswith("/v1/messages/batches/") and parts[0] in \
                self.batches:
            if parts[1:] == ["results"]:
                return 200, self._results(parts[0]), {"content-type": "application/x-jsonl"}
            if len(parts) == 1:
                return 200, self._poll(parts[0]), {}
        return 404, {"type": "error", "error": {"type": "not_found_error",
                                                "message": f"no route {method} {path}"}}, {}

    def _message(self, body: dict[str, Any]) -> dict[str, Any] | Fault:
        answer = self.responder(body)
        if isinstance(answer, Fault):
            return answer
        reply = {"id": f"msg_{len(self.replies)}", "type": "message", "role": "assistant",
                 "model": body["model"], "content": [{"type": "text", "text": answer}],
                 "stop_reason": "end_turn", "stop_sequence": None,
                 "usage": {"input_tokens": len(json.dumps(body)) // 4,
                           "output_tokens": len(answer.split()) + 1}}
        with self._lock:
            self.replies.append(reply)
        return reply

    def _create_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            batch_id = f"msgbatch_{len(self.batches)}"
            self.batches[batch_id] = {"requests": body["requests"], "polls": 0}
        return self._batch_object(batch_id, ended=False)

    def _poll(self, batch_id: str) -> dict[str, Any]:
        state = self.batches[batch_id]
        state["polls"] += 1
        return self._batch_object(batch_id, ended=state["polls"] > self.batch_polls)

    def _batch_object(self, batch_id: str, *, ended: bool) -> dict[str, Any]:
        n = len(self.batches[batch_id]["requests"])
        counts = {"processing": 0 if ended else n, "succeeded": n if ended else 0,
                  "errored": 0, "canceled": 0, "expired": 0}
        return {"id": batch_id, "type": "message_batch",
                "processing_status": "ended" if ended else "in_progress",
                "request_counts": counts, "created_at": _BATCH_TIME,
                "expires_at": _BATCH_TIME, "ended_at": _BATCH_TIME if ended else None,
                "archived_at": None, "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch_id}/results"
                if ended else None}

    def _results(self, batch_id: str) -> str:
        lines = []
        for request in self.batches[batch_id]["requests"]:
            reply = self._message(request["params"])
            result = ({"type": "errored", "error": reply.body} if isinstance(reply, Fault)
                      else {"type": "succeeded", "message": reply})
            lines.append(json.dumps({"custom_id": request["custom_id"], "result": result}))
        return "".join(line + "\n" for line in lines)


def _handler_class(api: FakeAnthropic) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve(None)

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length > MAX_BODY:
                self._send(413, {"type": "error", "error": {"type": "request_too_large",
                                                            "message": "too large"}}, {})
                return
            raw = self.rfile.read(length)
            self._serve(json.loads(raw) if raw else None)

        def _serve(self, body: Any) -> None:
            path = self.path.split("?", 1)[0]
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(*api.handle(self.command, path, headers, body))

        def _send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            headers = dict(headers)
            self.send_response(status)
            self.send_header("content-type", headers.pop("content-type", "application/json"))
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", "req_fake")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
