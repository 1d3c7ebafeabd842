"""Chaos: two workers on Redis and PostgreSQL share several small jobs; one is SIGKILLed in
the middle of training. Every job still ends — succeeded (resumed by the other worker) or
failed with a message — none is left queued or running, and nothing a live or finished job
owns was deleted."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.conftest import empty_database
from tests.test_jobs import _ended, _stack, _tiny

JOBS = 4


def test_killing_a_worker_mid_training_loses_no_job(tmp_path, tiny_llama_dir) -> None:
    with empty_database("postgresql", tmp_path) as db_url:
        for stack in _stack(tmp_path, db_url, "redis://127.0.0.1:6379/0"):
            victim = stack.start_worker()
            stack.start_worker()
            ids = [stack.submit("pipeline", *_tiny(tiny_llama_dir, **{
                "--train-tokens": 256 * 400, "--checkpoint-every": 20}))
                for _ in range(JOBS)]
            _kill_when_training(stack, ids, victim)
            ended = [stack.wait(job_id, _ended, timeout=240) for job_id in ids]
            data = Path(stack.env["SAELAB_DATA_DIR"])
            for job in ended:
                assert job.state in ("succeeded", "failed"), (job.id, job.state)
                if job.state == "failed":
                    assert job.message, f"job {job.id} failed without saying why"
                    continue
                for stage in ("acts", "sae"):
                    assert Path(job.result[stage]).is_dir(), (job.id, stage)
                assert (Path(job.result["sae"]) / "cfg.json").is_file()
                assert not list((data / "jobs" / str(job.id)).glob(".*.partial"))
            assert sum(j.state == "succeeded" for j in ended) >= JOBS - 1
            assert any(j.attempts == 2 for j in ended), "the killed worker's job resumed"


def _kill_when_training(stack, ids: list[int], victim) -> None:
    """SIGKILL ``victim`` once a job it runs is training (its loss reported)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for job_id in ids:
            job = stack.job(job_id)
            if (job.state == "running" and job.stage == "train" and "loss" in job.stats
                    and job.worker and job.worker.endswith(f":{victim.pid}")):
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                return
        time.sleep(0.1)
    raise AssertionError("the victim never trained a job")
