"""``saelab jobs`` (submit, list, show, cancel, reap) and ``saelab worker``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from app.cli.common import (
    DbOpt,
    JsonOpt,
    app,
    cli_errors,
    int_list,
    open_sessions,
    run_job_here,
)
from app.settings import get_settings
from app.store.records import job_record

jobs_app = typer.Typer(help="Background jobs: capture, train, analyze, pipeline.",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

def _celery():
    from app.queue import make_celery

    return make_celery()


SweepLatents = Annotated[str | None, typer.Option(
    "--sweep-latents", help="sweep: the sizes, e.g. 1024,4096")]
SweepK = Annotated[str | None, typer.Option("--sweep-k", help="sweep: the k values, e.g. 16,32")]
SweepArch = Annotated[str | None, typer.Option(
    "--sweep-arch", help="sweep: topk, batchtopk or both [default: --arch]")]


@jobs_app.command("submit")
def submit(
    kind: Annotated[str, typer.Argument(help="capture, train, analyze, explain, steer_eval, "
                                        "sweep or pipeline")],
    model: Annotated[str | None, typer.Option("--model")] = None,
    layer: Annotated[int | None, typer.Option("--layer")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset")] = None,
    tokens: Annotated[int | None, typer.Option("--tokens", help="tokens to capture")] = None,
    latents: Annotated[int | None, typer.Option("--latents")] = None,
    k: Annotated[int | None, typer.Option("--k")] = None,
    site: Annotated[str | None, typer.Option("--site", help="resid, or mlp for a "
                                             "transcoder")] = None,
    arch: Annotated[str | None, typer.Option("--arch", help="topk or batchtopk")] = None,
    skip: Annotated[bool | None, typer.Option("--skip/--no-skip", help="a transcoder's "
                                              "skip path")] = None,
    matryoshka: Annotated[str | None, typer.Option(
        "--matryoshka", help="nested prefix widths, e.g. 1024,4096")] = None,
    sweep_latents: SweepLatents = None,
    sweep_k: SweepK = None,
    sweep_arch: SweepArch = None,
    nproc: Annotated[int | None, typer.Option("--nproc")] = None,
    batch: Annotated[int | None, typer.Option("--batch")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    train_tokens: Annotated[int | None, typer.Option("--train-tokens")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every")] = None,
    analyze_tokens: Annotated[int | None, typer.Option("--analyze-tokens")] = None,
    acts: Annotated[str | None, typer.Option("--acts", help="capture dir (train)")] = None,
    sae: Annotated[str | None, typer.Option("--sae", help="SAE dir (analyze)")] = None,
    explain_count: Annotated[int | None, typer.Option(
        "--explain-count", help="pipeline: LLM labels for this many latents")] = None,
    explainer: Annotated[str | None, typer.Option("--explainer")] = None,
    explainer_model: Annotated[str | None, typer.Option(
        "--explainer-model", help="the LLM explainer's model (local: a model source)")] = None,
    steer_eval_count: Annotated[int | None, typer.Option(
        "--steer-eval-count", help="pipeline: steer-evaluate this many latents")] = None,
    queue: Annotated[str | None, typer.Option("--queue")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow it until it ends")] = False,
    now: Annotated[bool, typer.Option("--now", help="run it here, through the worker's own "
                                      "code, instead of queueing it")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Queue a job (or run it here with --now); prints it (with its id)."""
    given = {key: value for key, value in locals().items() if value is not None and key not in
             ("kind", "wait", "now", "db", "as_json")}
    from app import jobs

    with cli_errors():
        if matryoshka is not None:
            given["matryoshka"] = int_list(matryoshka, "--matryoshka", "1024,4096")
        sessions = open_sessions(db)
        if now:
            job = run_job_here(sessions, kind, given)
        else:
            job = jobs.submit(sessions, _celery(), kind, given, get_settings())
        if wait and not now:
            job = _follow(sessions, job.id)
    _print(job, as_json)
    if job.state in ("failed", "cancelled"):
        raise typer.Exit(1)


