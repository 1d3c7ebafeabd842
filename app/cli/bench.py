"""``saelab bench ...`` commands: each prints one JSON line.

The maths and the timing live in ``training.bench`` (and ``app.bench`` for the store,
jobs and the explorer); these commands choose sizes, find or capture the activations the
train benchmark needs (cached under the data dir, so a second run starts at once), read
the SAE the steer and web benchmarks use from the store, and print the result.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import (
    DatasetOpt,
    DbOpt,
    DeviceOpt,
    ModelOpt,
    bench_app,
    cli_errors,
    load_lm,
)
from app.settings import get_settings

SaeIdOpt = Annotated[int | None, typer.Option("--sae-id", help="SAE in the store "
                                              "[default: the newest]")]
STEER_PROMPT = "Write a short story about a lighthouse keeper and a storm."


@bench_app.command("capture")
def bench_capture(
    model: ModelOpt = None,
    layer: Annotated[int | None, typer.Option(
        "--layer", help="[default: a quarter of the way into the model]")] = None,
    batches: Annotated[int, typer.Option("--batches", help="timed batches")] = 6,
    batch: Annotated[int, typer.Option("--batch", help="contexts per batch")] = 8,
    context: Annotated[int, typer.Option("--context")] = 128,
    dataset: DatasetOpt = "embedded",
    device: DeviceOpt = None,
) -> None:
    """Early-stop capture vs a full forward with output_hidden_states=True (tokens/s)."""
    from training.bench.capture import bench_capture as run

    with cli_errors():
        if batches < 1 or batch < 1:
            raise ValueError("--batches and --batch must be positive")
        lm = load_lm(model, device)
        chosen = layer if layer is not None else lm.n_layers // 4
        result = run(lm, layer=chosen, batches=batches, batch=batch, context=context,
                     dataset=dataset)
    typer.echo(json.dumps(result))


@bench_app.command("train")
def bench_train(
    acts: Annotated[Path | None, typer.Option(
        "--acts", help="capture directory [default: capture --layer of --model once, "
        "cached under the data dir]")] = None,
    model: ModelOpt = None,
    layer: Annotated[int, typer.Option("--layer", help="layer to capture")] = 15,
    latents: Annotated[int, typer.Option("--latents")] = 8192,
    k: Annotated[int, typer.Option("--k")] = 32,
    batch: Annotated[int, typer.Option("--batch")] = 4096,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 81_920,
    holdout: Annotated[int, typer.Option("--holdout", help="held-out rows")] = 8192,
    lr: Annotated[float | None, typer.Option("--lr", help="[default: 2e-4/sqrt(n/2^14)]")
                  ] = None,
    saelens: Annotated[bool, typer.Option("--saelens/--no-saelens",
                                          help="compare with SAELens when installed")] = True,
    device: DeviceOpt = None,
) -> None:
    """saelab's trainer vs SAELens' TopK trainer: tokens/s and held-out FVU."""
    from training.bench.train import bench_train as run

    with cli_errors():
        if tokens < batch:
            raise ValueError(f"--tokens {tokens} must be at least one --batch ({batch})")
        if holdout < 1:
            raise ValueError(f"--holdout must be positive (got {holdout})")
        acts = acts or _bench_capture(model, layer, max(tokens + holdout, 10 * holdout),
                                      device)
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            result = run(acts, Path(work), n_latents=latents, k=k, batch=batch,
                         tokens=tokens, holdout=holdout, lr=lr, with_saelens=saelens)
    if "skipped" in result["saelens"]:
        typer.secho(f"notice: SAELens comparison skipped — {result['saelens']['skipped']}",
                    err=True, fg=typer.colors.YELLOW)
    typer.echo(json.dumps(result))


def _bench_capture(model: str | None, layer: int, rows: int, device: str | None) -> Path:
    """A capture of at least ``rows`` rows, reused from the data dir when present."""
    from training.data.activations import ActivationError, Manifest
    from training.data.capture import CaptureConfig, capture

    settings = get_settings()
    name = (model or settings.default_model).replace("/", "--")
    out = settings.data_dir / "bench" / f"{name}-L{layer}-{rows}"
    try:
        if Manifest.load(out).rows >= rows:
            return out
    except ActivationError:
        pass
    lm = load_lm(model, device)
    capture(lm, CaptureConfig(layer=layer, tokens=rows, dtype="fp32"), out)
    return out


@bench_app.command("analysis")
def bench_analysis(
    sae: Annotated[Path, typer.Option("--sae", help="SAE directory")],
    acts: Annotated[Path | None, typer.Option("--acts", help="[default: the SAE's "
                                              "capture]")] = None,
    tokens: Annotated[int, typer.Option("--tokens")] = 65_536,
    device: DeviceOpt = None,
) -> None:
    """Per-latent analysis tokens/s vs plain SAE encoding of the same tokens."""
    from training.bench.analysis import bench_analysis as run
    from training.data.activations import ActivationStore
    from training.sae.folder import load_sae

    with cli_errors():
        sae_module, cfg = load_sae(sae)
        lm = load_lm(cfg.get("model_name"), device)
        store = ActivationStore(acts or Path(cfg.get("activations", "")))
        result = run(sae_module.to(lm.device), store, lm.model.get_output_embeddings().weight,
                     tokens=tokens)
    typer.echo(json.dumps(result))


@bench_app.command("store")
def bench_store(
    db: Annotated[str, typer.Option("--db", help="URL of an EMPTY database to fill")],
    latents: Annotated[int, typer.Option("--latents")] = 16_384,
    examples: Annotated[int, typer.Option("--examples", help="per latent")] = 70,
    profile: Annotated[str, typer.Option(
        "--profile", help="demo: windows like the demo SAE's (a third of tokens distinct, 5% "
                          "firing); dense: every token distinct and firing")] = "demo",
) -> None:
    """Persist time of a synthetic analysis and the explorer's query latencies (ms)."""
    from app.bench.store import bench_store as run

    with cli_errors():
        result = run(db, n=latents, examples=examples, profile=profile)
    typer.echo(json.dumps(result))


