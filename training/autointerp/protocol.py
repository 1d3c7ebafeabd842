"""What every explainer offers the autointerp engine, and the bookkeeping they share.

An explainer is anything with ``name``, ``model``, ``concurrency``, ``complete`` and
``judge``: Claude over the API, the local instruct model, or a scripted fake in tests.
Messages are plain dicts (``{"role": "system" | "user", "content": str}``) so prompts stay
independent of any SDK.

Failures reach the engine as ``ExplainerError`` only, after the explainer's own retries:
the engine then excludes that call from a score instead of counting it as a wrong answer.
``fatal`` marks errors that every later call will hit as well (bad key, no credit), so a
caller explaining many latents can stop instead of failing each one.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

Message = dict[str, str]
Messages = list[Message]
JUDGE_MAX_TOKENS = 5
"""Reply length for a yes/no question answered in text."""


class ExplainerError(RuntimeError):
    """An explainer call that failed for good (retries exhausted or not worth retrying)."""

    def __init__(self, message: str, *, fatal: bool = False, status: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        """True when later calls cannot succeed either (authentication, credit, permission)."""
        self.status = status
        """The HTTP status behind it, when there was one."""


@dataclass(frozen=True)
class Completion:
    """One reply: its text and what it cost."""

    text: str
    input_tokens: int
    output_tokens: int
    cost_usd: float = 0.0


@dataclass(frozen=True)
class Usage:
    """Totals over calls: requests, tokens and cost in USD."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.requests + other.requests, self.input_tokens + other.input_tokens,
                     self.output_tokens + other.output_tokens, self.cost_usd + other.cost_usd)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.requests - other.requests, self.input_tokens - other.input_tokens,
                     self.output_tokens - other.output_tokens, self.cost_usd - other.cost_usd)

    def as_dict(self) -> dict[str, float | int]:
        """``{requests, input_tokens, output_tokens, cost_usd}`` (cost rounded to 1e-6)."""
        out = asdict(self)
        out["cost_usd"] = round(self.cost_usd, 6)
        return out

    @classmethod
    def of(cls, completion: Completion) -> Usage:
        return cls(1, completion.input_tokens, completion.output_tokens, completion.cost_usd)


class UsageMeter:
    """A thread-safe running total: judge calls run in worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = Usage()

    def record(self, usage: Usage) -> None:
        with self._lock:
            self._total = self._total + usage

    @property
    def total(self) -> Usage:
        with self._lock:
            return self._total


@runtime_checkable
class Explainer(Protocol):
    """Writes labels and answers yes/no questions about them."""

    name: str
    """The kind of explainer (``claude``, ``local``); part of the settings key."""
    model: str
    """The model behind it (e.g. ``claude-sonnet-4-5``, ``smollm2-135m``)."""
    concurrency: int
    """How many calls may run at once (1: strictly sequential)."""
    usage: UsageMeter
    """Every call this explainer made, added up."""

    def complete(self, messages: Messages, max_tokens: int) -> Completion:
        """The reply to ``messages``; raises ExplainerError."""
        ...

    def judge(self, messages: Messages) -> bool:
        """The yes (True) / no (False) answer to ``messages``; raises ExplainerError."""
        ...


@runtime_checkable
class BatchExplainer(Explainer, Protocol):
    """An explainer that can also answer many prompts as one deferred batch."""

    def complete_batch(self, message_lists: Sequence[Messages],
                       max_tokens: int) -> list[Completion | ExplainerError]:
        """Replies in input order; a failed request gets its ExplainerError."""
        ...


_YES = re.compile(r"^\W*(yes|y|true)\b", re.IGNORECASE)
_NO = re.compile(r"^\W*(no|n|false)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool:
    """The answer at the start of a reply ("Yes.", "**no**", "yes, because ..."); raises
    ValueError for anything else rather than guessing."""
    if _YES.match(text):
        return True
    if _NO.match(text):
        return False
    raise ValueError(f"expected yes or no, got {text[:80]!r}")
