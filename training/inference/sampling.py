"""Token-by-token decoding of one prompt in several batch rows, streamed as text.

Decisions:
* Every row decodes the same prompt, so the rows have the same length: no padding and no
  attention mask; the KV cache (``past_key_values``) makes each step one token per row.
* Each row samples with its own ``torch.Generator`` seeded with the same seed, so rows
  that see identical logits produce identical text. This is what makes a baseline row and
  a steered row comparable: any difference comes from the steering, not from the dice.
* An optional edit of block L's output is hooked around each forward call only (never
  across a ``yield``), so a suspended stream leaves the model unhooked for other callers.
  It is told which positions it may change: not position 0 (BOS, the attention sink) and
  not the tokenizer's special tokens (the chat template's markers), unless
  ``Sampling.steer_special``.
* Text is streamed by decoding all of a row's ids and emitting the new suffix; a suffix
  ending in U+FFFD (an incomplete UTF-8 sequence cut by a byte-level token) is held back
  until the next token completes it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from training.data.hooks import edit_site
from training.data.models import LoadedModel

MAX_NEW_TOKENS = 512
REPLACEMENT_CHAR = "\ufffd"
# End-of-turn markers of common chat templates (ChatML, Llama 3, Phi-3, Gemma).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

Edit = Callable[..., Tensor]
"""(h [R, t, d], steerable [R, t] bool or None: every position, source [R, t, d] or None:
what the SAE reads there) -> h'. h is block L's output, or its MLP's output when the edit's
``site`` attribute is ``mlp`` (a transcoder's edit; source is then the MLP's input)."""


def edit_at(edit: Edit, site: str) -> Edit:
    """``edit`` marked with the site it edits (``resid`` or ``mlp``)."""
    edit.site = site  # type: ignore[attr-defined]
    return edit


@dataclass(frozen=True)
class Sampling:
    """How replies are sampled."""

    temperature: float = 0.7
    """Softmax temperature; 0 means greedy (argmax) decoding."""
    max_tokens: int = 128
    """New tokens per reply at most (1..512); EOS ends a reply earlier."""
    seed: int = 0
    """Seed of every row's generator (rows with equal logits then sample equal tokens)."""
    top_p: float = 0.95
    """Nucleus sampling: keep the most likely tokens whose mass reaches top_p, in (0, 1]."""
    steer_special: bool = False
    """Let an edit change position 0 and special tokens too (they are left alone by
    default: the SAE never saw them)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the row already produced it (as in
    OpenAI's API), in [-2, 2]."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0 or math.isinf(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0 (got {self.temperature})")
        if not 1 <= self.max_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_tokens must be between 1 and {MAX_NEW_TOKENS} "
                             f"(got {self.max_tokens})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2] (got "
                             f"{self.frequency_penalty})")


class IncrementalText:
    """Streams the text of a growing id sequence as the suffixes it gains."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, token: int) -> str:
        """Add one id; the new text, or "" while it ends in an incomplete character."""
        self.ids.append(token)
        text = self._text()
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._take(text)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character shows as U+FFFD)."""
        return self._take(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def _take(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece


def stop_token_ids(lm: LoadedModel) -> frozenset[int]:
    """Ids that end a reply: EOS of the tokenizer, model config and generation config, plus
    the chat template's end-of-turn token when it is a separate token (e.g. Llama 3's
    ``<|eot_id|>``)."""
    tokenizer = lm.tokenizer
    sources = [getattr(tokenizer, "eos_token_id", None),
               getattr(lm.model.config, "eos_token_id", None),
               getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)]
    template = str(getattr(tokenizer, "chat_template", None) or "")
    unknown = getattr(tokenizer, "unk_token_id", None)
    for marker in END_OF_TURN_MARKERS:
        if marker in template:
            token = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token, int) and token != unknown:
                sources.append(token)
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(token) for token in source)
    return frozenset(ids)


def decode_rows(lm: LoadedModel, prompt_ids: list[int], rows: int, sampling: Sampling, *,
                layer: int | None = None, edit: Edit | None = None,
                ignore_eos: bool = False, counts: list[int] | None = None
                ) -> Iterator[tuple[int, str]]:
    """Decode ``rows`` replies to ``prompt_ids`` as one batch; yields (row, text piece).

    ``edit`` maps block ``layer``'s output h [rows, T, d] to h' on every forward call
    (restricting it to some rows is the edit's business). A row stops at a stop token
    (unless ``ignore_eos``, which benchmarks use to get a fixed length) or after
    ``sampling.max_tokens`` tokens; the batch runs on, silently, until every row stopped.
    ``counts`` (a list of ``rows`` zeros) receives each row's number of new tokens. Bad
    arguments raise ValueError here, before the first token is asked for.
    """
    _check_args(lm, prompt_ids, sampling, layer, edit)
    stops = frozenset() if ignore_eos else stop_token_ids(lm)
    return _decode(lm, prompt_ids, rows, sampling, layer, edit, stops, counts)


def decode_ids(lm: LoadedModel, prompt_ids: list[int], rows: int, sampling: Sampling, *,
               layer: int | None = None, edit: Edit | None = None) -> list[list[int]]:
    """The new token ids of each of ``rows`` replies (stop tokens excluded): what
    ``decode_rows`` streams as text, for callers that read the replies back."""
    _check_args(lm, prompt_ids, sampling, layer, edit)
    out: list[list[int]] = [[] for _ in range(rows)]
    for tokens, fresh, _ in _steps(lm, prompt_ids, rows, sampling, layer, edit,
                                   stop_token_ids(lm)):
        for row in fresh:
            out[row].append(tokens[row])
    return out


def decode_rows_with_top(lm: LoadedModel, prompt_ids: list[int], rows: int,
                         sampling: Sampling, *, layer: int | None = None,
                         edit: Edit | None = None, top: int = 5
                         ) -> Iterator[tuple[int, str, list[tuple[str, float]]]]:
    """``decode_rows`` that also gives, with each piece, the ``top`` most likely next
    tokens of the step that made it and their log-probabilities (the distribution it was
    sampled from before temperature and top-p: the model's own view, frequency penalty
    included). A piece that completes several tokens (a split UTF-8 character) carries the
    alternatives of its last token."""
    if not 1 <= top <= 20:
        raise ValueError(f"top must be between 1 and 20 (got {top})")
    _check_args(lm, prompt_ids, sampling, layer, edit)
    return _decode(lm, prompt_ids, rows, sampling, layer, edit, stop_token_ids(lm), None, top)


def _decode(lm: LoadedModel, prompt_ids: list[int], rows: int, sampling: Sampling,
            layer: int | None, edit: Edit | None, stops: frozenset[int],
            counts: list[int] | None = None, top: int = 0) -> Iterator[tuple]:
    """(row, piece) — or (row, piece, top alternatives) when ``top`` — per new text."""
    texts = [IncrementalText(lm.tokenizer) for _ in range(rows)]
    live = [True] * rows
    steps = _steps(lm, prompt_ids, rows, sampling, layer, edit, stops, top)
    for step, (tokens, fresh, alternatives) in enumerate(steps):
        last = step == sampling.max_tokens - 1
        for row, token in enumerate(tokens):
            if not live[row]:
                continue
            stopped = row not in fresh
            if not stopped and counts is not None:
                counts[row] += 1
            piece = "" if stopped else texts[row].push(token)
            if stopped or last:
                piece += texts[row].flush()
                live[row] = False
            if piece and top:
                yield row, piece, _named(lm, alternatives, row)
            elif piece:
                yield row, piece


def _named(lm: LoadedModel, alternatives, row: int) -> list[tuple[str, float]]:
    values, ids = alternatives
    return [(lm.tokenizer.decode([i]), round(v, 4))
            for i, v in zip(ids[row].tolist(), values[row].tolist(), strict=True)]


@torch.inference_mode()
def _steps(lm: LoadedModel, prompt_ids: list[int], rows: int, sampling: Sampling,
           layer: int | None, edit: Edit | None, stops: frozenset[int], top: int = 0
           ) -> Iterator[tuple[list[int], set[int], tuple[Tensor, Tensor] | None]]:
    """Per decoding step: every row's sampled token, the rows for which it is a new reply
    token (the row was live and the token is not a stop token) and, with ``top``, each
    row's ``top`` most likely tokens (log-probabilities [R, top], ids [R, top]). Ends when
    every row has stopped or after ``sampling.max_tokens`` steps."""
    generators = [_generator(lm.device, sampling.seed) for _ in range(rows)]
    live = set(range(rows))
    inputs = torch.tensor([prompt_ids] * rows, device=lm.device)
    call = _call_style(lm.model)
    special = torch.tensor(sorted(special_token_ids(lm)), dtype=torch.long, device=lm.device)
    cache = None
    seen = None
    for step in range(sampling.max_tokens):
        steerable = None if sampling.steer_special else _steerable(inputs, special, step == 0)
        logits, cache = _forward(lm, call, inputs, cache, layer, edit, steerable)
        if sampling.frequency_penalty:
            seen = torch.zeros_like(logits) if seen is None else seen
            logits = logits - sampling.frequency_penalty * seen
        tokens = _next_tokens(logits, sampling, generators)
        if seen is not None:
            seen[torch.arange(rows), torch.tensor(tokens, device=seen.device)] += 1
        fresh = {row for row in live if tokens[row] not in stops}
        alternatives = None
        if top:
            best = torch.log_softmax(logits, dim=-1).topk(top, dim=-1)
            alternatives = (best.values.cpu(), best.indices.cpu())
        yield tokens, fresh, alternatives
        live = fresh
        if not live:
            return
        inputs = torch.tensor(tokens, device=lm.device).unsqueeze(1)


def _check_args(lm: LoadedModel, prompt_ids: list[int], sampling: Sampling,
                layer: int | None, edit: Edit | None) -> None:
    _check_prompt(lm, prompt_ids, sampling)
    if edit is not None:
        if layer is None:
            raise ValueError("an edit needs the layer whose output it edits")
        lm.check_layer(layer)


def _check_prompt(lm: LoadedModel, prompt_ids: list[int], sampling: Sampling) -> None:
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if limit is not None and len(prompt_ids) + sampling.max_tokens > limit:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus max_tokens "
                         f"{sampling.max_tokens} exceeds {lm.name}'s {limit} positions")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass(frozen=True)
class _CallStyle:
    """How this model's forward takes the KV cache and whether it can skip the LM head on
    all but the last position (no [R, T, V] prefill logits, which reach gigabytes for long
    prompts and 128k vocabularies)."""

    cache_name: str
    keeps_logits: bool


def _call_style(model: torch.nn.Module) -> _CallStyle:
    """transformers ≥ 5.24 names the cache argument ``cache`` (``past_key_values`` is
    deprecated there); earlier versions only know ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return _CallStyle("cache" if "cache" in params else "past_key_values",
                      "logits_to_keep" in params)


def special_token_ids(lm: LoadedModel) -> frozenset[int]:
    """The tokenizer's special tokens (BOS, EOS, the chat template's markers such as
    ``<|im_start|>`` or Llama 3's ``<|start_header_id|>`` and ``<|eot_id|>``).

    ``all_special_ids`` alone misses Llama 3's chat markers: its tokenizer flags them
    special in ``added_tokens_decoder`` without listing them as additional special tokens,
    so ``all_special_ids`` holds only BOS, EOS and padding there."""
    tokenizer = lm.tokenizer
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, token in added.items() if getattr(token, "special", False))
    return frozenset(ids)


