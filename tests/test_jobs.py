"""Jobs through real worker processes: the embedded broker (kombu's SQLAlchemy transport on
SQLite) with the SQLite store, and Redis with PostgreSQL. Pipelines run to success, cancel
stops a running job, a worker SIGKILLed mid-training is replaced and the job resumes from
its checkpoint, bad ids and params end cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import app
from app.store.db import make_engine, session_factory, upgrade
from app.store.models import Job, Latent, Sae
from tests.conftest import empty_database

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(params=["embedded", "redis"])
def stack(request, tmp_path):
    """Settings for one test: its own data dir, store and broker (SQLite + the embedded
    broker, or PostgreSQL + Redis), a unique queue and short heartbeat/stale periods."""
    embedded = request.param == "embedded"
    with empty_database("sqlite" if embedded else "postgresql", tmp_path) as db_url:
        for stack in _stack(tmp_path, db_url, f"sqla+sqlite:///{tmp_path / 'broker.db'}"
                            if embedded else "redis://127.0.0.1:6379/0"):
            stack.kind = request.param
            yield stack


def _stack(tmp_path, db_url, broker):
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"), "SAELAB_DATABASE_URL": db_url,
           "SAELAB_BROKER_URL": broker, "SAELAB_HEARTBEAT_S": "0.5",
           "SAELAB_STALE_AFTER_S": "4"}
    engine = make_engine(db_url)
    upgrade(engine)
    workers: list[subprocess.Popen] = []
    stack = Stack(env, f"test-{uuid.uuid4().hex[:8]}", session_factory(engine), workers,
                  tmp_path)
    yield stack
    for proc in workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    engine.dispose()


class Stack:
    def __init__(self, env, queue, sessions, workers, tmp_path) -> None:
        self.env, self.queue, self.sessions = env, queue, sessions
        self.workers, self.tmp_path = workers, tmp_path

    def start_worker(self) -> subprocess.Popen:
        log = (self.tmp_path / f"worker-{len(self.workers)}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from app.cli import main; main()", "worker", "--queues",
             self.queue], cwd=REPO,
            env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        self.workers.append(proc)
        return proc

    def cli(self, *args):
        return runner.invoke(app, [str(a) for a in args], env=self.env)

    def submit(self, kind: str, *args) -> int:
        result = self.cli("jobs", "submit", kind, "--queue", self.queue, "--json", *args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["id"]

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            return session.get(Job, job_id)

    def wait(self, job_id: int, ready, timeout: float = 120) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if ready(job):
                return job
            time.sleep(0.2)
        logs = "\n".join(p.read_text()[-3000:] for p in self.tmp_path.glob("worker-*.log"))
        raise AssertionError(f"job {job_id} stuck in {job.state} ({job.message})\n{logs}")


def _tiny(tiny_llama_dir, **extra) -> list:
    args = {"--model": tiny_llama_dir, "--layer": 1, "--tokens": 2048, "--latents": 64,
            "--k": 4, "--batch": 256, "--analyze-tokens": 2048, **extra}
    return [str(x) for pair in args.items() for x in pair]


def _ended(job: Job) -> bool:
    return job.state in ("succeeded", "failed", "cancelled")


def test_pipeline_runs_to_success(stack, tiny_llama_dir) -> None:
    """On the embedded broker the training stage runs as 2 torchrun (gloo) processes."""
    stack.start_worker()
    nproc = 2 if stack.kind == "embedded" else 1
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{"--nproc": nproc}))
    job = stack.wait(job_id, _ended)
    assert job.state == "succeeded", job.message
    assert job.progress == 1.0 and job.attempts == 1 and job.finished_at
    assert set(job.result) == {"acts", "sae", "sae_id", "label"}
    assert len(job.series["fvu"]) == len(job.series["step"]) > 1
    assert "stage analyze" in job.log
    steps_file = Path(job.result["sae"]).parent / "train-steps.jsonl"  # torchrun's rank 0
    assert steps_file.exists() == (nproc > 1)
    with stack.sessions() as session:
        assert session.query(Latent).filter_by(sae_id=job.result["sae_id"]).count() == 64
        live = session.query(Latent).filter(Latent.sae_id == job.result["sae_id"],
                                            Latent.density > 0).all()
        assert job.result["label"]["explained"] == len(live) > 0  # every live latent labelled
        assert all(lat.explanation for lat in live)
        assert session.get(Sae, job.result["sae_id"]).name == f"job{job_id}-L1-n64-k4"
    shown = json.loads(stack.cli("jobs", "show", job_id, "--json").stdout)
    assert shown["state"] == "succeeded" and shown["result"]["sae_id"] == job.result["sae_id"]
    listed = json.loads(stack.cli("jobs", "list", "--json").stdout)
    assert [j["id"] for j in listed] == [job_id]


def test_cancel_stops_a_running_job(stack, tiny_llama_dir) -> None:
    stack.start_worker()
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{"--train-tokens": 10**9}))
    stack.wait(job_id, lambda j: j.stage == "train" and "loss" in j.stats)
    asked = time.monotonic()
    assert stack.cli("jobs", "cancel", job_id).exit_code == 0
    job = stack.wait(job_id, _ended, timeout=30)
    assert job.state == "cancelled" and time.monotonic() - asked < 10
    assert not (Path(stack.env["SAELAB_DATA_DIR"]) / "jobs" / str(job_id)).exists()
    again = stack.cli("jobs", "cancel", job_id)
    assert again.exit_code == 2 and "already cancelled" in again.output
    # a queued job (no worker listening on its queue) is cancelled at once
    other = stack.cli("jobs", "submit", "capture", "--layer", 1, "--queue", "nobody", "--json")
    queued = json.loads(other.stdout)["id"]
    assert stack.cli("jobs", "cancel", queued).exit_code == 0
    assert stack.job(queued).state == "cancelled"


def test_killed_worker_job_resumes_from_checkpoint(stack, tiny_llama_dir) -> None:
    first = stack.start_worker()
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{
        "--train-tokens": 256 * 1500, "--checkpoint-every": 25}))
    checkpoint = (Path(stack.env["SAELAB_DATA_DIR"]) / "jobs" / str(job_id) / ".sae.partial"
                  / "checkpoint.pt")
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), stack.job(job_id).message
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert stack.job(job_id).state == "running"  # nobody has noticed yet
    stack.start_worker()
    job = stack.wait(job_id, _ended)
    assert job.state == "succeeded", job.message
    assert job.attempts == 2
    assert "resumed at step" in job.log


def test_bad_ids_and_params(stack, tiny_llama_dir) -> None:
    from app.queue import make_celery, send_job
    from app.settings import Settings

    bad = stack.cli("jobs", "submit", "train", "--latents", 8, "--k", 8, "--acts", "x")
    assert bad.exit_code == 2 and "k: 8 must be below latents" in bad.output
    unknown = stack.cli("jobs", "submit", "dance")
    assert unknown.exit_code == 2 and "unknown job kind" in unknown.output
    missing = stack.cli("jobs", "submit", "capture")
    assert missing.exit_code == 2 and "layer: required for a" in missing.output
    assert stack.cli("jobs", "show", 12345).exit_code == 2
    with stack.sessions() as session:
        assert session.query(Job).count() == 0

    stack.start_worker()
    celery = make_celery(Settings(**{k.removeprefix("SAELAB_").lower(): v
                                     for k, v in stack.env.items()}))
    send_job(celery, "train", 987654, stack.queue)  # no such job: skipped, nothing written
    with stack.sessions.begin() as session:  # bad params that bypassed validation
        job = Job(kind="capture", params={"layer": 1, "tokens": -5, "model": "nope"})
        session.add(job)
    send_job(celery, "capture", job.id, stack.queue)
    failed = stack.wait(job.id, _ended)
    assert failed.state == "failed" and "tokens" in failed.message
    missing_model = stack.submit("capture", "--model", stack.tmp_path / "no-model",
                                 "--layer", 1, "--tokens", 64)
    failed = stack.wait(missing_model, _ended)
    assert failed.state == "failed" and "no-model" in failed.message
    with stack.sessions() as session:
        assert session.get(Job, 987654) is None


def _descendants(pid: int) -> set[int]:
    """Live descendants of a process (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def test_killed_worker_takes_its_torchrun_processes_along(stack, tiny_llama_dir) -> None:
    if stack.kind != "embedded":
        pytest.skip("one broker is enough: this is about the worker's children")
    worker = stack.start_worker()
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{
        "--nproc": 2, "--train-tokens": 10**9}))
    stack.wait(job_id, lambda j: j.stage == "train" and "loss" in j.stats)
    children = _descendants(worker.pid)
    assert len(children) >= 3, children  # torchrun and its 2 ranks
    os.kill(worker.pid, signal.SIGKILL)  # the worker only, not its process group
    worker.wait()
    deadline = time.monotonic() + 30
    while _alive(children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(children) == set(), "torchrun or its ranks outlived their worker"


def test_queued_job_whose_message_was_lost_is_sent_again(stack, tiny_llama_dir) -> None:
    from app import jobs

    stack.env["SAELAB_RESEND_AFTER_S"] = "1"
    job = jobs.create(stack.sessions, "capture", {  # stored, never sent: a lost message
        "model": str(tiny_llama_dir), "layer": 1, "tokens": 512, "queue": stack.queue})
    time.sleep(1.5)
    stack.start_worker()  # its reaper runs at start, then every 2 s
    done = stack.wait(job.id, _ended, timeout=60)
    assert done.state == "succeeded", done.message
    assert done.attempts == 1


def test_resending_a_job_nobody_takes_stops_after_max_attempts(tmp_path) -> None:
    from app import jobs
    from app.queue import make_celery
    from app.settings import Settings
    from app.store.db import open_store

    settings = Settings(data_dir=tmp_path, resend_after_s=0, max_attempts=2)
    sessions = open_store(settings.database_url)
    celery = make_celery(settings)
    job = jobs.create(sessions, "capture", {"layer": 1, "queue": "nobody"})
    sent = [jobs.reap(sessions, celery, settings) for _ in range(4)]
    assert sent == [[job.id], [job.id], [], []]
    with sessions() as session:
        waiting = session.get(Job, job.id)
        assert waiting.state == "queued" and "reading queue 'nobody'" in waiting.message
    sessions.kw["bind"].dispose()


def test_the_live_rate_counts_only_the_steps_this_worker_ran() -> None:
    from worker.runtime import StepRate

    rate = StepRate(batch=256)
    assert rate.figures(500) == {}, "a resumed run's first report: no steps timed yet"
    time.sleep(0.05)
    figures = rate.figures(502)
    assert 0 < figures["tokens_per_s"] <= 2 * 256 / 0.05
    assert rate.figures(500) == {}


def test_a_worker_that_lost_its_job_stops_writing(tmp_path) -> None:
    """The reaper re-queued a job whose worker was only slow: that worker's next heartbeat
    notices, it stops at its next progress report and never writes over the row again."""
    from sqlalchemy import update as sql_update

    from app import jobs
    from app.settings import Settings
    from app.store.db import open_store
    from worker.runtime import JobCancelled, JobRun

    sessions = open_store(Settings(data_dir=tmp_path).database_url)
    job = jobs.create(sessions, "capture", {"layer": 1})
    assert jobs.claim(sessions, job.id, "slow-worker")
    with JobRun(sessions, job.id, 0.05, "slow-worker") as run:
        run.progress(1, 10, tokens_per_s=5.0)
        assert not run.lost.is_set()
        with sessions.begin() as session:  # what the reaper does to a stale job
            session.execute(sql_update(Job).where(Job.id == job.id).values(
                state="queued", message="resuming"))
        deadline = time.monotonic() + 5
        while not run.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert run.lost.is_set()
        with pytest.raises(JobCancelled):
            run.progress(2, 10)
        run.finish("failed", "must not land")
    with sessions() as session:
        row = session.get(Job, job.id)
        assert (row.state, row.message) == ("queued", "resuming")
    sessions.kw["bind"].dispose()


def test_cancel_during_explain_keeps_the_stored_sae(stack, tiny_llama_dir) -> None:
    """The store points at the SAE once it is analysed: cancelling a later stage keeps it
    (and its capture) instead of deleting what the explorer shows."""
    if stack.kind != "embedded":
        pytest.skip("one broker is enough: this is about the files a cancel removes")
    stack.start_worker()
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{
        "--explain-count": 40, "--explainer": "local", "--explainer-model": "smollm2-135m"}))
    stack.wait(job_id, lambda j: j.stage == "explain" and j.state == "running")
    assert stack.cli("jobs", "cancel", job_id).exit_code == 0
    job = stack.wait(job_id, _ended)
    assert job.state == "cancelled" and "kept the finished stages" in job.message, job.message
    assert (Path(job.result["sae"]) / "cfg.json").is_file() and Path(job.result["acts"]).is_dir()
    with stack.sessions() as session:
        sae = session.get(Sae, job.result["sae_id"])
        assert sae is not None and Path(sae.path) == Path(job.result["sae"]).resolve()


