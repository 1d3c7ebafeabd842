"""``saelab explain``: queue (or run at once) an explain job for an SAE's latents."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from app.cli.common import DbOpt, app, cli_errors, open_sessions
from app.store.records import job_record


@app.command()
def explain(
    sae_id: Annotated[int, typer.Argument(help="SAE id in the store (see `saelab saes`)")],
    latents: Annotated[str | None, typer.Option("--latents", help="e.g. 0-99 or 3,7,10-20 "
                                                "[default: all]")] = None,
    explainer: Annotated[str, typer.Option("--explainer", help="auto, claude or local "
                                           "(auto: Claude when ANTHROPIC_API_KEY is set)")]
    = "auto",
    model: Annotated[str | None, typer.Option("--model", help="Claude model "
                                              "[default: settings]")] = None,
    score: Annotated[bool, typer.Option("--score/--no-score", help="score each "
                                        "explanation (detection, fuzzing)")] = True,
    now: Annotated[bool, typer.Option("--now", help="run here instead of queueing it for "
                                      "a worker")] = False,
    queue: Annotated[str | None, typer.Option("--queue")] = None,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Explain latents with Claude or the local model and score the explanations."""
    from app import jobs
    from app.store.models import Sae

    params = {"sae_id": sae_id, "latent_range": latents, "explainer": explainer,
              "explainer_model": model, "score": score, "queue": queue}
    params = {name: value for name, value in params.items() if value is not None}
    with cli_errors():
        sessions = open_sessions(db)
        with sessions() as session:
            sae = session.get(Sae, sae_id)
            if sae is None:
                raise ValueError(f"no SAE with id {sae_id} in the store (see `saelab saes`)")
            jobs.parse_latents(latents, sae.n_latents)
        if now:
            job = _run_here(sessions, params)
        else:
            from app.queue import make_celery

            job = jobs.submit(sessions, make_celery(), "explain", params)
    typer.echo(json.dumps(job_record(job)) if as_json else
               f"job {job.id} {job.state}: {job.message or ''}")
    if job.state in ("failed", "cancelled"):
        raise typer.Exit(1)


def _run_here(sessions, params: dict):
    """Create the job and run it in this process through the worker's own code path."""
    from app import jobs
    from worker.tasks import run_job

    job = jobs.create(sessions, "explain", params)
    run_job(job.id, sessions)
    with sessions() as session:
        return jobs.get(session, job.id)
