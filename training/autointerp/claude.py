"""Claude as an explainer, through the ``anthropic`` SDK (Messages and Message Batches).

Decisions:
* The SDK's own retries are off (``max_retries=0``): retries happen here, with exponential
  backoff and jitter, at least as long as a ``retry-after`` header asks, on 429, 408/409,
  5xx (529 = overloaded) and connection errors. Creating a batch is not idempotent, so it
  is retried only after a 429 or a failed connection. Errors that retrying cannot fix (400, 401,
  403, a spending limit, a credit balance too low) raise ``ExplainerError`` at once; those
  that no later call can fix either are ``fatal``.
* Sampling parameters are left at the API's defaults: recent SDKs no longer take
  ``temperature`` on ``messages.create``, and newer models reject it.
* Cost is tokens × ``price_per_mtok`` (USD per million input / output tokens); the Message
  Batches API bills half (``BATCH_DISCOUNT``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import anthropic

from training.autointerp.protocol import (
    JUDGE_MAX_TOKENS,
    Completion,
    ExplainerError,
    Messages,
    Usage,
    UsageMeter,
    parse_yes_no,
)
from training.autointerp.retry import Retrier

log = logging.getLogger(__name__)

DEFAULT_MODEL = "claude-sonnet-4-6"
DEFAULT_PRICE_PER_MTOK = (3.0, 15.0)
"""USD per million input and output tokens of Claude Sonnet 4.5."""
BATCH_DISCOUNT = 0.5
_RETRY_STATUSES = frozenset({408, 409, 429})
_CUSTOM_ID = "req-"



class ClaudeExplainer:
    """Explains and judges with a Claude model; thread-safe (``concurrency`` calls at once)."""

    name = "claude"

    def __init__(self, api_key: str, model: str = DEFAULT_MODEL, *, base_url: str | None = None,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 concurrency: int = 4,
                 price_per_mtok: tuple[float, float] = DEFAULT_PRICE_PER_MTOK,
                 timeout_s: float = 120.0, poll_interval_s: float = 30.0,
                 batch_timeout_s: float = 24 * 3600.0, batch_size: int = 10_000) -> None:
        if not api_key:
            raise ExplainerError("no Anthropic API key was given", fatal=True)
        if max_retries < 0 or concurrency < 1 or batch_size < 1:
            raise ValueError("max_retries must be >= 0, concurrency and batch_size >= 1")
        self.model = model
        self.concurrency = concurrency
        self.price_per_mtok = price_per_mtok
        self.poll_interval_s = poll_interval_s
        self.batch_timeout_s = batch_timeout_s
        self.batch_size = batch_size
        self.usage = UsageMeter()
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, max_retries=0,
                                          timeout=timeout_s)
        self._retrying = Retrier(anthropic.AnthropicError, classify, max_retries, backoff_s,
                                 max_backoff_s, service="Anthropic API")

    # -- one call ----------------------------------------------------------------------
    def complete(self, messages: Messages, max_tokens: int) -> Completion:
        """Claude's reply to ``messages`` (system messages become the system prompt)."""
        params = self._params(messages, max_tokens)
        reply = self._retrying(lambda: self.client.messages.create(**params))
        completion = self._completion(reply, discount=1.0)
        self.usage.record(Usage.of(completion))
        return completion

    def judge(self, messages: Messages) -> bool:
        """The yes/no at the start of Claude's (short) reply."""
        text = self.complete(messages, JUDGE_MAX_TOKENS).text
        try:
            return parse_yes_no(text)
        except ValueError as exc:
            raise ExplainerError(str(exc)) from exc

    def _params(self, messages: Messages, max_tokens: int) -> dict[str, Any]:
        system, turns = split_system(messages)
        params: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens,
                                  "messages": turns}
        if system:
            params["system"] = system
        return params

    def _completion(self, message: Any, *, discount: float) -> Completion:
        """A Completion of an SDK ``Message``, priced (× ``discount``)."""
        text = "".join(getattr(block, "text", "") for block in message.content)
        tokens_in, tokens_out = message.usage.input_tokens, message.usage.output_tokens
        price_in, price_out = self.price_per_mtok
        cost = (tokens_in * price_in + tokens_out * price_out) / 1e6 * discount
        return Completion(text, tokens_in, tokens_out, cost)

    # -- message batches -----------------------------------------------------------------
    def complete_batch(self, message_lists: Sequence[Messages],
                       max_tokens: int) -> list[Completion | ExplainerError]:
        """Replies to many prompts through the Message Batches API (half price, minutes to
        hours), in input order; a request that failed gets its ExplainerError."""
        if not hasattr(self.client.messages, "batches"):
            raise ExplainerError("this version of the anthropic SDK has no Message Batches "
                                 "API (client.messages.batches): upgrade anthropic")
        requests = [{"custom_id": f"{_CUSTOM_ID}{i}", "params": self._params(m, max_tokens)}
                    for i, m in enumerate(message_lists)]
        chunks = [requests[i:i + self.batch_size]
                  for i in range(0, len(requests), self.batch_size)]
        out: dict[int, Completion | ExplainerError] = {}
        submitted: list[tuple[str, list[dict]]] = []
        for chunk in chunks:
            try:
                batch = self._retrying(lambda c=chunk: self.client.messages.batches.create(
                    requests=c), not_applied=surely_not_applied)
                submitted.append((batch.id, chunk))
            except ExplainerError as exc:
                out.update((_request_index(r["custom_id"]), exc) for r in chunk)
        for batch_id, chunk in submitted:
            out.update(self._collect(batch_id, chunk))
        missing = ExplainerError("the batch returned no result for this request")
        return [out.get(i, missing) for i in range(len(requests))]

    def _collect(self, batch_id: str,
                 chunk: list[dict]) -> dict[int, Completion | ExplainerError]:
        """Wait for a batch to end and read its results (errors for the whole chunk when
        waiting or reading fails)."""
        try:
            self._wait(batch_id)
            entries = self._retrying(lambda: list(self.client.messages.batches.results(batch_id)))
        except ExplainerError as exc:
            return {_request_index(r["custom_id"]): exc for r in chunk}
        results: dict[int, Completion | ExplainerError] = {}
        for entry in entries:
            results[_request_index(entry.custom_id)] = self._batch_result(entry.result)
        return results

    def _wait(self, batch_id: str) -> None:
        deadline = time.monotonic() + self.batch_timeout_s
        while True:
            batch = self._retrying(lambda: self.client.messages.batches.retrieve(batch_id))
            if batch.processing_status == "ended":
                return
            if time.monotonic() > deadline:
                raise ExplainerError(f"batch {batch_id} did not end within "
                                     f"{self.batch_timeout_s:.0f} s")
            time.sleep(self.poll_interval_s)

    def _batch_result(self, result: Any) -> Completion | ExplainerError:
        if result.type == "succeeded":
            completion = self._completion(result.message, discount=BATCH_DISCOUNT)
            self.usage.record(Usage.of(completion))
            return completion
        if result.type == "errored":
            error = result.error.error
            return ExplainerError(f"batch request failed: {error.type}: {error.message}")
        return ExplainerError(f"batch request {result.type}")


