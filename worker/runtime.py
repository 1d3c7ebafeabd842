"""What a worker does around a job's stages: heartbeat, cancellation, throttled progress.

``JobRun`` owns a claimed job while it runs. A daemon thread refreshes the heartbeat every
``heartbeat_s`` and reads the cancel flag; the stages report through ``progress`` (called
from the engine's per-batch/per-step callbacks), which raises ``JobCancelled`` once a
cancel was asked for and writes the row at most once a second.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.store.models import Job
from training.data.stop import Interrupted

WRITE_EVERY_S = 1.0
WRITE_ATTEMPTS = 6
"""Tries of a progress write (backoff 0.25 s doubling: about 16 s in all)."""
SERIES_POINTS = 500
"""Loss-curve points kept per job (steps are thinned to about this many)."""
LOG_LINES = 200


class JobCancelled(Exception):
    """Raised inside a stage when the job's cancel flag is set."""


class JobLost(JobCancelled, Interrupted):
    """Raised inside a stage when another worker owns the job now: the engine leaves its
    partial files alone (they are the new owner's), and so does this worker."""


class _LogTail(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class StepRate:
    """Live training tokens/s over the steps this process has run, timed from its first
    reported step, so neither start-up nor a resumed run's skipped batches count."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.first: tuple[int, float] | None = None

    def figures(self, step: int) -> dict[str, float]:
        """``{"tokens_per_s": …}`` once a step after the first has been reported."""
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        first_step, started = self.first
        if step <= first_step:
            return {}
        return {"tokens_per_s": (step - first_step) * self.batch / max(now - started, 1e-9)}


class JobRun:
    """A claimed job while its stages run."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int, heartbeat_s: float,
                 worker: str | None = None) -> None:
        self.sessions, self.job_id, self.heartbeat_s = sessions, job_id, heartbeat_s
        self.worker = worker
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        """Set when the row is no longer this worker's running job (the reaper judged it
        stale and re-queued it): every later write is skipped and the stages stop."""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._series: dict[str, list] = {}
        self._last_write = 0.0
        self._log = _LogTail()
        self._stage_span = (0.0, 1.0)
        self._stage_started = time.monotonic()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"job-{job_id}-heartbeat")

    def __enter__(self) -> JobRun:
        logging.getLogger().addHandler(self._log)
        with self.sessions() as session:
            job = session.get(Job, self.job_id)
            self._series = dict(job.series or {})
            if job.cancel_requested:
                self.cancelled.set()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        logging.getLogger().removeHandler(self._log)

    # -- heartbeat -----------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self.sessions.begin() as session:
                    self._write(session, heartbeat_at=datetime.now(UTC))
                    flag = session.scalar(select(Job.cancel_requested)
                                          .where(Job.id == self.job_id))
                if flag:
                    self.cancelled.set()
            except OperationalError as exc:  # busy or away: the next beat tries again
                logging.getLogger(__name__).warning("heartbeat of job %d: %s", self.job_id,
                                                    str(exc.orig or exc).splitlines()[0])
            except Exception:  # a flaky database must not kill the job; the next beat retries
                logging.getLogger(__name__).exception("heartbeat of job %d", self.job_id)

    # -- progress ------------------------------------------------------------------------
    def stage(self, name: str, start: float, span: float) -> None:
        """Enter stage ``name``, which covers [start, start + span] of the job's progress."""
        self._stage_span, self._stage_started = (start, span), time.monotonic()
        logging.getLogger(__name__).info("stage %s", name)
        self.update(force=True, stage=name, progress=start, stats={})

    def progress(self, done: float, total: float, **stats: float) -> None:
        """Report ``done`` of ``total`` units in the current stage (tokens), with live
        figures; raises ``JobCancelled`` if the job is to stop."""
        if self.lost.is_set():
            raise JobLost
        if self.cancelled.is_set():
            raise JobCancelled
        fraction = min(max(done / total, 0.0), 1.0) if total else 0.0
        elapsed = time.monotonic() - self._stage_started
        if fraction > 0 and "eta_s" not in stats:
            stats["eta_s"] = elapsed * (1 - fraction) / fraction
        start, span = self._stage_span
        self.update(progress=start + span * fraction, stats=stats)

    def point(self, every: int, **values: float) -> None:
        """Add one point to the metric series (kept to about SERIES_POINTS points)."""
        step = int(values.get("step", 0))
        if every > 1 and step % every:
            return
        with self._lock:
            for key, value in values.items():
                self._series.setdefault(key, []).append(round(float(value), 6))
            self._pending["series"] = {k: list(v) for k, v in self._series.items()}

    def update(self, force: bool = False, **fields: Any) -> None:
        """Queue column values; write them (with the log tail) if a second has passed."""
        with self._lock:
            self._pending.update(fields)
            now = time.monotonic()
            if not force and now - self._last_write < WRITE_EVERY_S:
                return
            pending, self._pending, self._last_write = self._pending, {}, now
        pending["log"] = "\n".join(self._log.lines)
        try:
            self._retrying(pending)
        except OperationalError:
            if force:
                raise
            with self._lock:  # a database that stays away: the next update sends these
                self._pending = {**pending, **self._pending}

    def _retrying(self, values: dict[str, Any]) -> None:
        """Write ``values``, retrying a transient database error (a locked SQLite file, a
        dropped connection) with backoff before giving up."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.sessions.begin() as session:
                    self._write(session, **values)
                return
            except OperationalError:
                if attempt == WRITE_ATTEMPTS - 1:
                    raise
                logging.getLogger(__name__).warning(
                    "job %d: database busy, retrying its progress write", self.job_id)
                time.sleep(0.25 * 2**attempt)

    def _write(self, session: Session, **values: Any) -> None:
        """Update the row if it is still this worker's running job; else mark it lost."""
        if self.lost.is_set():
            return
        mine = [Job.id == self.job_id]
        if self.worker is not None:
            mine += [Job.worker == self.worker, Job.state == "running"]
        if session.execute(update(Job).where(*mine).values(**values)).rowcount == 0:
            logging.getLogger(__name__).warning(
                "job %d is no longer run by %s: stopping", self.job_id, self.worker)
            self.lost.set()
            self.cancelled.set()

    def finish(self, state: str, message: str, **fields: Any) -> None:
        self.update(force=True, state=state, message=message[:2000],
                    finished_at=datetime.now(UTC), **fields)
