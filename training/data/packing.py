"""Packing texts into fixed-length token contexts.

Texts are tokenized in batches through the Rust ``tokenizers`` backend of a
fast tokenizer (``encode_batch``, multi-threaded, no special tokens); other tokenizers are
called the HF way. Documents are joined with EOS between them (plain concatenation if the
tokenizer has no EOS), and the stream is cut into contexts of exactly ``context`` ids:
``[bos_id] + next context-1 stream tokens``. A context therefore may start mid-document;
the trailing partial context is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any


def pack_contexts(
    texts: Iterable[str], tokenizer: Any, context: int, bos_id: int, *, batch_texts: int = 64
) -> Iterator[list[int]]:
    """Tokenize ``texts`` and cut the token stream into contexts of exactly ``context`` ids.

    Position 0 of every context is ``bos_id``; positions 1..context-1 are the next
    ``context - 1`` stream tokens. Documents are separated by the tokenizer's EOS (if it has
    one). The trailing partial context is dropped. Raises ``ValueError`` if ``context < 2``.
    """
    if context < 2:
        raise ValueError(f"context must be >= 2 (BOS plus at least one token), got {context}")
    if batch_texts < 1:
        raise ValueError(f"batch_texts must be >= 1, got {batch_texts}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stream = _token_stream(texts, _batch_encoder(tokenizer), batch_texts, eos_id)
    return _cut_contexts(stream, context - 1, int(bos_id))


def _batch_encoder(tokenizer: Any):
    """A function ``list[str] -> list[list[int]]`` encoding without special tokens.

    Uses the Rust backend's multi-threaded ``encode_batch`` when the tokenizer is a fast HF
    tokenizer whose backend has no truncation/padding configured; otherwise calls the
    tokenizer the HF way.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

        def encode_backend(batch: list[str]) -> list[list[int]]:
            return [enc.ids for enc in encode(batch, add_special_tokens=False)]

        return encode_backend

    def encode_hf(batch: list[str]) -> list[list[int]]:
        out = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)
        return list(out["input_ids"])

    return encode_hf


def _token_stream(
    texts: Iterable[str], encode, batch_texts: int, eos_id: int | None
) -> Iterator[list[int]]:
    """Chunks of the token stream: documents' ids with EOS between consecutive documents."""
    iterator = iter(texts)
    first = True
    while raw := list(islice(iterator, batch_texts)):
        batch = [text for text in raw if text]
        for ids in encode(batch) if batch else ():
            if not ids:
                continue
            if not first and eos_id is not None:
                yield [eos_id]
            first = False
            yield ids


def _cut_contexts(chunks: Iterator[list[int]], body: int, bos_id: int) -> Iterator[list[int]]:
    """``[bos_id] + body`` stream tokens per context; the trailing partial one is dropped."""
    buffer: list[int] = []
    for chunk in chunks:
        buffer.extend(chunk)
        if len(buffer) < body:
            continue
        full = len(buffer) - len(buffer) % body
        for start in range(0, full, body):
            yield [bos_id, *buffer[start : start + body]]
        del buffer[:full]
