"""``saelab analyze`` (SAE -> store) and the headless views ``saes``, ``features``,
``feature`` (what the explorer shows, as text or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import DbOpt, DeviceOpt, ModelOpt, app, cli_errors, load_lm, open_sessions
from app.sae_import import DEFAULT_DATASET, DEFAULT_TOKENS, SaeFolderError, import_params
from app.settings import get_settings
from app.store.records import (
    example_record,
    explanation_record,
    job_record,
    latent_record,
    sae_record,
)


@app.command()
def analyze(
    sae: Annotated[Path, typer.Option("--sae", help="SAE directory")],
    acts: Annotated[Path | None, typer.Option(
        "--acts", help="capture to analyse [default: the SAE's own, or --dataset]")] = None,
    model: ModelOpt = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="capture this dataset first instead of using --acts")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens to analyse")] = 131_072,
    feature_map: Annotated[bool, typer.Option("--map/--no-map", help="lay the latents out "
                                              "for the feature map (UMAP)")] = True,
    db: DbOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Analyse every latent of an SAE and store the result (replacing an earlier one)."""
    from app.store.persist import save_analysis, token_texts
    from training.analysis.latents import analyse_capture, checked_capture
    from training.sae.folder import load_sae

    with cli_errors():
        sae_module, cfg = load_sae(sae)
        sessions = open_sessions(db)  # fail on a bad --db before the long part
        lm = load_lm(model or cfg.get("model_name"), device)
        if lm.d_model != sae_module.cfg.d_in:  # before a fresh --dataset capture
            raise ValueError(f"--sae {sae} has d_in={sae_module.cfg.d_in} but {lm.name} has "
                             f"d={lm.d_model}: the SAE was not trained on this model")
        store = checked_capture(sae_module, lm.name, lm.d_model,
                                _source(lm, cfg, sae, acts, dataset, tokens),
                                sae_label=f"--sae {sae}", acts_label="--acts")
        result = analyse_capture(sae_module.to(lm.device), store,
                                 lm.model.get_output_embeddings().weight, max_tokens=tokens)
        sae_id = save_analysis(sessions, sae_dir=sae, sae_cfg=cfg, model_name=lm.name,
                               d_model=lm.d_model, n_layers=lm.n_layers, result=result,
                               token_text=token_texts(lm.tokenizer, result))
        if feature_map:
            from app.store.persist import save_feature_map
            from training.analysis.feature_map import decoder_map

            save_feature_map(sessions, sae_id, decoder_map(sae_module.w_dec))
    typer.echo(json.dumps({"sae_id": sae_id, "latents": len(result.density),
                           "tokens": result.tokens}))


def _source(lm, cfg: dict, sae: Path, acts: Path | None, dataset: str | None,
            tokens: int) -> Path:
    """The capture to analyse: --acts, a fresh capture of --dataset, or the SAE's own."""
    if acts is not None:
        return acts
    if dataset is not None:
        return _capture_for(lm, cfg, dataset, tokens)
    if cfg.get("activations"):
        return Path(cfg["activations"])
    raise ValueError(f"--sae {sae} does not name the capture it was trained on: "
                     "give --acts or --dataset")


def _capture_for(lm, cfg: dict, dataset: str, tokens: int) -> Path:
    from training.data.capture import CaptureConfig, capture

    layer, site = int(cfg["hook_layer"]), cfg.get("site", "resid")
    where = f"L{layer}" if site == "resid" else f"L{layer}-{site}"
    name = f"{lm.name.replace('/', '--')}-{where}-{Path(dataset).name}-{tokens}"
    out = get_settings().data_dir / "analysis" / name
    capture(lm, CaptureConfig(layer=layer, tokens=tokens, dataset=dataset, site=site), out)
    return out


