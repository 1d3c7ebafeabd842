"""``saelab demo``: the whole loop on the embedded defaults, ending in the explorer.

It starts an embedded worker (a real ``saelab worker`` process on the serverless broker)
and the web server, queues one pipeline job (capture → train → analyse → evaluate →
explain) on the embedded model and corpus, follows it in the terminal (the jobs page shows
the same), then prints the explorer's URL and keeps serving until Ctrl-C. A second run
reuses the SAE the first one made (or follows its job if it is still running).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer

from app.cli.common import app, cli_errors
from app.settings import Settings, get_settings

DEMO_QUEUE = "demo"


def demo_params(layer: int, tokens: int, latents: int, k: int, explain: int,
                steer_eval: int) -> dict:
    """The demo's pipeline: lr 1e-3 and four passes over the capture suit its short run
    (held-out FVU 0.15 where one pass left 0.27); everything analysed; every live
    latent labelled offline (maxact) and scored; ``explain`` latents sampled across
    densities labelled by an LLM (Claude with an API key, an OpenAI-compatible server when
    configured, else the local model); ``steer_eval`` of the most active non-sink latents
    steer-evaluated."""
    return {"layer": layer, "tokens": tokens, "latents": latents, "k": k, "lr": 1e-3,
            "train_tokens": 4 * tokens,
            "analyze_tokens": tokens, "eval_tokens": 4096, "explain_count": explain,
            "steer_eval_count": steer_eval, "queue": DEMO_QUEUE}


@app.command()
def demo(
    layer: Annotated[int, typer.Option("--layer", help="decoder block to study")] = 6,
    tokens: Annotated[int, typer.Option("--tokens", help="activations to capture")] = 131_072,
    latents: Annotated[int, typer.Option("--latents")] = 4096,
    k: Annotated[int, typer.Option("--k")] = 32,
    explain: Annotated[int, typer.Option("--explain", help="latents to label with an LLM "
                                         "besides every latent's offline label (sampled "
                                         "across densities)")] = 4,
    steer_eval: Annotated[int, typer.Option("--steer-eval", help="most active non-sink "
                                            "latents to steer-evaluate")] = 2,
    model: Annotated[str | None, typer.Option("--model", help="[default: settings]")] = None,
    host: Annotated[str | None, typer.Option("--host")] = None,
    port: Annotated[int | None, typer.Option("--port", help="[default: settings, 8000; "
                                             "0: any free port]")] = None,
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="keep serving the "
                                        "explorer when the job is done")] = True,
) -> None:
    """Capture, train, analyse, evaluate and explain an SAE as one job, served in the
    explorer."""
    from app.store.db import open_store
    from app.web.main import create_app
    from app.web.serve import serve_in_thread

    settings = get_settings()
    params = demo_params(layer, tokens, latents, k, explain, steer_eval)
    if model:
        params["model"] = model
    _stop_on_sigterm()
    with cli_errors():
        sessions = open_store(settings.database_url)
        worker = _start_worker(settings)
        try:
            with serve_in_thread(create_app(settings), host or settings.host,
                                 settings.port if port is None else port) as base:
                url = f"{base}/"
                job_id = _demo_job(sessions, settings, params)
                typer.echo(f"explorer: {url}   (job {job_id}: {url}jobs/{job_id})", err=True)
                job = _follow(sessions, job_id, worker, settings)
                if job.state != "succeeded":
                    raise ValueError(f"the demo job {job.id} {job.state}: {job.message}")
                _summary(sessions, job, url)
                if serve:
                    typer.echo(f"serving the explorer at {url} (Ctrl-C to stop)", err=True)
                    _wait_forever()
        finally:
            _stop(worker)


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, ``kill``) ends the demo like Ctrl-C: its worker and
    server are stopped on the way out instead of outliving it."""
    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _start_worker(settings: Settings) -> subprocess.Popen:
    log_path = settings.data_dir / "demo" / "worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from app.cli import main; main()", "worker",
               "--queues", f"{DEMO_QUEUE},gpu"]
    with log_path.open("a") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _stop(worker: subprocess.Popen) -> None:
    """Stop the demo's worker: a warm shutdown first, killed if it does not end soon (a
    stage in progress would keep it for minutes; the job resumes on the next run)."""
    worker.terminate()
    try:
        worker.wait(timeout=15)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _demo_job(sessions, settings: Settings, params: dict) -> int:
    """A finished or running demo job with these params, else a new one."""
    from app import jobs
    from app.queue import make_celery

    wanted = jobs.validate("pipeline", params).model_dump(exclude_none=True)
    with sessions() as session:
        for job in jobs.recent(session, 200):
            if job.kind == "pipeline" and job.params == wanted and (
                    job.state in jobs.ACTIVE or _sae_exists(session, job)):
                return job.id
    return jobs.submit(sessions, make_celery(settings), "pipeline", params, settings).id


