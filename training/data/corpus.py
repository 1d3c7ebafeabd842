"""Text sources and packing them into fixed-length token contexts.

Design decisions:

* **One entry point for text.** ``iter_texts(dataset)`` accepts ``"embedded"``, a local file
  or directory, or an HF ``datasets`` name (streamed, optional ``"name:config"``). Every
  source yields plain ``str`` documents in a deterministic order; nothing is shuffled here.
* **Fail loudly, with the dataset named.** Every problem a user can cause (missing path,
  unsupported extension, missing text column, nothing to read, an HF name that cannot be
  loaded) raises :class:`CorpusError` with a one-line message. Path problems are checked
  when ``iter_texts`` is called; content problems lazily, but always before the iterator
  would end empty — an empty source never silently yields zero documents.
* **Local files.** ``.txt``: a file is one document (files over ~1 MiB are cut at blank
  lines into ~1 MiB documents, so memory stays bounded). ``.jsonl``: one JSON object per
  line, the document is ``record[text_column]`` (``null`` values are skipped). ``.parquet``:
  the ``text_column`` column, read in record batches. A directory means every file of those
  kinds below it (recursively, hidden entries skipped), in sorted relative-path order.
  Empty / whitespace-only documents are skipped everywhere.
* **A path or a hub name?** An existing path is always local. A missing spec is treated
  as a (missing) local path when it looks like one — it starts with ``/``, ``./``, ``../``
  or ``~``, or ends in a data-file extension — and as an HF name otherwise.

The embedded corpus is in :mod:`training.data.embedded`; packing texts into contexts in
:mod:`training.data.packing`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

from training.data.embedded import embedded_texts

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = "embedded"

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Suffixes that make a missing spec read as a mistyped local path rather than a hub name.
_PATHLIKE_SUFFIXES = {*SUPPORTED_SUFFIXES, ".json", ".csv", ".tsv", ".arrow", ".gz", ".zst"}
_TXT_CHUNK_CHARS = 1 << 20


class CorpusError(ValueError):
    """A dataset that cannot be read as text; the one-line message names the dataset."""


# --------------------------------------------------------------------------- public API


def iter_texts(dataset: str, *, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Yield the documents of ``dataset`` in a deterministic order.

    ``dataset`` is ``"embedded"``, a local ``.txt`` / ``.jsonl`` / ``.parquet`` file or a
    directory of such files, or else an HF ``datasets`` name (``"name"`` or
    ``"name:config"``) streamed with ``split``. Raises :class:`CorpusError` for a missing
    path, an unsupported extension, a missing text column, or a dataset with no text.
    """
    if dataset == EMBEDDED_CORPUS:
        texts: Iterator[str] = embedded_texts()
    elif _is_local(dataset):
        files = _local_files(dataset)
        texts = chain.from_iterable(_iter_file(f, dataset, text_column) for f in files)
    else:
        texts = _iter_hub(dataset, split, text_column)
    return _non_empty(texts, dataset)


# --------------------------------------------------------------------------- validation


def _non_empty(texts: Iterator[str], dataset: str) -> Iterator[str]:
    """Pass ``texts`` through, raising CorpusError if it turns out to hold no text at all."""
    empty = True
    for text in texts:
        if text and not text.isspace():
            empty = False
            yield text
    if empty:
        raise CorpusError(f"dataset {dataset!r} contains no text")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# --------------------------------------------------------------------------- local files


def _is_local(spec: str) -> bool:
    if Path(spec).expanduser().exists():
        return True
    if spec.startswith(("/", "./", "../", "~")):
        return True
    return Path(spec).suffix.lower() in _PATHLIKE_SUFFIXES


def _local_files(spec: str) -> list[Path]:
    """The data files behind a local spec; raises CorpusError for missing / unsupported."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"dataset {spec!r}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise CorpusError(
                f"dataset {spec!r}: unsupported file type {path.suffix or '(none)'!r} "
                f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return [path]
    files = sorted(
        (p for p in path.rglob("*") if _is_data_file(p, path)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise CorpusError(
            f"dataset {spec!r}: directory holds no {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    return files


def _is_data_file(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    return not hidden and path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES


def _iter_file(path: Path, dataset: str, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _iter_txt(path)
    if suffix == ".jsonl":
        return _iter_jsonl(path, dataset, text_column)
    return _iter_parquet(path, dataset, text_column)


def _iter_txt(path: Path) -> Iterator[str]:
    """The whole file as one document; big files are cut at blank lines into ~1 MiB pieces."""
    parts: list[str] = []
    size = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts.append(line)
            size += len(line)
            if size >= _TXT_CHUNK_CHARS and not line.strip():
                yield "".join(parts)
                parts, size = [], 0
    if parts:
        yield "".join(parts)


def _iter_jsonl(path: Path, dataset: str, text_column: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"dataset {dataset!r}: invalid JSON at {where}: {exc}") from exc
            if not isinstance(record, dict):
                raise CorpusError(f"dataset {dataset!r}: {where} is not a JSON object")
            text = _text_field(record, dataset, text_column, where)
            if text is not None:
                yield text


def _text_field(record: dict, dataset: str, text_column: str, where: str) -> str | None:
    """``record[text_column]`` checked to be a string (None for a null value)."""
    if text_column not in record:
        columns = ", ".join(map(repr, record)) or "none"
        raise CorpusError(
            f"dataset {dataset!r}: no text column {text_column!r} in {where} (columns: {columns})"
        )
    value = record[text_column]
    if value is None or isinstance(value, str):
        return value
    raise CorpusError(
        f"dataset {dataset!r}: column {text_column!r} holds {type(value).__name__}, "
        f"not text, in {where}"
    )


def _iter_parquet(path: Path, dataset: str, text_column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise CorpusError(
            f"dataset {dataset!r}: reading parquet needs pyarrow (pip install 'saelab[data]')"
        ) from exc
    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:
        raise CorpusError(
            f"dataset {dataset!r}: cannot read {path.name}: {_first_line(exc)}"
        ) from exc
    names = pfile.schema_arrow.names
    if text_column not in names:
        raise CorpusError(
            f"dataset {dataset!r}: no text column {text_column!r} in {path.name} "
            f"(columns: {', '.join(map(repr, names)) or 'none'})"
        )
    for batch in pfile.iter_batches(columns=[text_column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is None or isinstance(value, str):
                if value is not None:
                    yield value
                continue
            raise CorpusError(
                f"dataset {dataset!r}: column {text_column!r} in {path.name} holds "
                f"{type(value).__name__}, not text"
            )


# --------------------------------------------------------------------------- HF hub


def _iter_hub(dataset: str, split: str, text_column: str) -> Iterator[str]:
    """Stream ``dataset`` ("name" or "name:config") with ``datasets``; errors → CorpusError."""
    records = _hub_records(dataset, split)
    for index, record in enumerate(records):
        text = _text_field(record, dataset, text_column, f"split {split!r} record {index}")
        if text is not None:
            yield text


def _hub_records(dataset: str, split: str) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(
            f"dataset {dataset!r}: streaming from the HF hub needs the 'datasets' package "
            "(pip install 'saelab[data]')"
        ) from exc
    name, _, config = dataset.partition(":")
    try:
        stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
        records = iter(stream)
    except Exception as exc:
        raise CorpusError(
            f"cannot load dataset {dataset!r} (split {split!r}): {_first_line(exc)}"
        ) from exc
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except Exception as exc:
            raise CorpusError(f"error streaming dataset {dataset!r}: {_first_line(exc)}") from exc
        yield record