@app.command()
def saes(model: ModelOpt = None, db: DbOpt = None,
         as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List the SAEs in the store."""
    from app.store.queries import list_saes

    with cli_errors(), open_sessions(db)() as session:
        rows = [sae_record(s) for s in list_saes(session, model)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        typer.echo(f"{r['id']:>4}  {r['model']}  L{r['layer']}  n={r['n_latents']} "
                   f"k={r['k']} {r['architecture']}  {r['path']}")


@app.command()
def features(
    sae_id: Annotated[int, typer.Argument(help="SAE id (see `saelab saes`)")],
    search: Annotated[str | None, typer.Option("--search", help="words of the "
                                               "explanation")] = None,
    sort: Annotated[str, typer.Option("--sort", help="index, density, max_activation or "
                                      "mean_activation")] = "index",
    limit: Annotated[int, typer.Option("--limit")] = 50,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List an SAE's latents."""
    from app.store.queries import list_latents

    with cli_errors(), open_sessions(db)() as session:
        _check_sae(session, sae_id)
        rows = [latent_record(lat) for lat in list_latents(session, sae_id, search=search,
                                                         sort=sort, limit=limit)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for r in rows:
        top = " ".join(repr(t) for t, _ in r["top_logits"][:5])
        typer.echo(f"{r['index']:>6}  density {r['density']:.2e}  max {r['max_activation']:.2f}"
                   f"  {r['explanation'] or ''}  [{top}]")


@app.command()
def feature(
    sae_id: Annotated[int, typer.Argument(help="SAE id")],
    index: Annotated[int, typer.Argument(help="latent index")],
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """One latent: statistics, logit effects, neighbours and examples."""
    from app.store.queries import explanations_for, get_latent

    with cli_errors(), open_sessions(db)() as session:
        _check_sae(session, sae_id)
        latent = get_latent(session, sae_id, index)
        if latent is None:
            raise ValueError(f"SAE {sae_id} has no latent {index}")
        row = latent_record(latent)
        row["examples"] = [example_record(e) for e in latent.examples]
        row["explanations"] = [explanation_record(e)
                               for e in explanations_for(session, latent.id)]
    if as_json:
        typer.echo(json.dumps(row))
        return
    typer.echo(f"latent {index}: density {row['density']:.3e}, mean {row['mean_activation']:.3f}"
               f", max {row['max_activation']:.3f}")
    for item in row["explanations"][:1]:
        typer.echo(f"explanation: {item['text']!r} (score {item['score']}, detection "
                   f"{item['detection_score']}, fuzzing {item['fuzzing_score']}, "
                   f"{item['source']})")
    typer.echo("promotes: " + " ".join(repr(t) for t, _ in row["top_logits"]))
    typer.echo("suppresses: " + " ".join(repr(t) for t, _ in row["bottom_logits"]))
    for ex in row["examples"]:
        text = "".join(f"[{t}]" if a > 0 else t for t, a in zip(ex["tokens"],
                                                                ex["activations"], strict=True))
        label = "top" if ex["kind"] == "top" else f"q{ex['bucket']}"
        typer.echo(f"{label:>4} {max(ex['activations']):6.2f}  {text!r}")


def _check_sae(session, sae_id: int) -> None:
    from app.store.models import Sae

    if session.get(Sae, sae_id) is None:
        raise ValueError(f"no SAE with id {sae_id} in the store (see `saelab saes`)")


@app.command("export")
def export(
    sae_id: Annotated[int, typer.Argument(help="SAE id (see `saelab saes`)")],
    out: Annotated[Path, typer.Option("--out", help="JSON file to write")],
    db: DbOpt = None,
) -> None:
    """Write an SAE's features as Neuronpedia-style JSON."""
    from app.store.exchange import export_sae

    with cli_errors():
        if out.exists():
            raise ValueError(f"--out {out} exists; choose another file")
        with open_sessions(db)() as session:
            data = export_sae(session, sae_id)
        partial = out.with_name(f".{out.name}.partial")
        try:
            partial.write_text(json.dumps(data))
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
    typer.echo(json.dumps({"sae_id": sae_id, "features": len(data["features"]),
                           "out": str(out)}))


@app.command("import")
def import_(
    file: Annotated[Path, typer.Argument(help="a file written by `saelab export`")],
    path: Annotated[str | None, typer.Option(
        "--path", help="the SAE path to file it under [default: the exported one]")] = None,
    db: DbOpt = None,
) -> None:
    """Load a Neuronpedia-style feature export into the store (replacing the same SAE's)."""
    from app.store.exchange import import_sae, read_export

    with cli_errors():
        data = read_export(file)
        sae_id = import_sae(open_sessions(db), data, path=path)
    typer.echo(json.dumps({"sae_id": sae_id, "features": len(data["features"])}))


@app.command("import-sae")
def import_sae_folder(
    folder: Annotated[Path, typer.Argument(help="an SAE folder: saelab's, SAELens', "
                                           "sparsify's, or dictionary_learning's ae.pt + "
                                           "config.json")],
    model: ModelOpt = None,
    layer: Annotated[int | None, typer.Option("--layer", help="the block whose output it "
                                              "reads [default: the folder's]")] = None,
    dataset: Annotated[str, typer.Option("--dataset", help="text to analyse it on (it is "
                                         "captured at the SAE's layer)")] = DEFAULT_DATASET,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens to analyse")]
    = DEFAULT_TOKENS,
    now: Annotated[bool, typer.Option("--now", help="run here instead of queueing it")]
    = False,
    db: DbOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Bring an SAE trained elsewhere (SAELens, sparsify, dictionary_learning) into the lab:
    checked now, then analysed (an analyze job capturing --dataset) so the explorer,
    probing and steering work on it."""
    from app.cli.common import queue_or_run

    with cli_errors():
        try:
            params, found = import_params(folder, model=model, layer=layer,
                                          dataset=dataset, tokens=tokens)
        except SaeFolderError as exc:
            raise ValueError(f"{exc}: give --{exc.field}" if exc.missing else str(exc)) \
                from None
        if not as_json:
            typer.echo(f"{folder}: {found.describe()}")
        job = queue_or_run(open_sessions(db), "analyze", params, now)
    typer.echo(json.dumps(job_record(job)) if as_json else
               f"job {job.id} {job.state}: {job.message or ''}")
    if job.state in ("failed", "cancelled"):
        raise typer.Exit(1)