def _steerable(inputs: Tensor, special: Tensor, prefill: bool) -> Tensor:
    """[R, t]: positions an edit may change (not a special token, not position 0)."""
    mask = ~torch.isin(inputs, special)
    if prefill:
        mask[:, 0] = False
    return mask


def _forward(lm: LoadedModel, call: _CallStyle, inputs: Tensor, cache, layer: int | None,
             edit: Edit | None, steerable: Tensor | None = None) -> tuple[Tensor, object]:
    """One cached forward step: inputs [R, t] -> last-position logits [R, V] (fp32), cache."""
    site = getattr(edit, "site", "resid")
    hooked = nullcontext() if edit is None else edit_site(
        lm.blocks, layer, site, (lambda h, source: edit(h, steerable, source))
        if site == "mlp" else (lambda h, _source: edit(h, steerable)))
    kwargs = {call.cache_name: cache, "use_cache": True}
    if call.keeps_logits:
        kwargs["logits_to_keep"] = 1
    with hooked:
        out = lm.model(input_ids=inputs, **kwargs)
    return out.logits[:, -1].float(), out[call.cache_name]


def _next_tokens(logits: Tensor, sampling: Sampling,
                 generators: list[torch.Generator]) -> list[int]:
    """Sample one token per row from logits [R, V]; each row uses its own generator."""
    if sampling.temperature == 0:
        return logits.argmax(-1).tolist()
    probs = _nucleus(torch.softmax(logits / sampling.temperature, dim=-1), sampling.top_p)
    picks = [torch.multinomial(probs[row], 1, generator=generator)
             for row, generator in enumerate(generators)]
    return torch.cat(picks).tolist()


def _nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Zero all but the most likely tokens whose mass first reaches ``top_p``: [R, V]."""
    if top_p >= 1:
        return probs
    ordered, order = probs.sort(dim=-1, descending=True)
    ordered[ordered.cumsum(-1) - ordered >= top_p] = 0
    return torch.zeros_like(probs).scatter_(-1, order, ordered)
