"""Each latent's examples as one packed binary value (the ``latent_examples`` table).

An analysis keeps about 70 example windows per latent. Stored one row per window, a
16,384-latent SAE wrote 1.15M rows of JSON text (37 s on SQLite, 39 s on PostgreSQL even
with the rows built in bulk); packed, it writes 16,384 rows of a few tens of kB, built with
a handful of numpy calls per latent. A feature page reads one row and decodes only the
examples it shows.

Layout (little-endian), version 1::

    header  "<4sIIIBBBx": magic b"SLX1", n examples, total tokens, n strings, the bytes
            of a token index and of a string end (2 or 4), and 1 if values are sparse
    meta    int32 [n, 5]: bucket (-1: a top example), rank, context_index, position, length
    tokens  uint16 or uint32 [total]: each token's index into the latent's string table
    values  dense: float32 [total], the latent's activation on each token; sparse (when
            smaller; most tokens of a window around a sparse latent's peak are zero): a
            bit per token (numpy ``packbits``, set where nonzero), then float32 [nonzero]
    ends    uint16 or uint32 [n strings]: where each string ends in the text, in characters
    text    UTF-8: the distinct token strings of the latent's examples, concatenated

Examples keep the order they were packed in (an analysis packs the top examples by rank,
then the quantile buckets from the lowest, by rank). Activations come back rounded to 4
decimals, as the explorer has always shown them.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"SLX1"
HEADER = struct.Struct("<4sIIIBBBx")
META_COLUMNS = 5
DECIMALS = 4
LATENTS_PER_CHUNK = 512
"""Latents whose windows are flattened at once (bounds the temporary arrays)."""


class PackError(ValueError):
    """Bytes that are not a packed example set."""


@dataclass(frozen=True, slots=True)
class StoredExample:
    """One example window as the explorer reads it."""

    kind: str
    """``top`` or ``quantile``."""
    bucket: int | None
    """Quantile bucket (0 = lowest) of a ``quantile`` example."""
    rank: int
    tokens: list[str]
    activations: list[float]
    context_index: int
    position: int


def pack_records(examples: Sequence[Any]) -> bytes:
    """Pack examples given as objects with ``StoredExample``'s attributes (tokens as
    strings), in their order."""
    for ex in examples:
        if len(ex.tokens) != len(ex.activations):
            raise PackError(f"an example has {len(ex.tokens)} tokens but "
                            f"{len(ex.activations)} activations")
    strings: dict[str, int] = {}
    index = [strings.setdefault(token, len(strings)) for ex in examples for token in ex.tokens]
    values = [float(v) for ex in examples for v in ex.activations]
    try:
        meta = np.array([[-1 if ex.kind == "top" else int(ex.bucket or 0), int(ex.rank),
                          int(ex.context_index), int(ex.position), len(ex.tokens)]
                         for ex in examples], dtype=np.int32).reshape(-1, META_COLUMNS)
    except OverflowError as exc:
        raise PackError("an example's bucket, rank, context index or position is past "
                        "32 bits") from exc
    texts = list(strings)
    ends = np.cumsum([len(t) for t in texts], dtype=np.int64)
    return _assemble(meta, np.asarray(index, dtype=np.int64),
                     np.asarray(values, dtype=np.float32), ends, "".join(texts))


def pack_example_set(examples: Any, token_text: dict[int, str]
                     ) -> Iterator[tuple[int, int, bytes]]:
    """(latent index, example count, packed bytes) for every latent with examples in
    ``examples`` (a ``training.analysis.examples.ExampleSet``, sorted by latent; windows
    padded with token −1 outside their context, which is dropped)."""
    if not len(examples):
        return
    texts, lengths = _token_table(token_text, examples.tokens)
    latent = examples.latent.numpy()
    starts = np.flatnonzero(np.r_[True, latent[1:] != latent[:-1]])
    bounds = np.r_[starts, len(latent)]
    for first in range(0, len(starts), LATENTS_PER_CHUNK):
        group = bounds[first:first + LATENTS_PER_CHUNK + 1]
        yield from _pack_chunk(examples, latent, group, texts, lengths)


def _pack_chunk(examples: Any, latent: np.ndarray, bounds: np.ndarray, texts: np.ndarray,
                lengths: np.ndarray) -> Iterator[tuple[int, int, bytes]]:
    """Pack the latents whose rows ``bounds`` delimits, from one flattening of their
    windows."""
    rows = slice(int(bounds[0]), int(bounds[-1]))
    tokens = examples.tokens[rows].numpy()
    inside = tokens >= 0
    flat_tokens = tokens[inside]
    flat_values = examples.activations[rows].numpy()[inside].astype(np.float32)
    window = inside.sum(1)
    offsets = np.r_[0, np.cumsum(window)]
    meta = np.stack([examples.bucket[rows].numpy(), examples.rank[rows].numpy(),
                     examples.context[rows].numpy(), examples.position[rows].numpy(),
                     window], axis=1).astype(np.int32)
    base = int(bounds[0])
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        lo, hi = lo - base, hi - base
        span = slice(int(offsets[lo]), int(offsets[hi]))
        distinct, index = np.unique(flat_tokens[span], return_inverse=True)
        ends = np.cumsum(lengths[distinct + 1], dtype=np.int64)
        yield (int(latent[base + lo]), hi - lo,
               _assemble(meta[lo:hi], index, flat_values[span], ends,
                         "".join(texts[distinct + 1].tolist())))


def _token_table(token_text: dict[int, str], tokens: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each token id's text and its length in characters, shifted by one (index 0 is the
    padding id −1)."""
    top = max(int(tokens.max()) if tokens.numel() else 0, max(token_text, default=0))
    texts = np.full(top + 2, "", dtype=object)
    for token_id, text in token_text.items():
        texts[token_id + 1] = text
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    return texts, lengths


