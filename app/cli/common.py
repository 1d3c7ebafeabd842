"""What every ``saelab`` command module shares: the root Typer app, the common options and
the error wrapper. Command modules import this one and nothing of each other."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from app.settings import get_settings

app = typer.Typer(help="saelab: sparse autoencoders for Llama-family models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks (print one JSON line).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str | None, typer.Option("--model", help="'smollm2-135m', a local "
                                              "checkpoint dir or a hub id [default: settings]")]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="'embedded', a local "
                                         ".txt/.jsonl/.parquet file or dir, or an HF dataset")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cuda or cpu [default: auto]")]
DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL [default: "
                                           "SAELAB_DATABASE_URL or <data dir>/saelab.db]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="the model's weights: fp32, "
                                            "or bf16 (faster where the device multiplies "
                                            "bf16 natively)")]
PRECISIONS = ("fp32", "bf16")


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn the engine's input errors into a one-line message and exit status 2."""
    try:
        yield
    except (ValueError, OSError) as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None


def int_list(text: str, flag: str, example: str = "16,32") -> list[int]:
    """A flag's comma-separated integers (``4096,16384``); an error naming the flag."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected a number or a list like {example} "
                         f"(got {text!r})") from None


def layer_list(text: str) -> list[int]:
    """``--layer`` as one block or a comma-separated list of distinct blocks."""
    layers = int_list(text, "--layer", "4,8,12")
    if len(set(layers)) != len(layers):
        raise ValueError(f"--layer: {text!r} names a block twice")
    return layers


def load_lm(model: str | None, device: str | None, precision: str = "fp32"):
    """The model named by --model (default: settings), converted under the data dir, with
    its weights in ``precision`` (fp32, bf16)."""
    from training.data.models import load_model, parse_dtype

    if precision not in PRECISIONS:
        raise ValueError(f"--precision: choose fp32 or bf16 (got {precision!r})")
    settings = get_settings()
    return load_model(model or settings.default_model, data_dir=settings.data_dir,
                      device=device, dtype=parse_dtype(precision))


def open_sessions(db: str | None):
    """A session factory on --db (default: settings), migrated to the newest schema."""
    from app.store.db import open_store

    return open_store(db or get_settings().database_url)


def run_job_here(sessions, kind: str, params: dict):
    """Create a job and run it in this process through the worker's own code path
    (``--now``); returns its final row."""
    from app import jobs
    from worker.tasks import run_job

    job = jobs.create(sessions, kind, params, get_settings())
    run_job(job.id, sessions)
    with sessions() as session:
        return jobs.get(session, job.id)


def queue_or_run(sessions, kind: str, params: dict, now: bool):
    """Run the job here (``now``) or queue it for a worker; returns its row."""
    if now:
        return run_job_here(sessions, kind, params)
    from app import jobs
    from app.queue import make_celery

    return jobs.submit(sessions, make_celery(), kind, params, get_settings())
