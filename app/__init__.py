"""saelab's application layer, outermost first (an import-linter contract keeps it so):

* ``cli`` — the ``saelab`` command line, and ``bench`` — its benchmarks of the store, jobs
  and explorer (both may import ``worker``);
* ``web`` — the explorer (FastAPI app factory, pages, JSON API, inference engine);
* ``jobs`` — the job lifecycle (submit, claim, cancel, reap) on the store;
* ``queue`` — the Celery app factory and ``send_job`` (what the web and workers share);
* ``store`` — the SQL store; ``settings`` — the one settings class.

Nothing here but ``cli`` and ``bench`` imports ``worker``.
"""
