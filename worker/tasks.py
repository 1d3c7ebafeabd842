"""Celery tasks: thin adapters from a job id to the stages.

Each task claims its job (a duplicate or stale message claims nothing and returns), runs
the kind's stages inside a ``JobRun`` (heartbeat, cancel, progress) and records the outcome:
succeeded with the job's outputs in ``result``; cancelled (everything the job wrote is
removed); failed with a message (partial stage outputs are removed, finished ones kept).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import cache

from celery import Celery
from celery.signals import worker_ready

from app.jobs import JobParams, claim, job_dir, reap, remove_artifacts, validate
from app.queue import TASKS, make_celery
from app.settings import Settings, get_settings
from app.store.db import open_store
from app.store.models import Job
from worker import stages
from worker.explain_stage import explain_stage
from worker.runtime import JobCancelled, JobRun

log = logging.getLogger(__name__)
app: Celery = make_celery()

PIPELINE = (("capture", 0.0, 0.45), ("train", 0.45, 0.4), ("analyze", 0.85, 0.15))
"""Stages of a pipeline with their share of the job's progress bar."""
EXPLAINED_PIPELINE = (("capture", 0.0, 0.35), ("train", 0.35, 0.3), ("analyze", 0.65, 0.1),
                      ("explain", 0.75, 0.25))
"""The same when the pipeline also explains latents (``explain_count``)."""


def stages_of(kind: str, params: JobParams) -> tuple[tuple[str, float, float], ...]:
    if kind == "pipeline":
        return EXPLAINED_PIPELINE if params.explain_count else PIPELINE
    return ((kind, 0.0, 1.0),)


_SESSIONS_LOCK = threading.Lock()


def _sessions():
    """The store's session factory, made (and migrated) once per process; the task and the
    reaper thread may both ask first."""
    with _SESSIONS_LOCK:
        return _make_sessions()


@cache
def _make_sessions():
    return open_store(get_settings().database_url)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_job(job_id: int, sessions=None) -> str:
    """Run job ``job_id`` if it can be claimed; returns its final state (or 'skipped').
    ``sessions``: the store to use (default: this worker process's)."""
    settings, sessions = get_settings(), sessions or _sessions()
    me = worker_name()
    if not claim(sessions, job_id, me):
        log.warning("job %s is not queued (unknown id, finished or taken): skipped", job_id)
        return "skipped"
    with sessions() as session:
        job = session.get(Job, job_id)
        kind, raw, result = job.kind, dict(job.params), dict(job.result or {})
    with JobRun(sessions, job_id, settings.heartbeat_s, me) as run:
        try:
            params = validate(kind, raw)
            _run_stages(run, kind, params, settings, result)
        except Exception as exc:
            if run.lost.is_set():  # another worker owns the job (and its files) now
                log.warning("job %d was taken over: stopped without touching it", job_id)
                return "lost"
            return _end(run, settings, exc, result)
        run.finish("succeeded", "done", progress=1.0, result=result, stats={})
    return "succeeded"


def _end(run: JobRun, settings: Settings, exc: Exception, result: dict) -> str:
    """Record a cancelled or failed job (removing what it should not keep)."""
    if isinstance(exc, JobCancelled):
        remove_artifacts(settings, run.job_id)
        run.finish("cancelled", "cancelled by request", result={})
        return "cancelled"
    log.error("job %d failed", run.job_id, exc_info=exc)
    remove_artifacts(settings, run.job_id, keep_finished=True)
    message = str(exc) if isinstance(exc, ValueError | OSError) else (
        f"{type(exc).__name__}: {exc}")
    run.finish("failed", message or type(exc).__name__, result=result)
    return "failed"


def _run_stages(run: JobRun, kind: str, params: JobParams, settings: Settings,
                result: dict) -> None:
    """Run the kind's stages, recording each output in ``result`` (and the row) as it
    finishes, so a resumed job skips what is done."""
    directory = job_dir(settings, run.job_id)
    directory.mkdir(parents=True, exist_ok=True)
    for name, start, span in stages_of(kind, params):
        run.stage(name, start, span)
        if name == "capture" and "acts" not in result:
            result["acts"] = stages.capture_stage(run, params, settings, directory)
        elif name == "train" and "sae" not in result:
            acts = result.get("acts") or params.acts
            result["sae"] = stages.train_stage(run, params, acts, directory)
        elif name == "analyze" and "sae_id" not in result:
            result["sae_id"] = stages.analyze_stage(
                run, params, settings, result.get("sae") or params.sae,
                result.get("acts") or params.acts)
        elif name == "explain":
            result["explain"] = explain_stage(
                run, params, settings, result.get("sae_id") or params.sae_id,
                params.explain_count if kind == "pipeline" else None)
        run.update(force=True, result=dict(result))


def _register(kind: str) -> None:
    def task(job_id: int) -> str:
        return run_job(job_id)

    task.__name__ = task.__qualname__ = f"{kind}_task"
    app.task(name=f"saelab.{kind}", bind=False, acks_late=True)(task)


for _kind in TASKS:
    _register(_kind)


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    """Reap once at start, then every half stale period, in a daemon thread."""
    settings = get_settings()

    def loop() -> None:
        while True:
            try:
                reaped = reap(_sessions(), app, settings)
                if reaped:
                    log.warning("recovered jobs with lost workers: %s", reaped)
            except Exception:
                log.exception("reaper")
            threading.Event().wait(max(settings.stale_after_s / 2, 1.0))

    threading.Thread(target=loop, daemon=True, name="saelab-reaper").start()