def _sae_exists(session, job) -> bool:
    from app.store.models import Sae

    sae_id = (job.result or {}).get("sae_id")
    return job.state == "succeeded" and sae_id is not None and session.get(Sae, sae_id) is not None


def _follow(sessions, job_id: int, worker: subprocess.Popen, settings: Settings):
    """A progress bar per stage until the job ends; returns the final row. Raises if the
    worker dies meanwhile."""
    from tqdm import tqdm

    from app import jobs

    bar, stage = None, None
    for job in jobs.watch(sessions, job_id):
        if job.stage != stage and job.state == "running":
            if bar is not None:
                bar.close()
            stage = job.stage
            bar = tqdm(total=100, desc=f"job {job.id} {stage}", unit="%", file=sys.stderr)
        if bar is not None:
            bar.n = round(100 * job.progress, 1)
            stats = job.stats or {}
            bar.set_postfix({key: f"{stats[key]:,.3g}" for key in ("tokens_per_s", "loss")
                             if key in stats}, refresh=True)
        if job.state in jobs.ACTIVE and worker.poll() is not None:
            raise OSError(f"the demo's worker stopped (exit {worker.returncode}): see "
                          f"{settings.data_dir / 'demo' / 'worker.log'}")
    if bar is not None:
        bar.close()
    return job


def _summary(sessions, job, url: str) -> None:
    from app.store.models import Sae
    from app.web.views import headline

    with sessions() as session:
        sae = session.get(Sae, job.result["sae_id"])
        summary = {"job": job.id, "sae_id": sae.id, "model": sae.model.name,
                   "layer": sae.layer, "latents": sae.n_latents, **headline(sae),
                   **label_summary(session, sae.id), "sae": sae.path,
                   "url": f"{url}saes/{sae.id}"}
    typer.echo(json.dumps(summary))


def label_summary(session, sae_id: int) -> dict:
    """How many latents carry a label, the mean scores of the offline ones (with how many
    were scored) and the mean steerability of the steer-evaluated ones."""
    from sqlalchemy import func, select

    from app.store.models import Explanation, Latent

    labelled = session.scalar(select(func.count()).where(
        Latent.sae_id == sae_id, Latent.explanation.is_not(None)))
    offline = session.execute(select(
        func.count(Explanation.detection_score), func.avg(Explanation.detection_score),
        func.avg(Explanation.fuzzing_score), func.avg(Explanation.simulation_score))
        .join(Latent).where(Latent.sae_id == sae_id, Explanation.source.like("maxact%"))).one()
    steered = session.execute(select(func.count(Latent.steerability),
                                     func.avg(Latent.steerability))
                              .where(Latent.sae_id == sae_id)).one()
    return {"labelled": labelled, "maxact_scored": offline[0],
            "maxact_detection": offline[1], "maxact_fuzzing": offline[2],
            "maxact_simulation": offline[3], "steer_evaluated": steered[0],
            "mean_steerability": steered[1]}


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        typer.echo("stopping", err=True)