def _follow(sessions, job_id: int):
    """Print progress lines until the job ends; returns the final row."""
    from app import jobs

    last = None
    for job in jobs.watch(sessions, job_id):
        line = _progress_line(job)
        if line != last:
            typer.echo(line, err=True)
            last = line
    return job


def _progress_line(job) -> str:
    stats = job.stats or {}
    parts = [f"job {job.id} {job.state}", job.stage or "", f"{100 * job.progress:5.1f}%"]
    if "tokens_per_s" in stats:
        parts.append(f"{stats['tokens_per_s']:,.0f} tok/s")
    if "loss" in stats:
        parts.append(f"loss {stats['loss']:.4f}")
    if "eta_s" in stats:
        parts.append(f"eta {stats['eta_s']:.0f}s")
    return "  ".join(p for p in parts if p)


def _print(job, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job_record(job)))
    else:
        typer.echo(f"{job.id:>5}  {job.kind:<9} {job.state:<10} {_progress_line(job)}  "
                   f"{job.message or ''}")


@jobs_app.command("list")
def list_jobs(state: Annotated[str | None, typer.Option("--state")] = None,
              limit: Annotated[int, typer.Option("--limit")] = 50,
              db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Recent jobs, newest first."""
    from app import jobs

    with cli_errors(), open_sessions(db)() as session:
        rows = jobs.recent(session, limit, state)
        if as_json:
            typer.echo(json.dumps([job_record(j) for j in rows]))
            return
        for job in rows:
            _print(job, False)


@jobs_app.command("show")
def show(job_id: Annotated[int, typer.Argument()], db: DbOpt = None,
         as_json: JsonOpt = False) -> None:
    """One job: state, stage, progress, live figures, metric series, log tail."""
    from app import jobs

    with cli_errors(), open_sessions(db)() as session:
        job = jobs.get(session, job_id)
        if as_json:
            typer.echo(json.dumps(job_record(job)))
            return
        _print(job, False)
        typer.echo(json.dumps({"params": job.params, "result": job.result}))
        if job.log:
            typer.echo(job.log)


@jobs_app.command("cancel")
def cancel(job_id: Annotated[int, typer.Argument()], db: DbOpt = None) -> None:
    """Cancel a queued job, or stop a running one (within a few seconds)."""
    from app import jobs

    with cli_errors():
        job = jobs.cancel(open_sessions(db), job_id, get_settings())
    typer.echo(f"job {job.id}: {job.message}")


@jobs_app.command("reap")
def reap_jobs(db: DbOpt = None) -> None:
    """Recover running jobs whose worker died (workers also do this on their own)."""
    from app import jobs

    with cli_errors():
        ids = jobs.reap(open_sessions(db), _celery(), get_settings())
    typer.echo(json.dumps({"recovered": ids}))


@app.command()
def worker(
    queues: Annotated[str, typer.Option("--queues", help="comma-separated")] = "gpu,cpu",
    concurrency: Annotated[int, typer.Option("--concurrency", help="processes for CPU-only "
                                             "queues (GPU queues run one job at a time)")] = 1,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Start a Celery worker process for the job queues (nothing touches CUDA before it
    runs; a worker on the gpu queue uses the solo pool, one job at a time)."""
    import os
    import socket

    from worker.tasks import app as celery_app

    names = [q.strip() for q in queues.split(",") if q.strip()]
    with cli_errors():
        if not names:
            raise ValueError("--queues names no queue")
        if concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
    solo = "gpu" in names or concurrency == 1
    argv = ["worker", "-Q", ",".join(names), f"--loglevel={loglevel}",
            "-n", f"saelab-{os.getpid()}@{socket.gethostname()}",
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    argv += ["--pool=solo"] if solo else ["--pool=prefork", f"--concurrency={concurrency}"]
    celery_app.worker_main(argv)