def split_system(messages: Messages) -> tuple[str, list[dict[str, str]]]:
    """The system prompt (system messages joined) and the remaining turns."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages
             if m["role"] != "system"]
    if not turns:
        raise ValueError("the prompt has no user message")
    return system, turns


def _request_index(custom_id: str) -> int:
    return int(custom_id.removeprefix(_CUSTOM_ID))


def classify(exc: Exception) -> tuple[bool, ExplainerError]:
    """(worth retrying?, the error to report) for an SDK exception."""
    if isinstance(exc, anthropic.APIConnectionError):
        return True, ExplainerError(f"cannot reach the Anthropic API: {exc}")
    if not isinstance(exc, anthropic.APIStatusError):
        return False, ExplainerError(f"Anthropic API: {exc}")
    status, kind, message = exc.status_code, *_error_fields(exc.body)
    text = f"Anthropic API error {status} ({kind}): {message}"
    if status == 402 or kind == "billing_error" or "credit balance" in message.lower():
        return False, ExplainerError(f"the Anthropic account's credit balance is too low "
                                     f"(add credits, then run again): {message}",
                                     fatal=True, status=status)
    if status == 401:
        return False, ExplainerError(f"Anthropic API authentication failed (401): check the "
                                     f"API key: {message}", fatal=True, status=status)
    if status == 403:
        return False, ExplainerError(f"Anthropic API permission denied (403): {message}",
                                     fatal=True, status=status)
    if status == 429 and ("spend limit" in message.lower() or "spend_limit" in str(exc.body)):
        return False, ExplainerError(text, fatal=True, status=status)
    retryable = status in _RETRY_STATUSES or status >= 500
    return retryable, ExplainerError(text, status=status)


def surely_not_applied(exc: Exception) -> bool:
    """Whether the API cannot have acted on the request: a 429, or no connection at all
    (a timeout or a 5xx may come after the work was done)."""
    if isinstance(exc, anthropic.APIStatusError):
        return exc.status_code == 429 and classify(exc)[0]
    return isinstance(exc, anthropic.APIConnectionError) and not isinstance(
        exc, anthropic.APITimeoutError)


def _error_fields(body: object) -> tuple[str, str]:
    """(error type, message) of an API error body ``{"type": "error", "error": {...}}``."""
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "unknown", str(body or "")
    return str(error.get("type", "unknown")), str(error.get("message", ""))
