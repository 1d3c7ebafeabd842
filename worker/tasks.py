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
from worker.steer_eval_stage import steer_eval_stage
from worker.sweep_stage import analyze_members, sweep_stage

log = logging.getLogger(__name__)
app: Celery = make_celery()

STAGE_WEIGHTS = {"capture": 40, "train": 30, "sweep": 30, "analyze": 15, "label": 5,
                 "explain": 10, "steer_eval": 10}
"""Each stage's share of a pipeline's progress bar (normalised over the stages it runs)."""


def stages_of(kind: str, params: JobParams) -> tuple[tuple[str, float, float], ...]:
    """(stage, start, span) of a job's progress bar. A pipeline labels every live latent
    offline (``label``), then adds LLM labels (``explain``) and steering figures
    (``steer_eval``) when asked for."""
    if kind == "sweep":  # (a capture first when it names none)
        names = ["capture"] * (params.acts is None) + ["sweep", "analyze"]
    elif kind != "pipeline":
        return ((kind, 0.0, 1.0),)
    else:
        names = ["capture", "train", "analyze", "label"]
        names += ["explain"] if params.explain_count else []
        names += ["steer_eval"] if params.steer_eval_count else []
    total = sum(STAGE_WEIGHTS[name] for name in names)
    out, start = [], 0.0
    for name in names:
        span = STAGE_WEIGHTS[name] / total
        out.append((name, start, span))
        start += span
    return tuple(out)


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
        kept = [name for name in ("acts", "sae", "saes") if name in result]
        if "sae_id" in result or result.get("sae_ids"):  # the store points at the SAE
            # (or a sweep's SAEs) and its capture: keep them
            remove_artifacts(settings, run.job_id, keep_finished=True)
            run.finish("cancelled", f"cancelled by request; kept the finished stages' "
                                    f"outputs ({', '.join(kept)})", result=result)
        else:
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
        elif name == "sweep" and "saes" not in result:
            result["saes"] = sweep_stage(run, params, result.get("acts") or params.acts,
                                         directory)
        elif name == "analyze" and kind == "sweep":
            analyze_members(run, params, settings, result, directory)
        elif name == "analyze" and "sae_id" not in result:
            result["sae_id"] = stages.analyze_stage(
                run, params, settings, result.get("sae") or params.sae,
                result.get("acts") or params.acts, directory)
        elif name == "label" and "label" not in result:
            result["label"] = explain_stage(run, params, settings, result["sae_id"],
                                            kind="maxact")
        elif name == "explain" and "explain" not in result:
            sae_id = result.get("sae_id") or params.sae_id
            result["explain"] = explain_stage(
                run, params, settings, sae_id, kind=params.explainer,
                count=params.explain_count if kind == "pipeline" else None)
        elif name == "steer_eval" and "steer_eval" not in result:
            result["steer_eval"] = steer_eval_stage(
                run, params, settings, result.get("sae_id") or params.sae_id,
                params.steer_eval_count if kind == "pipeline" else None)
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