@bench_app.command("jobs")
def bench_jobs(
    acts: Annotated[Path, typer.Option("--acts", help="capture directory")],
    latents: Annotated[int, typer.Option("--latents")] = 4096,
    k: Annotated[int, typer.Option("--k")] = 32,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 262_144,
) -> None:
    """Wall time of a training run as a job through a worker vs the same run directly."""
    from app.bench.jobs import bench_jobs as run

    with cli_errors():
        result = run(acts, latents, k, tokens)
    typer.echo(json.dumps(result))


def _store_settings(db: str | None):
    from app.settings import Settings

    return Settings(database_url=db) if db else get_settings()


def _store_sae(settings, sae_id: int | None, densest: int = 0) -> dict:
    """The SAE row ``sae_id`` (the newest when None) as a dict, with the max activation of
    its ``densest`` most often firing latents."""
    from app.store.db import open_store
    from app.store.models import Sae
    from app.store.queries import list_latents, list_saes

    sessions = open_store(settings.database_url)
    try:
        with sessions() as session:
            saes = [session.get(Sae, sae_id)] if sae_id is not None else list_saes(session)[:1]
            if not saes or saes[0] is None:
                raise ValueError(f"--sae-id: there is no SAE {sae_id} in the store"
                                 if sae_id is not None else "the store holds no SAE yet")
            sae = saes[0]
            maxima = {lat.index: lat.max_activation
                      for lat in list_latents(session, sae.id, sort="density", limit=densest)}
            return {"id": sae.id, "path": sae.path, "model": sae.model.name,
                    "layer": sae.layer, "n_latents": sae.n_latents, "maxima": maxima}
    finally:
        sessions.kw["bind"].dispose()


