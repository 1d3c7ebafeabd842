"""The Celery app, configured from settings, and ``send_job``: what the web, the CLI and
the workers share. It names the tasks (``worker.tasks``) by string only, so sending a job
needs no task code and ``app`` never imports ``worker``.

Production uses Redis (``SAELAB_BROKER_URL=redis://…``); the embedded default is kombu's
SQLAlchemy transport on a SQLite file under the data dir, so one machine runs real worker
processes with no broker server. Tasks never return results through Celery: a job's state,
progress and outputs live in its row of the store, so no result backend is configured.
"""

from __future__ import annotations

from pathlib import Path

from celery import Celery

from app.settings import Settings, get_settings

TASKS = ("capture", "train", "analyze", "explain", "steer_eval", "sweep", "pipeline")
"""Job kinds, each a task named ``saelab.<kind>``."""
DEFAULT_QUEUE = {kind: "gpu" for kind in TASKS}
"""Queue per kind: work that runs the model or trains goes to the accelerator queue."""


EMBEDDED_POLL_S = 0.1
"""How often a worker on the embedded broker polls its table (kombu's default is 1 s)."""


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    if settings.broker_url.startswith("sqla+sqlite:///"):  # a fresh data dir: make its home
        Path(settings.broker_url.removeprefix("sqla+sqlite:///")).expanduser().parent.mkdir(
            parents=True, exist_ok=True)
    if settings.broker_url.startswith("sqla+"):
        # kombu hands every transport option of this transport to create_engine, so the
        # polling interval can only be set on the transport class itself
        from kombu.transport.sqlalchemy import Transport

        Transport.polling_interval = EMBEDDED_POLL_S
    app = Celery("saelab", broker=settings.broker_url, include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,  # a task killed mid-way is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long jobs: never hoard messages
        task_ignore_result=True,
        task_default_queue="gpu",
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # progress bars on stderr (model loading, ...) stay in the worker's own output
        # instead of landing in job logs as "WARNING celery.redirected" lines
        worker_redirect_stdouts=False,
    )
    return app


def send_job(app: Celery, kind: str, job_id: int, queue: str | None = None) -> None:
    """Queue the task of job ``job_id`` by name (the sender needs no task code)."""
    app.send_task(f"saelab.{kind}", args=[job_id], queue=queue or DEFAULT_QUEUE[kind])
