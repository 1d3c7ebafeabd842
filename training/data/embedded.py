"""The embedded corpus: real text shipped with the Python install itself, so it works
offline with no download: CPython's help topics (``pydoc_data.topics``), the stdlib's
module/class/function docstrings (read with ``ast``, never by importing modules, which
could have side effects) and the stdlib ``.py`` sources (test suites, ``site-packages``
and files over 1 MB excluded). Prose and code are interleaved round-robin (a prose
document, then a source file, ...) so even a short prefix holds both. The order is
deterministic for a given Python install (sorted paths, sorted topic keys); a different
Python version gives a different corpus. It holds well over 2M SmolLM2 tokens.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from itertools import chain, zip_longest
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_SOURCE_BYTES = 1_000_000
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def embedded_corpus_sources() -> list[Path]:
    """The files the embedded corpus reads (help topics module and stdlib sources), sorted."""
    topics = _topics_file()
    files = _stdlib_sources()
    return sorted([*files, topics] if topics is not None else files)


def embedded_texts() -> Iterator[str]:
    """Round-robin: a prose document (topic, then per-file docstrings), then a source file."""
    files = _stdlib_sources()
    topics = _topics()
    log.info("embedded corpus: %d help topics, %d stdlib source files", len(topics), len(files))
    prose = chain(topics.values(), _docstring_documents(files))
    code = _source_documents(files)
    for pair in zip_longest(prose, code):
        yield from (text for text in pair if text)


def _topics_file() -> Path | None:
    try:
        import pydoc_data.topics as topics_module
    except ImportError:
        return None
    return Path(topics_module.__file__).resolve()


def _topics() -> dict[str, str]:
    """CPython's ``help()`` topics, sorted by key ({} if this install lacks pydoc_data)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        log.warning("pydoc_data is missing from this Python install; no help topics")
        return {}
    return {key: topics[key] for key in sorted(topics)}


def _stdlib_sources() -> list[Path]:
    """Stdlib ``.py`` files, sorted; test suites, site-packages and files > 1 MB excluded."""
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    topics = _topics_file()
    files = [
        path
        for path in root.rglob("*.py")
        if _is_corpus_source(path, root) and path.resolve() != topics
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_corpus_source(path: Path, root: Path) -> bool:
    if _EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1]):
        return False
    try:
        return path.is_file() and path.stat().st_size <= _MAX_SOURCE_BYTES
    except OSError:
        return False


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        log.debug("embedded corpus: skipping unreadable %s", path)
        return None


def _source_documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        source = _read_source(path)
        if source and source.strip():
            yield source


def _docstring_documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        source = _read_source(path)
        if not source:
            continue
        docs = _docstrings(source)
        if docs is None:
            log.debug("embedded corpus: skipping unparsable %s", path)
        elif docs:
            yield "\n\n".join(docs)


def _docstrings(source: str) -> list[str] | None:
    """Module, class and function docstrings in source order (None if it does not parse)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    nodes = sorted(
        (node for node in ast.walk(tree) if isinstance(node, _DOC_NODES)),
        key=lambda node: getattr(node, "lineno", 0),
    )
    docs = (ast.get_docstring(node) for node in nodes)
    return [doc for doc in docs if doc and doc.strip()]
