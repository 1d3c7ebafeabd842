"""``saelab capture``, ``train`` and ``eval``: the engine's steps, run in this process
(``--nproc`` trains under torchrun)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from app.cli.common import (
    DatasetOpt,
    DeviceOpt,
    ModelOpt,
    PrecisionOpt,
    app,
    cli_errors,
    int_list,
    layer_list,
    load_lm,
)

T = TypeVar("T")


@app.command()
def capture(
    layer: Annotated[str, typer.Option("--layer", help="decoder block (0-based), or several "
                                       "as 4,8,12 (one forward, one folder per layer)")],
    tokens: Annotated[int, typer.Option("--tokens", help="activations to capture")],
    out: Annotated[Path, typer.Option("--out", help="output directory (with several layers: "
                                      "OUT/L4, OUT/L8, ...)")],
    model: ModelOpt = None,
    dataset: DatasetOpt = "embedded",
    context: Annotated[int, typer.Option("--context", help="tokens per context")] = 128,
    dtype: Annotated[str, typer.Option("--dtype", help="fp16, bf16 or fp32")] = "fp16",
    batch: Annotated[int, typer.Option("--batch", help="contexts per forward")] = 16,
    split: Annotated[str, typer.Option("--split", help="HF dataset split")] = "train",
    text_column: Annotated[str, typer.Option("--text-column")] = "text",
    precision: PrecisionOpt = "fp32",
    site: Annotated[str, typer.Option("--site", help="resid (the block's output) or mlp "
                                      "(its MLP's input and output, to train a transcoder)")
                    ] = "resid",
    device: DeviceOpt = None,
) -> None:
    """Capture block LAYER's residual-stream activations (or its MLP's input and output)
    into sharded safetensors."""
    from training.data.capture import CaptureConfig, capture_layers

    with cli_errors():
        layers = layer_list(layer)
        cfg = CaptureConfig(layer=layers[0], tokens=tokens, dataset=dataset, context=context,
                            dtype=dtype, batch_contexts=batch, split=split,
                            text_column=text_column, site=site)
        outs = {layers[0]: out} if len(layers) == 1 else {
            index: out / f"L{index}" for index in layers}
        lm = load_lm(model, device, precision)
        manifests = capture_layers(lm, cfg, outs)
    for index, manifest in manifests.items():
        what = "MLP input/output pairs" if manifest.site == "mlp" else "activations"
        typer.echo(f"captured {manifest.rows} {what} of {manifest.model} layer "
                   f"{manifest.layer} in {len(manifest.shards)} shards -> {outs[index]}")


def _parse_widths(text: str | None) -> list[int]:
    """``--matryoshka`` widths (checked by SaeConfig); none when not given."""
    return int_list(text, "--matryoshka", "1024,4096") if text else []


@app.command()
def train(
    latents: Annotated[str, typer.Option("--latents", help="dictionary size n (a list such "
                                         "as 4096,16384 trains a sweep)")],
    k: Annotated[str, typer.Option("--k", help="active latents per token (or a list)")],
    out: Annotated[Path, typer.Option("--out", help="output SAE directory (a sweep: one "
                                      "folder per SAE inside it)")],
    acts: Annotated[Path | None, typer.Option("--acts", help="capture directory (without it: "
                                              "train from --model as it reads)")] = None,
    model: ModelOpt = None,
    layer: Annotated[str | None, typer.Option(
        "--layer", help="without --acts: the block, or several as 4,8,12 (one forward for "
        "all, OUT/L4, ...)")] = None,
    dataset: DatasetOpt = "embedded",
    buffer_rows: Annotated[int, typer.Option("--buffer-rows", help="without --acts: rows in "
                                             "the in-memory shuffle buffer")] = 1 << 18,
    arch: Annotated[str | None, typer.Option(
        "--arch", help="topk or batchtopk (or both: topk,batchtopk) [default: topk; "
        "batchtopk for a transcoder]")] = None,
    skip: Annotated[bool, typer.Option("--skip", help="a transcoder's linear skip path "
                                       "(skip-transcoder)")] = False,
    tokens: Annotated[int | None, typer.Option("--tokens", help="training tokens "
                                               "[default: one pass]")] = None,
    batch: Annotated[int, typer.Option("--batch", help="global batch in tokens")] = 4096,
    lr: Annotated[float | None, typer.Option("--lr", help="[default: 2e-4/sqrt(n/2^14)]")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    checkpoint_every: Annotated[int, typer.Option(
        "--checkpoint-every", help="steps between checkpoints (0: none)")] = 200,
    dead_tokens: Annotated[int | None, typer.Option(
        "--dead-tokens", help="tokens without firing before a latent counts as dead (and "
        "AuxK trains it) [default: half the run, 2 batches to 10M]")] = None,
    matryoshka: Annotated[str | None, typer.Option(
        "--matryoshka", help="nested prefix widths that must each reconstruct the input, "
        "e.g. 1024,4096 (Matryoshka SAE)")] = None,
    precision: Annotated[str, typer.Option("--precision", help="fp32, or bf16 for the "
                                           "encoder's matmul (fp32 weights)")] = "fp32",
    nproc: Annotated[int, typer.Option("--nproc", help="data-parallel processes")] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the last "
                                         "checkpoint (of a run or a sweep)")] = False,
) -> None:
    """Train a TopK / BatchTopK SAE on captured activations (or straight from a model); on
    a capture made with --site mlp, a transcoder."""
    options = dict(locals())
    with cli_errors():
        try:
            metrics = _train(options)
        except KeyboardInterrupt:
            typer.secho(_interrupted(Path(options["out"])), err=True, fg=typer.colors.RED)
            raise typer.Exit(130) from None
    typer.echo(json.dumps(metrics))


def _interrupted(out: Path) -> str:
    """What a train command stopped by Ctrl-C says: whether ``--resume`` has a checkpoint
    (a run's, or a sweep's under OUT) to continue from."""
    from training.train.run import CHECKPOINT, partial_dir
    from training.train.sweep_checkpoint import SWEEP_CHECKPOINT

    if (partial_dir(out) / CHECKPOINT).is_file() or any(
            out.glob(f"**/.*.partial/{SWEEP_CHECKPOINT}")):
        return ("interrupted: the last checkpoint is kept; the same command with --resume "
                "continues from it")
    return "interrupted before the first checkpoint: nothing was kept"


def _train(o: dict) -> dict:
    """One run, a sweep, or a run streaming from the model, as the options say."""
    from training.data.activations import Manifest

    sizes, ks = int_list(o["latents"], "--latents"), int_list(o["k"], "--k")
    manifest = Manifest.load(o["acts"]) if o["acts"] is not None else None
    site = manifest.site if manifest is not None else "resid"
    archs = [a.strip() for a in (o["arch"] or (
        "batchtopk" if site == "mlp" else "topk")).split(",")]
    spec = {"acts": str(o["acts"]), "out": str(o["out"]), "resume": o["resume"],
            "sae": {"d_in": 0, "n_latents": sizes[0], "k": ks[0], "architecture": archs[0],
                    "dead_tokens": o["dead_tokens"], "site": site, "skip": o["skip"],
                    "matryoshka_widths": _parse_widths(o["matryoshka"])},
            "train": {key: o[key] for key in ("batch", "tokens", "lr", "seed",
                                              "checkpoint_every", "precision")}}
    sweep = len(sizes) * len(ks) * len(archs) > 1
    if o["acts"] is None:
        if o["nproc"] != 1:
            raise ValueError("training from --model (no --acts) runs in one process: drop "
                             "--nproc")
        return _run_streaming(spec, o, (sizes, ks, archs) if sweep else None)
    if o["layer"] is not None and layer_list(o["layer"]) != [manifest.layer]:
        raise ValueError(f"--layer {o['layer']}: --acts {o['acts']} holds block "
                         f"{manifest.layer} only (drop --layer, or train from --model)")
    spec["sae"]["d_in"] = manifest.d_model
    if sweep:
        if o["nproc"] != 1:
            raise ValueError("a sweep (several --latents, --k or --arch) runs in one "
                             "process: drop --nproc")
        return _run_sweep(spec, sizes, ks, archs)
    _validate_train_spec(spec, o["nproc"])
    return _run_train(spec, o["nproc"])


def _run_streaming(spec: dict, o: dict,
                   sweep: tuple[list[int], list[int], list[str]] | None) -> dict:
    """Train from --model's block(s) --layer as it reads --dataset (no capture on disk):
    one SAE, or every combination of ``sweep`` at every block, from one read of the
    stream."""
    from training.data.capture import CaptureConfig
    from training.sae.autoencoder import SaeConfig
    from training.train.stream import StreamConfig, check_buffer, train_streaming
    from training.train.stream_sweep import train_layer_sweep
    from training.train.trainer import TrainConfig

    if o["layer"] is None or o["tokens"] is None:
        raise ValueError("training without --acts needs --layer and --tokens (and --model)")
    layers = layer_list(o["layer"])
    stream = StreamConfig(CaptureConfig(layer=layers[0], tokens=o["tokens"],
                                        dataset=o["dataset"], dtype="fp32"),
                          buffer_rows=o["buffer_rows"])
    cfg = TrainConfig.from_dict(spec["train"])
    check_buffer(stream, cfg)
    spec["sae"]["d_in"] = 1  # the model's d is not known yet: check the rest first
    _layer_members(spec, layers, sweep)
    lm = load_lm(o["model"], None)
    for layer in layers:
        lm.check_layer(layer)
    spec["sae"]["d_in"] = lm.d_model
    if sweep is None and len(layers) == 1:
        return train_streaming(lm, Path(spec["out"]), SaeConfig.from_dict(spec["sae"]), cfg,
                               stream, resume=o["resume"])
    names, groups = _layer_members(spec, layers, sweep)
    return _sweep_result(spec, names, train_layer_sweep(lm, groups, cfg, stream,
                                                        resume=o["resume"]))


def _layer_members(spec: dict, layers: list[int],
                   sweep: tuple[list[int], list[int], list[str]] | None
                   ) -> tuple[list[str], dict[int, dict]]:
    """Every block's members, {layer: {OUT/name: config}}, and their names in order: at
    one block OUT/n<n>-k<k>-<arch>; at several OUT/L<layer>/n<n>-k<k>-<arch>, or
    OUT/L<layer> for one SAE per block."""
    from training.sae.autoencoder import SaeConfig

    configs = ({"": SaeConfig.from_dict(spec["sae"])} if sweep is None
               else _sweep_configs(spec, *sweep))
    names, groups = [], {}
    for layer in layers:
        layer_names, groups[layer] = _members(spec, configs,
                                              f"L{layer}" if len(layers) > 1 else "")
        names += layer_names
    return names, groups


def _run_sweep(spec: dict, sizes: list[int], ks: list[int], archs: list[str]) -> dict:
    """Every combination from one read of --acts, each to OUT/n<n>-k<k>-<arch>."""
    from training.train.sweep import train_sweep
    from training.train.trainer import TrainConfig

    names, members = _members(spec, _sweep_configs(spec, sizes, ks, archs), "")
    results = train_sweep(Path(spec["acts"]), members, TrainConfig.from_dict(spec["train"]),
                          resume=spec["resume"])
    return _sweep_result(spec, names, results)


def _members(spec: dict, configs: dict, prefix: str) -> tuple[list[str], dict]:
    """The folder names (``prefix/name``, or ``name`` / ``prefix`` alone) of ``configs``
    ({name: config}) and {OUT/folder: config}."""
    names = ["/".join(part for part in (prefix, name) if part) for name in configs]
    out = Path(spec["out"])
    return names, {out / name: cfg for name, cfg in zip(names, configs.values(), strict=True)}


def _sweep_configs(spec: dict, sizes: list[int], ks: list[int], archs: list[str]) -> dict:
    """Every combination as {n<n>-k<k>-<arch>: config}."""
    from training.sae.autoencoder import SaeConfig
    from training.train.sweep import sweep_configs

    base = {**spec["sae"], "n_latents": max(sizes), "k": min(ks), "matryoshka_widths": ()}
    return sweep_configs(SaeConfig.from_dict(base), sizes, ks, archs,
                         spec["sae"]["matryoshka_widths"])


def _sweep_result(spec: dict, names: list[str], results: list[dict]) -> dict:
    out = Path(spec["out"])
    return {"sweep": [{"name": name, "out": str(out / name), **metrics}
                      for name, metrics in zip(names, results, strict=True)]}


def _validate_train_spec(spec: dict, nproc: int) -> None:
    import torch

    from training.sae.autoencoder import SaeConfig
    from training.train.trainer import TrainConfig

    SaeConfig.from_dict(spec["sae"])
    TrainConfig.from_dict(spec["train"])
    if nproc < 1:
        raise ValueError("--nproc must be at least 1")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {nproc} exceeds the {torch.cuda.device_count()} GPUs here")
    if spec["train"]["batch"] % nproc:
        raise ValueError(f"--batch {spec['train']['batch']} is not divisible by --nproc {nproc}")


def _run_train(spec: dict, nproc: int) -> dict:
    from training.train.launch import run_spec

    if nproc == 1:
        return run_spec(spec)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        result_path = Path(tmp) / "metrics.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", "-m", "training.train.launch", str(spec_path),
                   str(result_path)]
        failed = subprocess.run(command, check=False).returncode != 0
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if "error" in result:
        raise ValueError(result["error"])
    if failed or not result:
        _drop_unresumable(Path(spec["out"]))
        raise ValueError(f"distributed training with --nproc {nproc} failed (see above)")
    return result


def _drop_unresumable(out: Path) -> None:
    """A rank killed by torchrun runs no cleanup: remove a partial run with no checkpoint."""
    from training.train.run import CHECKPOINT, partial_dir

    work = partial_dir(out)
    if work.exists() and not (work / CHECKPOINT).is_file():
        shutil.rmtree(work, ignore_errors=True)


@app.command("eval")
def evaluate(
    sae: Annotated[list[Path], typer.Option("--sae", help="SAE directory; repeat it to "
                                            "evaluate several SAEs of one layer (a sweep's) "
                                            "together, on the same batches")],
    tokens: Annotated[int, typer.Option("--tokens", help="tokens to evaluate on")] = 8192,
    model: ModelOpt = None,
    dataset: DatasetOpt = "embedded",
    layer: Annotated[int | None, typer.Option("--layer", help="[default: the SAE's]")] = None,
    context: Annotated[int, typer.Option("--context")] = 128,
    batch: Annotated[int, typer.Option("--batch", help="contexts per forward")] = 8,
    skip_contexts: Annotated[int | None, typer.Option(
        "--skip-contexts", help="contexts of the dataset to skip first [default: those the "
        "SAE was trained on, when it is the same dataset]")] = None,
    precision: PrecisionOpt = "fp32",
    device: DeviceOpt = None,
    record: Annotated[bool, typer.Option(
        "--record/--no-record", help="keep this text's clean pass under the data dir and "
        "read it when it is there: a later evaluation at this block on the same text "
        "runs only each SAE's spliced pass")] = True,
) -> None:
    """FVU, L0, dead fraction, CE loss recovered, ΔLM loss and KL of an SAE, as JSON (of
    several, a JSON list, each with its "sae"), with the model's "precision" and what
    became of the clean pass ("clean_pass": "read" from a record, "written" to one, or
    "not recorded: why"). In bf16 the model runs in bf16 and the SAE and the losses in
    float32 (what that changes: bench eval --precision bf16)."""
    from app.settings import get_settings
    from training.evaluation.metrics import evaluate_family_on_dataset
    from training.evaluation.records import CleanRecords
    from training.sae.folder import load_sae

    with cli_errors():
        loaded = [load_sae(path) for path in sae]
        cfgs = [cfg for _, cfg in loaded]
        model = model or _one("--model", [cfg.get("model_name") for cfg in cfgs])
        where = layer if layer is not None else _one(
            "--layer", [_layer_of(path, cfg) for path, cfg in zip(sae, cfgs, strict=True)])
        skip = skip_contexts if skip_contexts is not None else _one(
            "--skip-contexts", [_trained_contexts(cfg, dataset, context) for cfg in cfgs])
        lm = load_lm(model, device, precision)
        settings = get_settings()
        records = (CleanRecords(settings.eval_records_dir, settings.eval_records_bytes)
                   if record and settings.eval_records_bytes else None)
        metrics = evaluate_family_on_dataset(
            lm, [module.to(lm.device) for module, _ in loaded], where, dataset=dataset,
            tokens=tokens, context=context, batch=batch, skip_contexts=skip, records=records)
    about = {"precision": precision, "clean_pass": records.outcome if records else
             "not recorded: --no-record" if not record else
             "not recorded: SAELAB_EVAL_RECORDS_GB is 0"}
    if len(sae) == 1:
        typer.echo(json.dumps({**metrics[0].to_dict(), **about}))
    else:
        typer.echo(json.dumps([{"sae": str(path), **figures.to_dict(), **about}
                               for path, figures in zip(sae, metrics, strict=True)]))


def _layer_of(path: Path, cfg: dict) -> int:
    if cfg.get("hook_layer") is None:
        raise ValueError(f"--sae {path} does not say which layer it reads: give --layer")
    return int(cfg["hook_layer"])


def _one(flag: str, values: list[T]) -> T:
    """The value the SAEs agree on; SAEs that differ are evaluated apart (or given
    ``flag``)."""
    if len(set(values)) > 1:
        raise ValueError(f"the SAEs differ ({', '.join(map(str, values))}): evaluate them "
                         f"apart, or give {flag}")
    return values[0]


def _trained_contexts(cfg: dict, dataset: str, context: int) -> int:
    """Contexts of length ``context`` covering the tokens the SAE's capture used, so
    evaluation runs on text the SAE has not seen."""
    from training.data.activations import Manifest

    if cfg.get("streamed"):  # trained straight from the model: the stream's contexts
        if cfg.get("dataset") != dataset or not cfg.get("stream_contexts"):
            return 0
        return -(-int(cfg["stream_contexts"]) * int(cfg["context_size"]) // context)
    try:
        manifest = Manifest.load(Path(cfg["activations"]))
    except (KeyError, TypeError, ValueError):
        return 0
    if manifest.dataset != dataset:
        return 0
    return -(-manifest.contexts * manifest.context // context)