def test_a_transcoder_pipeline_captures_the_mlp_and_trains_a_skip_transcoder(
        stack, tiny_llama_dir) -> None:
    if stack.kind != "embedded":
        pytest.skip("one broker is enough for the transcoder path")
    stack.start_worker()
    job_id = stack.submit("pipeline", *_tiny(tiny_llama_dir, **{"--site": "mlp"}), "--skip")
    job = stack.wait(job_id, _ended)
    assert job.state == "succeeded", job.message
    cfg = json.loads((Path(job.result["sae"]) / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["site"] == "mlp"
    assert json.loads((Path(job.result["acts"]) / "manifest.json").read_text())[
        "hook_point"] == "mlp"
    with stack.sessions() as session:
        sae = session.get(Sae, job.result["sae_id"])
        assert sae.architecture == "batchtopk" and sae.config["skip"] is True
        assert sae.metrics["eval"]["ce_loss_recovered"] is not None


def test_a_sweep_job_whose_worker_dies_resumes_from_its_checkpoint(stack,
                                                                  tiny_llama_dir) -> None:
    if stack.kind != "embedded":
        pytest.skip("one broker is enough for the sweep job")
    victim = stack.start_worker()
    job_id = stack.submit("sweep", "--model", tiny_llama_dir, "--layer", 1, "--tokens",
                          60_000, "--sweep-latents", "32,64", "--sweep-k", "4", "--batch",
                          256, "--checkpoint-every", 3, "--analyze-tokens", 1024)
    job_dir = Path(stack.env["SAELAB_DATA_DIR"]) / "jobs" / str(job_id)
    deadline = time.monotonic() + 120
    while not list(job_dir.glob("sweep/.*.partial/sweep-checkpoint.pt")):
        assert time.monotonic() < deadline and victim.poll() is None, "no sweep checkpoint"
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (job_dir / "sweep" / "n64-k4-topk" / "cfg.json").is_file(), "killed mid-sweep"
    stack.start_worker()
    job = stack.wait(job_id, _ended, timeout=240)
    assert job.state == "succeeded" and job.attempts == 2, job.message
    assert "resumed the sweep of 2 SAEs at step" in job.log
    assert set(job.result["sae_ids"]) == {"n32-k4-topk", "n64-k4-topk"}
    assert not list(job_dir.glob("sweep/.*.partial"))


def test_a_sweep_job_trains_every_combination_and_analyses_each(stack, tiny_llama_dir) -> None:
    from fastapi.testclient import TestClient

    from app.settings import Settings
    from app.web.main import create_app

    if stack.kind != "embedded":
        pytest.skip("one broker is enough for the sweep job")
    stack.start_worker()
    job_id = stack.submit("sweep", "--model", tiny_llama_dir, "--layer", 1, "--tokens", 4096,
                          "--sweep-latents", "32,64", "--sweep-k", "4", "--sweep-arch",
                          "topk,batchtopk", "--batch", 256, "--analyze-tokens", 2048)
    job = stack.wait(job_id, _ended, timeout=240)
    assert job.state == "succeeded", job.message
    names = {"n32-k4-topk", "n32-k4-batchtopk", "n64-k4-topk", "n64-k4-batchtopk"}
    assert set(job.result["saes"]) == set(job.result["sae_ids"]) == names
    assert "acts" in job.result  # it captured first, as it named no capture
    with stack.sessions() as session:
        saes = [session.get(Sae, job.result["sae_ids"][name]) for name in sorted(names)]
        assert {(s.n_latents, s.architecture) for s in saes} == {
            (32, "topk"), (32, "batchtopk"), (64, "topk"), (64, "batchtopk")}
        assert all(s.metrics["heldout_rows"] > 0 and s.analysed_tokens for s in saes)
        evals = [s.metrics["eval"] for s in saes]
        assert len({e["tokens"] for e in evals}) == 1 and len({e["ce_sae"] for e in evals}) == 4
    assert "evaluating 4 SAEs together, on the same batches" in job.log
    assert job.log.count("loading the model") == 2, "once to capture, once for all members"
    (record,) = (Path(stack.env["SAELAB_DATA_DIR"]) / "eval-records").glob("*/record.json")
    described = json.loads(record.read_text())  # their clean pass, for later evaluations
    assert (described["layer"], described["tokens"]) == (1, evals[0]["tokens"])
    settings = Settings(data_dir=Path(stack.env["SAELAB_DATA_DIR"]),
                        database_url=stack.env["SAELAB_DATABASE_URL"])
    with TestClient(create_app(settings)) as client:
        page = client.get(f"/saes/{job.result['sae_ids']['n64-k4-topk']}")
        assert "the L0–FVU frontier" in page.text and page.text.count("<tr") >= 5
        assert 'id="frontier-ce"' in page.text and "of the 4 evaluated" in page.text
        shown = client.get(f"/jobs/{job_id}").text
        assert all(f'href="/saes/{job.result["sae_ids"][name]}"' in shown for name in names)
    bad = stack.cli("jobs", "submit", "sweep", "--queue", stack.queue, "--layer", 1,
                    "--sweep-latents", "32", "--sweep-k", "32")
    assert bad.exit_code != 0 and "sweep_k" in bad.output