def _assemble(meta: np.ndarray, index: np.ndarray, values: np.ndarray, ends: np.ndarray,
              text: str) -> bytes:
    index_bytes = 2 if len(ends) <= 0xFFFF else 4
    end_bytes = 2 if (ends[-1] if len(ends) else 0) <= 0xFFFF else 4
    nonzero = values != 0
    sparse = int(len(values) // 8 + 1 + 4 * int(nonzero.sum()) < 4 * len(values))
    value_bytes = (np.packbits(nonzero).tobytes() + values[nonzero].astype("<f4").tobytes()
                   if sparse else values.astype("<f4").tobytes())
    return b"".join((
        HEADER.pack(MAGIC, len(meta), len(index), len(ends), index_bytes, end_bytes, sparse),
        meta.astype("<i4").tobytes(), index.astype(f"<u{index_bytes}").tobytes(),
        value_bytes, ends.astype(f"<u{end_bytes}").tobytes(),
        text.encode("utf-8", "surrogatepass")))


class ExamplePack:
    """A packed example set, decoded lazily: the header and the per-example columns are
    views into the bytes; tokens and activations are built only for the examples asked
    for."""

    __slots__ = ("_data", "_ends", "_index", "_meta", "_offsets", "_starts", "_text",
                 "_text_at", "_values")

    def __init__(self, data: bytes | memoryview | None) -> None:
        data = bytes(data) if data is not None else HEADER.pack(MAGIC, 0, 0, 0, 2, 2, 0)
        if len(data) < HEADER.size:
            raise PackError("a packed example set is shorter than its header")
        magic, n, total, n_strings, index_bytes, end_bytes, sparse = HEADER.unpack_from(data)
        if magic != MAGIC or index_bytes not in (2, 4) or end_bytes not in (2, 4):
            raise PackError(f"not a packed example set (magic {magic!r})")
        try:
            self._read(data, n, total, n_strings, index_bytes, end_bytes, sparse)
        except ValueError as exc:  # numpy: the bytes end before the header says
            raise PackError(f"a packed example set is truncated: {exc}") from exc

    def _read(self, data: bytes, n: int, total: int, n_strings: int, index_bytes: int,
              end_bytes: int, sparse: int) -> None:
        at = HEADER.size
        self._meta = np.frombuffer(data, "<i4", n * META_COLUMNS, at).reshape(n, META_COLUMNS)
        at += self._meta.nbytes
        self._index = np.frombuffer(data, f"<u{index_bytes}", total, at)
        at += self._index.nbytes
        if sparse:
            nonzero = np.unpackbits(np.frombuffer(data, np.uint8, (total + 7) // 8, at),
                                    count=total).astype(bool)
            at += (total + 7) // 8
            self._values = np.zeros(total, dtype=np.float32)
            self._values[nonzero] = np.frombuffer(data, "<f4", int(nonzero.sum()), at)
            at += 4 * int(nonzero.sum())
        else:
            self._values = np.frombuffer(data, "<f4", total, at)
            at += self._values.nbytes
        self._ends = np.frombuffer(data, f"<u{end_bytes}", n_strings, at).astype(np.int64)
        self._starts = np.r_[0, self._ends[:-1]]
        self._text_at = at + n_strings * end_bytes
        self._data = data
        self._text: str | None = None
        self._offsets = np.r_[0, np.cumsum(self._meta[:, 4], dtype=np.int64)]

    def __len__(self) -> int:
        return len(self._meta)

    def bucket_counts(self) -> dict[int, int]:
        """Quantile samples per bucket."""
        buckets = self._meta[:, 0]
        return dict(Counter(buckets[buckets >= 0].tolist()))

    def examples(self, *, top: bool = True, buckets: Sequence[int] | None = None
                 ) -> list[StoredExample]:
        """The top examples (unless ``top`` is False), then the quantile samples of
        ``buckets`` (every bucket when None), in packed order."""
        wanted = self._meta[:, 0] >= 0 if buckets is None else np.isin(
            self._meta[:, 0], np.asarray(list(buckets), dtype=np.int32))
        if top:
            wanted = wanted | (self._meta[:, 0] < 0)
        return [self._example(row) for row in np.flatnonzero(wanted).tolist()]

    def first_top(self) -> StoredExample | None:
        """The strongest top example (rank 0), if any."""
        rows = np.flatnonzero((self._meta[:, 0] < 0) & (self._meta[:, 1] == 0))
        return self._example(int(rows[0])) if len(rows) else None

    def _example(self, row: int) -> StoredExample:
        bucket, rank, context, position, _ = self._meta[row].tolist()
        span = slice(int(self._offsets[row]), int(self._offsets[row + 1]))
        index = self._index[span]
        starts, ends = self._starts[index].tolist(), self._ends[index].tolist()
        text = self._decoded_text()
        values = np.round(self._values[span].astype(np.float64), DECIMALS).tolist()
        return StoredExample("top" if bucket < 0 else "quantile", None if bucket < 0 else bucket,
                             rank, [text[a:b] for a, b in zip(starts, ends, strict=True)],
                             values, context, position)

    def _decoded_text(self) -> str:
        if self._text is None:
            self._text = self._data[self._text_at:].decode("utf-8", "surrogatepass")
        return self._text
