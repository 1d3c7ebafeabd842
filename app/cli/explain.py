"""``saelab explain`` and ``saelab steer-eval``: what the lab says about latents — labels
with their scores, and how well each latent steers — as jobs (or run here with ``--now``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import DbOpt, JsonOpt, app, cli_errors, open_sessions, queue_or_run
from app.store.records import job_record

LatentsOpt = Annotated[str | None, typer.Option(
    "--latents", help="e.g. 0-99 or 3,7,10-20, or all [default: all]")]
NowOpt = Annotated[bool, typer.Option("--now", help="run here instead of queueing it for "
                                      "a worker")]
QueueOpt = Annotated[str | None, typer.Option("--queue")]


@app.command()
def explain(
    sae_id: Annotated[int, typer.Argument(help="SAE id in the store (see `saelab saes`)")],
    latents: LatentsOpt = None,
    explainer: Annotated[str, typer.Option(
        "--explainer", help="maxact (offline, every latent in seconds), claude, openai "
        "(SAELAB_OPENAI_BASE_URL), local, or auto (Claude with a key, else openai when "
        "configured, else local)")] = "auto",
    model: Annotated[str | None, typer.Option("--model", help="the LLM explainer's model "
                                              "[default: settings]")] = None,
    score: Annotated[bool, typer.Option("--score/--no-score", help="score each "
                                        "explanation on held-out contexts")] = True,
    now: NowOpt = False,
    queue: QueueOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Label latents and score the labels (detection, fuzzing; simulation for maxact)."""
    params = {"sae_id": sae_id, "latent_range": _range(latents), "explainer": explainer,
              "explainer_model": model, "score": score, "queue": queue}
    _submit("explain", params, db, now, as_json)


@app.command("steer-eval")
def steer_eval(
    sae_id: Annotated[int, typer.Argument(help="SAE id in the store (see `saelab saes`)")],
    latents: LatentsOpt = None,
    prompts: Annotated[Path | None, typer.Option(
        "--prompts", help="a text file of neutral prompts, one per line [default: eight "
        "built-in ones]")] = None,
    strengths: Annotated[str, typer.Option(
        "--strengths", help="clamp strengths in units of each latent's max")] = "1,2,4,8",
    now: NowOpt = False,
    queue: QueueOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure each latent's steerability: clamp it on neutral prompts at each strength and
    read the replies back (concept carried, fluency kept)."""
    with cli_errors():
        lines = _prompt_lines(prompts) if prompts is not None else None
    params = {"sae_id": sae_id, "latent_range": _range(latents), "strengths": strengths,
              "prompts": lines, "queue": queue}
    job = _submit("steer_eval", params, db, now, as_json=False, quiet=as_json)
    if as_json:
        typer.echo(json.dumps(_steer_records(db, sae_id, job)))


def _range(latents: str | None) -> str | None:
    return None if latents is None or latents.strip().lower() == "all" else latents


def _prompt_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts {path}: cannot read it ({exc})") from None
    if not lines:
        raise ValueError(f"--prompts {path} holds no prompt")
    return lines


def _submit(kind: str, params: dict, db: str | None, now: bool, as_json: bool,
            quiet: bool = False):
    from app import jobs
    from app.store.models import Sae

    params = {name: value for name, value in params.items() if value is not None}
    with cli_errors():
        sessions = open_sessions(db)
        with sessions() as session:
            sae = session.get(Sae, params["sae_id"])
            if sae is None:
                raise ValueError(f"no SAE with id {params['sae_id']} in the store "
                                 "(see `saelab saes`)")
            jobs.parse_latents(params.get("latent_range"), sae.n_latents)
        job = queue_or_run(sessions, kind, params, now)
    if not quiet:
        typer.echo(json.dumps(job_record(job)) if as_json else
                   f"job {job.id} {job.state}: {job.message or ''}")
    if job.state in ("failed", "cancelled"):
        if quiet:
            typer.secho(f"error: job {job.id} {job.state}: {job.message}", err=True)
        raise typer.Exit(1)
    return job


def _steer_records(db: str | None, sae_id: int, job) -> list[dict]:
    """One record per steer-evaluated latent (``index``, ``steerability``,
    ``best_strength``, per-strength figures) of a finished job; [] while it is queued."""
    from sqlalchemy import select

    from app import jobs
    from app.store.models import Latent, Sae

    if job.state != "succeeded":
        return []
    with open_sessions(db)() as session:
        n = session.get(Sae, sae_id).n_latents
        wanted = jobs.parse_latents(job.params.get("latent_range"), n)
        rows = session.scalars(select(Latent.steer_eval).where(
            Latent.sae_id == sae_id, Latent.index.in_(wanted),
            Latent.steer_eval.is_not(None)).order_by(Latent.index))
        return list(rows)
