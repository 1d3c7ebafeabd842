"""Retrying an API call the way every LLM explainer does: exponential backoff with jitter,
at least as long as a ``retry-after`` header asks, on the errors a classifier calls
transient; ``ExplainerError`` once it gives up or at once for errors retrying cannot fix."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from training.autointerp.protocol import ExplainerError

log = logging.getLogger(__name__)
T = TypeVar("T")

Classifier = Callable[[Exception], tuple[bool, ExplainerError]]
"""An SDK exception -> (worth retrying?, the error to report)."""


@dataclass(frozen=True)
class Retrier:
    """Retries calls that raise ``errors`` (the SDK's base exception class)."""

    errors: type[Exception] | tuple[type[Exception], ...]
    classify: Classifier
    max_retries: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    service: str = "the API"

    def __call__(self, call: Callable[[], T], *,
                 not_applied: Callable[[Exception], bool] | None = None) -> T:
        """``call()``, retried on transient errors. With ``not_applied`` (for a call that
        is not idempotent) an error is retried only when it says the request surely did not
        take effect, so a retry cannot act (and bill) twice."""
        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except self.errors as exc:
                retryable, error = self.classify(exc)
                if not_applied is not None:
                    retryable = not_applied(exc)
                if not retryable:
                    raise error from exc
                if attempt == self.max_retries:
                    raise ExplainerError(f"{error} (gave up after {attempt + 1} attempts)",
                                         status=error.status) from exc
                delay = self.delay(attempt, retry_after(exc))
                log.info("%s: %s; retrying in %.1f s", self.service, error, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def delay(self, attempt: int, asked: float | None) -> float:
        backoff = self.backoff_s * 2**attempt * (1 + 0.25 * random.random())
        return min(self.max_backoff_s, max(backoff, asked or 0.0))


def retry_after(exc: Exception) -> float | None:
    """Seconds a ``retry-after-ms`` / ``retry-after`` header asks to wait, if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, TypeError, ValueError):
            continue
    return None
