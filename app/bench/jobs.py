"""Job overhead: the same training run directly and as a job through a real worker.

Both train the same SAE on the same capture. The worker (embedded broker, SQLite store, in
a scratch data dir) is started and warmed up by one short job before the timed one, so
the figure is what a job adds to a run — claim, heartbeat, throttled progress writes,
broker round trip — not the worker's start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def bench_jobs(acts: Path, latents: int, k: int, tokens: int, batch: int = 4096
               ) -> dict[str, Any]:
    from app import jobs
    from app.queue import make_celery
    from app.settings import Settings
    from app.store.db import make_engine, session_factory, upgrade
    from training.train.launch import run_spec
    from worker.stages import train_spec

    params = jobs.validate("train", {"acts": str(acts), "latents": latents, "k": k,
                                     "train_tokens": tokens, "batch": batch,
                                     "checkpoint_every": 0})
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        run_spec(train_spec(params, str(acts), root / "direct", False), progress=False)
        direct_s = time.perf_counter() - start

        settings = Settings(data_dir=root / "data")
        env = {**os.environ, "SAELAB_DATA_DIR": str(settings.data_dir)}
        engine = make_engine(settings.database_url)
        upgrade(engine)
        sessions, celery = session_factory(engine), make_celery(settings)
        worker = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()",
                                   "worker"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _run(sessions, celery, {**params.model_dump(exclude_none=True),
                                    "train_tokens": batch})  # warm-up
            start = time.perf_counter()
            job = _run(sessions, celery, params.model_dump(exclude_none=True))
            job_s = time.perf_counter() - start
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait()
            engine.dispose()
    return {"bench": "jobs", "tokens": tokens, "latents": latents, "k": k,
            "direct_s": direct_s, "job_s": job_s, "job_state": job.state,
            "ratio": job_s / direct_s}


def _run(sessions, celery, params: dict):
    from app import jobs

    job = jobs.submit(sessions, celery, "train", params)
    while True:
        with sessions() as session:
            job = jobs.get(session, job.id)
        if job.state not in jobs.ACTIVE:
            if job.state != "succeeded":
                raise RuntimeError(f"benchmark job {job.id} {job.state}: {job.message}")
            return job
        time.sleep(0.05)


