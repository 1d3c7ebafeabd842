"""Any OpenAI-compatible chat server as an explainer, through the official ``openai`` SDK:
vLLM, Ollama, llama.cpp's server, LM Studio, OpenRouter or OpenAI itself.

Decisions, as for Claude (``training.autointerp.claude``):
* The SDK's retries are off; ``Retrier`` retries 408/409/429, 5xx and connection errors
  with backoff (honouring ``retry-after``). 401, 403, an exhausted quota
  (``insufficient_quota``) and an unknown model (404) are fatal: no later call can
  succeed. Other 4xx fail the one call.
* Labels and judgements are sampled at temperature 0, so a re-run against the same server
  and model gives the same label.
* Cost is tokens × ``price_per_mtok`` (USD per million input / output tokens; 0 for a
  local server), from the usage the server reports.
* Judge questions run ``concurrency`` at a time. There is no batch mode: the Batch API is
  OpenAI's own, and the local servers do not offer it.
"""

from __future__ import annotations

from typing import Any

import openai

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

_RETRY_STATUSES = frozenset({408, 409, 429})


class OpenAIExplainer:
    """Explains and judges with a model behind an OpenAI-compatible endpoint."""

    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str = "", *,
                 max_retries: int = 4, backoff_s: float = 1.0, max_backoff_s: float = 60.0,
                 concurrency: int = 4, price_per_mtok: tuple[float, float] = (0.0, 0.0),
                 timeout_s: float = 120.0) -> None:
        if not base_url:
            raise ExplainerError("no OpenAI-compatible server was given "
                                 "(SAELAB_OPENAI_BASE_URL)", fatal=True)
        if not model:
            raise ExplainerError("no model was named for the OpenAI-compatible server "
                                 "(SAELAB_OPENAI_MODEL or --model)", fatal=True)
        if max_retries < 0 or concurrency < 1:
            raise ValueError("max_retries must be >= 0 and concurrency >= 1")
        self.model = model
        self.concurrency = concurrency
        self.price_per_mtok = price_per_mtok
        self.usage = UsageMeter()
        # local servers take any key, but the SDK insists on one
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none",
                                    max_retries=0, timeout=timeout_s)
        self._retrying = Retrier(openai.OpenAIError, classify, max_retries, backoff_s,
                                 max_backoff_s, service=f"OpenAI-compatible server {base_url}")

    def complete(self, messages: Messages, max_tokens: int) -> Completion:
        params: dict[str, Any] = {"model": self.model, "messages": messages,
                                  "max_tokens": max_tokens, "temperature": 0}
        reply = self._retrying(lambda: self.client.chat.completions.create(**params))
        completion = self._completion(reply)
        self.usage.record(Usage.of(completion))
        return completion

    def judge(self, messages: Messages) -> bool:
        """The yes/no at the start of the (short) reply."""
        text = self.complete(messages, JUDGE_MAX_TOKENS).text
        try:
            return parse_yes_no(text)
        except ValueError as exc:
            raise ExplainerError(str(exc)) from exc

    def _completion(self, reply: Any) -> Completion:
        if not reply.choices:
            raise ExplainerError(f"the server answered without a choice: {reply!r:.200}")
        text = reply.choices[0].message.content or ""
        usage = reply.usage
        tokens_in = int(getattr(usage, "prompt_tokens", 0) or 0)
        tokens_out = int(getattr(usage, "completion_tokens", 0) or 0)
        price_in, price_out = self.price_per_mtok
        return Completion(text, tokens_in, tokens_out,
                          (tokens_in * price_in + tokens_out * price_out) / 1e6)


def classify(exc: Exception) -> tuple[bool, ExplainerError]:
    """(worth retrying?, the error to report) for an ``openai`` SDK exception."""
    if isinstance(exc, openai.APIConnectionError):
        return True, ExplainerError(f"cannot reach the OpenAI-compatible server: {exc}")
    if not isinstance(exc, openai.APIStatusError):
        return False, ExplainerError(f"OpenAI-compatible server: {exc}")
    status, code, message = exc.status_code, *_error_fields(exc.body)
    text = f"OpenAI-compatible server error {status} ({code}): {message}"
    if status == 401:
        return False, ExplainerError(f"authentication failed (401): check "
                                     f"SAELAB_OPENAI_API_KEY: {message}", fatal=True,
                                     status=status)
    if status in (402, 403) or code == "insufficient_quota":
        return False, ExplainerError(f"the account cannot pay or may not call this model "
                                     f"({status}): {message}", fatal=True, status=status)
    if status == 404:
        return False, ExplainerError(f"{text} (is the model name right?)", fatal=True,
                                     status=status)
    retryable = status in _RETRY_STATUSES or status >= 500
    return retryable, ExplainerError(text, status=status)


def _error_fields(body: object) -> tuple[str, str]:
    """(error code or type, message) of an error body ``{"error": {...}}`` (servers vary)."""
    error = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(error, str):
        return "error", error
    if not isinstance(error, dict):
        return "unknown", str(body or "")
    code = error.get("code") or error.get("type") or "unknown"
    return str(code), str(error.get("message", ""))
