"""The one allow-list check for every path a request can name.

A path in a job's parameters (dataset, model directory, capture, SAE, an import) is
resolved — relative to the data dir, after ``~`` and every symlink — and must then lie
inside the data dir or inside one of the roots the operator lists
(``SAELAB_ALLOWED_PATHS``). Otherwise it is refused with the field named, before anything
is stored. The resolved path is what the job keeps, so the worker reads exactly what was
checked (a relative path cannot mean something else in the worker's directory, a symlink
cannot be swapped for another target's name).

Hub ids (``org/name``) for models and datasets are not paths: a web request may name one
only when the operator enables hub access (``SAELAB_HUB_ACCESS``); the operator's own
command line always may.
"""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings

EMBEDDED_NAMES = frozenset({"embedded", "smollm2-135m"})
"""Model and dataset names that are neither paths nor hub ids."""


class PathRefused(ValueError):
    """A path outside the allowed roots, or a hub id the request may not name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


def allowed_roots(settings: Settings) -> list[Path]:
    return [settings.data_dir.expanduser().resolve(),
            *(Path(p).expanduser().resolve() for p in settings.allowed_paths)]


def checked_path(field: str, value: str, settings: Settings) -> Path:
    """``value`` resolved (relative to the data dir) if it lies inside an allowed root."""
    if "\x00" in value:
        raise PathRefused(field, "the path holds a NUL character")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = settings.data_dir.expanduser() / path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots(settings)):
        raise PathRefused(field, f"{value} is outside the data dir and the allowed roots "
                                 "(the operator can add roots with SAELAB_ALLOWED_PATHS)")
    return resolved


def looks_like_path(value: str, settings: Settings) -> bool:
    """A value meant as a path: absolute, ``~``/``.``-relative, or present under the data
    dir; anything else is a name (an embedded name or a hub id)."""
    if value.startswith(("/", "~", ".")) or "\\" in value:
        return True
    return (settings.data_dir.expanduser() / value).exists()


def checked_source(field: str, value: str, settings: Settings, *, hub: bool) -> str:
    """A model or dataset parameter: an embedded name, an allowed path (returned resolved)
    or a hub id (only when ``hub``)."""
    if value in EMBEDDED_NAMES:
        return value
    if looks_like_path(value, settings):
        return str(checked_path(field, value, settings))
    if not hub:
        raise PathRefused(field, f"{value!r} is neither an allowed path nor the embedded "
                                 "one, and hub downloads are off for web requests (the "
                                 "operator can enable them with SAELAB_HUB_ACCESS=true)")
    return value
