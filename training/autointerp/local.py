"""The local explainer: ``LocalExplainer`` runs the model the lab already has loaded, so
explanations work offline and cost nothing. Decisions:
* Prompts go through the model's chat template as one user turn: system messages are
  folded into it, because small chat models (and templates without a system role) follow
  a single instruction block better, and ``chat_prompt_ids`` is the one place that knows
  the template.
* Labels are decoded greedily (temperature 0), so a re-run gives the same label.
* ``judge`` does not parse generated text: it compares the next-token log-probability of
  the answer starting with "yes" against "no" (summed over spellings such as " yes",
  "Yes"). A 135M model rarely keeps to an answer format, but its preference between the
  two words is still there.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cached_property

import torch

from training.autointerp.protocol import (
    Completion,
    ExplainerError,
    Messages,
    Usage,
    UsageMeter,
)
from training.data.models import LoadedModel
from training.inference.sampling import MAX_NEW_TOKENS, Sampling, decode_rows
from training.inference.steering import chat_prompt_ids

YES_SPELLINGS = ("yes", "Yes", " yes", " Yes", "YES")
NO_SPELLINGS = ("no", "No", " no", " No", "NO")


class LocalExplainer:
    """Explains and judges with a local chat model (``training.data.models.LoadedModel``).

    One call at a time (``concurrency = 1``): the model is shared and runs its own threads.
    """

    name = "local"
    concurrency = 1

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.model = lm.name
        self.usage = UsageMeter()

    def prompt_ids(self, messages: Messages) -> list[int]:
        """The chat-template ids of ``messages`` folded into one user turn."""
        roles = {m["role"] for m in messages}
        if not roles <= {"system", "user"}:
            raise ValueError(f"a local prompt takes system and user messages, got {roles}")
        return chat_prompt_ids(self.lm, "\n\n".join(m["content"] for m in messages))

    def complete(self, messages: Messages, max_tokens: int) -> Completion:
        """The greedy reply to ``messages`` (at most ``max_tokens`` new tokens)."""
        ids = self.prompt_ids(messages)
        sampling = Sampling(temperature=0.0, max_tokens=min(max_tokens, MAX_NEW_TOKENS))
        try:
            text = "".join(piece for _, piece in decode_rows(self.lm, ids, 1, sampling))
        except ValueError as exc:  # e.g. a prompt longer than the model's context
            raise ExplainerError(f"{self.lm.name}: {exc}") from exc
        produced = len(self.lm.tokenizer.encode(text, add_special_tokens=False))
        completion = Completion(text, len(ids), produced)
        self.usage.record(Usage.of(completion))
        return completion

    def judge(self, messages: Messages) -> bool:
        """True when the reply is more likely to start with "yes" than with "no"."""
        return self.yes_margin(messages) > 0

    def yes_margin(self, messages: Messages) -> float:
        """log P(answer starts with yes) − log P(… with no), from one forward pass."""
        ids = self.prompt_ids(messages)
        limit = getattr(self.lm.model.config, "max_position_embeddings", None)
        if limit is not None and len(ids) > limit:
            raise ExplainerError(f"{self.lm.name}: the prompt ({len(ids)} tokens) exceeds "
                                 f"its {limit} positions")
        logprobs = self._next_token_logprobs(ids)
        self.usage.record(Usage(1, len(ids), 0, 0.0))
        yes = torch.logsumexp(logprobs[self._answer_ids[0]], 0)
        no = torch.logsumexp(logprobs[self._answer_ids[1]], 0)
        return float(yes - no)

    @torch.inference_mode()
    def _next_token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-softmax of the logits after ``ids``: [V] (fp32)."""
        kwargs = {"logits_to_keep": 1} if self._keeps_logits else {}
        inputs = torch.tensor([ids], device=self.lm.device)
        logits = self.lm.model(input_ids=inputs, use_cache=False, **kwargs).logits[0, -1]
        return torch.log_softmax(logits.float(), -1)

    @cached_property
    def _keeps_logits(self) -> bool:
        """Whether the forward can skip the LM head on all but the last position."""
        return "logits_to_keep" in inspect.signature(self.lm.model.forward).parameters

    @cached_property
    def _answer_ids(self) -> tuple[list[int], list[int]]:
        """First-token ids of the yes and the no spellings (deduplicated)."""
        return (_first_tokens(self.lm.tokenizer, YES_SPELLINGS),
                _first_tokens(self.lm.tokenizer, NO_SPELLINGS))


def _first_tokens(tokenizer, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings that are one token; the first token of each spelling when none
    is (a tokenizer that splits "yes" into pieces)."""
    encoded = [tokenizer.encode(s, add_special_tokens=False) for s in spellings]
    single = [e[0] for e in encoded if len(e) == 1]
    ids = single or [e[0] for e in encoded if e]
    if not ids:
        raise ExplainerError(f"the tokenizer cannot encode {spellings[0]!r}")
    return sorted({int(i) for i in ids})
