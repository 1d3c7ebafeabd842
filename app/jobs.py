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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings
from app.store.models import Job

KINDS = ("capture", "train", "analyze", "explain", "steer_eval", "pipeline")
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


class JobParams(BaseModel):
    """What a job runs on; defaults finish in minutes on the embedded model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="model [default: settings]")
    layer: int | None = Field(None, ge=0, description="decoder block")
    dataset: str = "embedded"
    tokens: int = Field(65_536, ge=1, description="activations to capture")
    context: int = Field(128, ge=2)
    latents: int = Field(2048, ge=2, description="SAE latents n")
    k: int = Field(32, ge=1)
    arch: Literal["topk", "batchtopk"] = "topk"
    nproc: int = Field(1, ge=1, le=64, description="data-parallel training processes")
    batch: int = Field(4096, ge=1)
    lr: float | None = Field(None, gt=0)
    train_tokens: int | None = Field(None, ge=1, description="[default: one pass]")
    checkpoint_every: int = Field(50, ge=0)
    analyze_tokens: int = Field(65_536, ge=1)
    eval_tokens: int = Field(4096, ge=0, description="held-out tokens to evaluate the SAE "
                             "spliced into the model on (0: skip)")
    acts: str | None = Field(None, description="capture directory (train, analyze)")
    sae: str | None = Field(None, description="SAE directory (analyze)")
    sae_id: int | None = Field(None, ge=1, description="SAE in the store (explain)")
    latent_range: str | None = Field(None, pattern=r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-"
                                     r"\s*\d+)?)*\s*$", description="latents to explain, e.g. "
                                     "'0-99' or '3,7,10-20' [default: all]")
    explain_count: int = Field(0, ge=0, description="pipeline: besides the maxact label of "
                               "every live latent, LLM labels for this many latents sampled "
                               "across densities")
    explainer: Literal["auto", "maxact", "claude", "openai", "local"] = Field(
        "auto", description="auto: Claude with an API key, else an OpenAI-compatible server "
        "when one is configured, else the local model; maxact: offline labels")
    explainer_model: str | None = Field(None, description="the LLM explainer's model "
                                        "[default: settings]")
    score: bool = Field(True, description="score explanations (detection, fuzzing)")
    steer_eval_count: int = Field(0, ge=0, description="pipeline: measure the steerability "
                                  "of this many of the most active non-sink latents")
    strengths: str = Field("2,4,8,16", pattern=r"^\s*-?\d+(\.\d+)?(\s*,\s*-?\d+(\.\d+)?)*\s*$",
                           description="steer_eval: clamp strengths in units of each "
                           "latent's max activation")
    prompts: list[str] | None = Field(None, description="steer_eval: neutral prompts "
                                      "[default: eight built-in ones]")
    queue: str | None = None


REQUIRED = {"capture": ("layer",), "train": ("acts",), "analyze": ("sae",),
            "explain": ("sae_id",), "steer_eval": ("sae_id",), "pipeline": ("layer",)}


def validate(kind: str, params: dict[str, Any]) -> JobParams:
    """Parse ``params`` for a ``kind`` job; errors name each bad field."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    try:
        parsed = JobParams(**params)
    except ValidationError as exc:
        raise JobError.of_fields({".".join(map(str, e["loc"])) or "params": e["msg"]
                                  for e in exc.errors()}) from None
    fields = {name: f"required for a {kind} job" for name in REQUIRED[kind]
              if getattr(parsed, name) is None}
    if parsed.k >= parsed.latents:
        fields["k"] = f"{parsed.k} must be below latents ({parsed.latents})"
    if kind == "pipeline" and parsed.tokens - min(parsed.tokens // 10, 8192) < parsed.batch:
        fields["tokens"] = (f"{parsed.tokens} leave less than one training batch ({parsed.batch}"
                            " tokens) after the held-out tenth: capture more")
    if parsed.batch % parsed.nproc:
        fields["batch"] = f"{parsed.batch} is not divisible by nproc {parsed.nproc}"
    if fields:
        raise JobError.of_fields(fields)
    return parsed


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


def create(sessions: sessionmaker[Session], kind: str, params: dict[str, Any]) -> Job:
    """Validate and store a queued job without sending it (``submit`` sends it; ``saelab
    explain --now`` runs it in process)."""
    parsed = validate(kind, params)
    with sessions.begin() as session:
        job = Job(kind=kind, params=parsed.model_dump(exclude_none=True), state="queued",
                  progress=0.0, message="queued")
        session.add(job)
    return job


def submit(sessions: sessionmaker[Session], celery, kind: str, params: dict[str, Any]
           ) -> Job:
    """Validate, store and queue a job; returns its row."""
    from app.queue import send_job

    job = create(sessions, kind, params)
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
    the flag within a heartbeat, stops and removes the job's partial artifacts)."""
    with sessions.begin() as session:
        job = get(session, job_id)
        if job.state not in ACTIVE:
            raise JobFinished(f"job {job_id} is already {job.state}")
        if job.state == "queued":
            job.state, job.message, job.finished_at = "cancelled", "cancelled", _now()
            remove_artifacts(settings, job_id)
        else:
            job.cancel_requested, job.message = True, "cancelling"
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
    for partial in directory.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _now() -> datetime:
    return datetime.now(UTC)
