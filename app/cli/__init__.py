"""The ``saelab`` command line, the outermost layer: thin commands that parse flags and call
``training``, the store, the jobs API or the web app; it also starts workers, runs jobs
inline (``--now``) and serves the explorer, so it may import ``worker``.

One module per command group, all registering on ``common.app``: ``train`` (capture, train,
eval), ``store`` (analyze, saes, features, feature, export, import), ``db``, ``jobs`` (and
``worker``), ``explain``, ``web`` (serve), ``demo``, ``bench`` and ``bench_training`` (both
on ``common.bench_app``). They import ``common`` and
never each other. Every failure a user can cause ends as one line ``error: …`` naming the
flag or the problem, exit status 2, and no partial output (the engine writes atomically).
"""

from __future__ import annotations

import logging

from app.cli import (  # noqa: F401 (register their commands)
    bench,
    bench_training,
    db,
    demo,
    explain,
    jobs,
    store,
    train,
    web,
)
from app.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    app()