@bench_app.command("steer")
def bench_steer(
    sae_id: SaeIdOpt = None,
    db: DbOpt = None,
    tokens: Annotated[int, typer.Option("--tokens", help="new tokens per reply")] = 128,
    repeats: Annotated[int, typer.Option("--repeats")] = 5,
    features: Annotated[int, typer.Option("--features", help="densest latents clamped at "
                                          "4× their max activation")] = 3,
    prompt: Annotated[str, typer.Option("--prompt")] = STEER_PROMPT,
    device: DeviceOpt = None,
) -> None:
    """Decode tokens/s of a store SAE's model steered by clamped latents vs unsteered."""
    from training.bench.steering import bench_steering as run
    from training.data.models import load_model
    from training.inference.steering import Steer
    from training.sae.folder import load_sae

    with cli_errors():
        if tokens < 1 or features < 1:
            raise ValueError("--tokens and --features must be positive")
        settings = _store_settings(db)
        sae = _store_sae(settings, sae_id, densest=features)
        lm = load_model(sae["model"], data_dir=settings.data_dir, device=device)
        module, _ = load_sae(Path(sae["path"]), lm.device)
        steers = [Steer(feature, "clamp", 4.0) for feature in sae["maxima"]]
        result = run(lm, module, sae["layer"], steers, sae["maxima"], prompt=prompt,
                     tokens=tokens, repeats=repeats)
    typer.echo(json.dumps({"sae_id": sae["id"], "features": list(sae["maxima"]), **result}))


@bench_app.command("web")
def bench_web(
    sae_id: SaeIdOpt = None,
    db: DbOpt = None,
    clients: Annotated[int, typer.Option("--clients", help="concurrent clients")] = 32,
    requests: Annotated[int, typer.Option("--requests", help="timed GETs per route")] = 400,
    seed: Annotated[int, typer.Option("--seed", help="of the random latent indices")] = 0,
) -> None:
    """Explorer latency under load: feature pages vs /healthz, served by uvicorn."""
    from app.bench.web import bench_web as run

    with cli_errors():
        settings = _store_settings(db)
        sae = _store_sae(settings, sae_id)
        result = run(settings, sae["id"], sae["n_latents"], clients=clients,
                     requests=requests, seed=seed)
    typer.echo(json.dumps(result))


@bench_app.command("explain")
def bench_explain(
    sae_id: SaeIdOpt = None,
    db: DbOpt = None,
    latents: Annotated[str, typer.Option("--latents", help="latents to explain, or all")]
    = "0-31",
    explainer: Annotated[str, typer.Option("--explainer", help="maxact, auto, claude, "
                                           "openai or local")] = "local",
) -> None:
    """Explanations per minute and their scores: runs an explain job here (latents already
    explained with the same settings are skipped and not counted)."""
    from app.bench.explain import bench_explain as run

    with cli_errors():
        settings = _store_settings(db)
        sae = _store_sae(settings, sae_id)
        result = run(settings, sae["id"], latents, explainer)
    typer.echo(json.dumps(result))


@bench_app.command("steer-eval")
def bench_steer_eval(
    sae_id: SaeIdOpt = None,
    db: DbOpt = None,
    latents: Annotated[int, typer.Option("--latents", help="the most active non-sink "
                                         "latents to steer-evaluate")] = 32,
    strengths: Annotated[str, typer.Option("--strengths")] = "1,2,4,8",
) -> None:
    """Steer-eval latents per minute and the distribution of their steerability (a
    steer_eval job run here)."""
    from app.bench.explain import bench_steer_eval as run

    with cli_errors():
        if latents < 1:
            raise ValueError("--latents must be positive")
        settings = _store_settings(db)
        sae = _store_sae(settings, sae_id)
        result = run(settings, sae["id"], latents, strengths)
    typer.echo(json.dumps(result))
