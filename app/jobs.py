"""Jobs in the store: validated submission, listing, cancellation and the reaper.

A job is a row (kind, params, state, progress, ...) plus a Celery message naming its id.
State moves queued → running → succeeded | failed | cancelled. Workers claim a job with one
conditional UPDATE (only a ``queued`` job can be claimed), so a redelivered or duplicated
message runs nothing twice. A running job's worker refreshes ``heartbeat_at`` every few
seconds; the reaper turns a job with a stale heartbeat back to ``queued`` (its stages
resume from what is on disk: a finished capture is reused, training continues from its
last checkpoint) or, after ``max_attempts``, fails it with a message.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.job_params import JobParams, submission_problems
from app.settings import Settings
from app.store.models import Job

KINDS = ("capture", "train", "analyze", "explain", "steer_eval", "sweep", "pipeline")
ACTIVE = ("queued", "running")


class JobError(ValueError):
    """A job that cannot be submitted or changed; the message names the field or id.

    ``fields`` maps each bad parameter to its problem (what a form shows inline).
    """

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}

    @classmethod
    def of_fields(cls, fields: dict[str, str]) -> JobError:
        return cls("; ".join(f"{name}: {problem}" for name, problem in fields.items()), fields)


class JobNotFound(JobError):
    """No job has the id."""


class BrokerUnavailable(JobError):
    """The job was stored but could not be queued (it is marked failed)."""


class JobFinished(JobError):
    """The job has already ended: it cannot be cancelled."""


REQUIRED = {"capture": ("layer",), "train": ("acts",), "analyze": ("sae",),
            "explain": ("sae_id",), "steer_eval": ("sae_id",), "sweep": ("sweep_latents",
                                                                          "sweep_k"),
            "pipeline": ("layer",)}


def validate(kind: str, params: dict[str, Any], settings: Settings | None = None, *,
             web: bool = False) -> JobParams:
    """Parse ``params`` for a ``kind`` job; errors name each bad field. With ``settings``,
    also what can be known at submission (``job_params.submission_problems``): paths are
    resolved, and for ``web`` requests confined to the allowed roots."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}",
                       {"kind": f"unknown: one of {', '.join(KINDS)}"})
    if not isinstance(params, dict):
        raise JobError("params: give an object of job parameters", {"params": "not an object"})
    try:
        parsed = JobParams(**params)
    except ValidationError as exc:
        raise JobError.of_fields({".".join(map(str, e["loc"])) or "params": plain(e["msg"])
                                  for e in exc.errors()}) from None
    fields = {name: f"required for a {kind} job" for name in REQUIRED[kind]
              if getattr(parsed, name) is None}
    if parsed.k >= parsed.latents:
        fields["k"] = f"{parsed.k} must be below latents ({parsed.latents})"
    if kind == "pipeline" and parsed.tokens - min(parsed.tokens // 10, 8192) < parsed.batch:
        fields["tokens"] = (f"{parsed.tokens} leave less than one training batch ({parsed.batch}"
                            " tokens) after the held-out tenth: capture more")
    if kind == "sweep":
        fields.update(sweep_problems(parsed))
    if parsed.matryoshka and kind != "sweep":
        from training.sae.autoencoder import check_matryoshka_widths

        try:
            check_matryoshka_widths(parsed.matryoshka, parsed.latents)
        except ValueError as exc:
            fields["matryoshka"] = str(exc).removeprefix("--matryoshka: ")
    if parsed.batch % parsed.nproc:
        fields["batch"] = f"{parsed.batch} is not divisible by nproc {parsed.nproc}"
    if settings is not None:
        fields.update(submission_problems(kind, parsed, settings, web=web))
    if fields:
        raise JobError.of_fields(fields)
    return parsed


SWEEP_MEMBERS = 16
"""Most SAEs one sweep job trains (they share one process's memory)."""


def sweep_problems(parsed: JobParams) -> dict[str, str]:
    """A sweep's combinations, checked as ``training.train.sweep.sweep_configs`` checks
    them (k below n, no repeated value, Matryoshka widths per member), and a bound on
    their number; a capture or a layer to capture at."""
    from training.sae.autoencoder import SaeConfig
    from training.train.sweep import sweep_configs

    if parsed.acts is None and parsed.layer is None:
        return {"acts": "a sweep trains on a capture: give acts, or layer to capture first"}
    if not parsed.sweep_latents or not parsed.sweep_k:
        return {}
    archs = parsed.sweep_arch or [parsed.arch_for("resid")]
    members = len(parsed.sweep_latents) * len(parsed.sweep_k) * len(archs)
    if members > SWEEP_MEMBERS:
        return {"sweep_latents": f"{members} combinations: a sweep trains at most "
                                 f"{SWEEP_MEMBERS}"}
    try:
        base = SaeConfig(d_in=1, n_latents=max(parsed.sweep_latents),
                         k=min(parsed.sweep_k))
        sweep_configs(base, parsed.sweep_latents, parsed.sweep_k, archs,
                      parsed.matryoshka or ())
    except ValueError as exc:
        return {"sweep_k": str(exc)}
    return {}


def plain(message: str) -> str:
    """A validation message without pydantic's wording ("Value error, ...")."""
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message


def parse_latents(spec: str | None, n_latents: int) -> list[int]:
    """Latent indices of a ``latent_range`` ('0-99', '3,7,10-20'; None: all), sorted."""
    if spec is None:
        return list(range(n_latents))
    chosen: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if first > last or last >= n_latents:
            raise JobError(f"latent_range: {part} is not within 0-{n_latents - 1}",
                           {"latent_range": f"{part} is not within 0-{n_latents - 1}"})
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def create(sessions: sessionmaker[Session], kind: str, params: dict[str, Any],
           settings: Settings | None = None, *, web: bool = False) -> Job:
    """Validate and store a queued job without sending it (``submit`` sends it; ``saelab
    explain --now`` runs it in process). ``settings``/``web``: see ``validate``."""
    parsed = validate(kind, params, settings, web=web)
    with sessions.begin() as session:
        job = Job(kind=kind, params=parsed.model_dump(exclude_none=True), state="queued",
                  progress=0.0, message="queued")
        session.add(job)
    return job


def submit(sessions: sessionmaker[Session], celery, kind: str, params: dict[str, Any],
           settings: Settings | None = None, *, web: bool = False) -> Job:
    """Validate, store and queue a job; returns its row."""
    from app.queue import send_job

    job = create(sessions, kind, params, settings, web=web)
    parsed = JobParams(**job.params)
    try:
        send_job(celery, kind, job.id, parsed.queue)
    except Exception as exc:  # broker down: the job must not wait "queued" forever
        with sessions.begin() as session:
            failed = session.get(Job, job.id)
            failed.state, failed.finished_at = "failed", _now()
            failed.message = f"could not queue the job: {exc}"
        raise BrokerUnavailable(f"could not queue job {job.id} on the broker: {exc}") from exc
    return job


def get(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id} (see `saelab jobs list`)")
    return job


def watch(sessions: sessionmaker[Session], job_id: int, every_s: float = 1.0
          ) -> Iterator[Job]:
    """The job's row every ``every_s`` seconds, ending with the row of its final state."""
    while True:
        with sessions() as session:
            job = get(session, job_id)
        yield job
        if job.state not in ACTIVE:
            return
        time.sleep(every_s)


def recent(session: Session, limit: int = 50, state: str | None = None) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return list(session.scalars(query))


def cancel(sessions: sessionmaker[Session], job_id: int, settings: Settings) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (its worker sees
    the flag within a heartbeat, stops and removes the job's partial artifacts). Each is one
    conditional UPDATE, so a worker claiming the job at the same moment either finds it
    cancelled or has claimed it first (and then gets the flag); files go after the commit."""
    now = _now()
    with sessions.begin() as session:
        queued = session.execute(
            update(Job).where(Job.id == job_id, Job.state == "queued")
            .values(state="cancelled", message="cancelled", finished_at=now)).rowcount
        running = 0 if queued else session.execute(
            update(Job).where(Job.id == job_id, Job.state == "running")
            .values(cancel_requested=True, message="cancelling")).rowcount
    if queued:
        remove_artifacts(settings, job_id)
    with sessions() as session:
        job = get(session, job_id)
    if not (queued or running):
        raise JobFinished(f"job {job_id} is already {job.state}")
    return job


def reap(sessions: sessionmaker[Session], celery, settings: Settings) -> list[int]:
    """Recover running jobs whose worker stopped sending heartbeats, and re-send queued
    jobs no worker took for ``resend_after_s`` (their message may be lost); returns the
    ids of the jobs it changed."""
    from app.queue import send_job

    cutoff = _now() - timedelta(seconds=settings.stale_after_s)
    requeued, reaped = [], []
    with sessions.begin() as session:
        stale = session.scalars(select(Job).where(
            Job.state == "running", Job.heartbeat_at < cutoff).with_for_update()).all()
        for job in stale:
            since = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "?"
            lost = f"worker {job.worker} lost (last heartbeat {since})"
            if job.cancel_requested or job.attempts >= settings.max_attempts:
                why = "cancelled" if job.cancel_requested else (
                    f"gave up after {job.attempts} attempts")
                job.state = "cancelled" if job.cancel_requested else "failed"
                job.message, job.finished_at = f"{lost}; {why}", _now()
                reaped.append(job.id)
            else:
                job.state, job.message = "queued", f"{lost}; resuming"
                job.heartbeat_at = _now()  # when it was last sent
                requeued.append((job.id, job.kind, job.params.get("queue")))
        requeued += _unclaimed(session, settings)
    for job_id in reaped:
        remove_artifacts(settings, job_id, keep_finished=True)
    for job_id, kind, queue in requeued:
        send_job(celery, kind, job_id, queue)
    return reaped + [job_id for job_id, _, _ in requeued]


def _unclaimed(session: Session, settings: Settings) -> list[tuple[int, str, str | None]]:
    """Queued jobs no worker has taken for ``resend_after_s`` since they were last sent:
    marked as sent again now; returns (id, kind, queue) to send. After ``max_attempts``
    resends a job is left waiting with a message instead (a job queued behind long ones,
    or on a queue no worker reads, must not flood the broker with duplicates)."""
    cutoff = _now() - timedelta(seconds=settings.resend_after_s)
    waiting = session.scalars(select(Job).where(
        Job.state == "queued", func.coalesce(Job.heartbeat_at, Job.created_at) < cutoff)
        .with_for_update()).all()
    resend = []
    for job in waiting:
        job.heartbeat_at = _now()
        sent = int((job.stats or {}).get("resent", 0))
        queue = job.params.get("queue") or "gpu"
        if sent >= settings.max_attempts:  # no worker reads its queue, or all are busy
            job.message = (f"queued; sent {sent + 1} times and not taken: is a worker "
                           f"reading queue {queue!r}?")
            continue
        job.stats = {**(job.stats or {}), "resent": sent + 1}
        job.message = f"queued; sent again (not taken for {settings.resend_after_s:.0f} s)"
        resend.append((job.id, job.kind, job.params.get("queue")))
    return resend


def claim(sessions: sessionmaker[Session], job_id: int, worker: str) -> bool:
    """Atomically move a queued job to running for ``worker``; False if it was not queued
    (already claimed, finished or cancelled: the message is a duplicate)."""
    now = _now()
    with sessions.begin() as session:
        claimed = session.execute(
            update(Job).where(Job.id == job_id, Job.state == "queued")
            .values(state="running", worker=worker, heartbeat_at=now, message="running",
                    attempts=Job.attempts + 1)).rowcount == 1
        if claimed:
            session.execute(update(Job).where(Job.id == job_id, Job.started_at.is_(None))
                            .values(started_at=now))
    return claimed


def job_dir(settings: Settings, job_id: int) -> Path:
    return settings.jobs_dir / str(job_id)


def remove_artifacts(settings: Settings, job_id: int, *, keep_finished: bool = False) -> None:
    """Delete what a job wrote: everything, or (``keep_finished``) only the partial
    directories of unfinished stages (``.<name>.partial``)."""
    directory = job_dir(settings, job_id)
    if not directory.exists():
        return
    if not keep_finished:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for partial in directory.rglob(".*.partial"):  # (a sweep's are under sweep/)
        shutil.rmtree(partial, ignore_errors=True)


def _now() -> datetime:
    return datetime.now(UTC)
