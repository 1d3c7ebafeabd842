"""``saelab bench ...`` commands of the trainer's scale and precision: dead latents and the
AuxK window, Llama 3.2's full shape, evaluation, sweeps, bf16. Each prints one JSON line;
the maths and the timing live in ``training.bench``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from app.cli.common import (
    PRECISIONS,
    DeviceOpt,
    ModelOpt,
    bench_app,
    cli_errors,
    int_list,
    layer_list,
    load_lm,
)


@bench_app.command("dead")
def bench_dead(
    acts: Annotated[Path, typer.Option("--acts", help="capture directory")],
    latents: Annotated[int, typer.Option("--latents")] = 16_384,
    k: Annotated[int, typer.Option("--k")] = 16,
    batch: Annotated[int, typer.Option("--batch")] = 4096,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens per run")] = 98_304,
    holdout: Annotated[int, typer.Option("--holdout", help="held-out rows")] = 16_384,
    windows: Annotated[str, typer.Option("--windows", help="AuxK dead windows as fractions "
                                         "of the run")] = "0.1,0.25,0.5",
) -> None:
    """Dead latents without AuxK and with AuxK at several dead windows (same run)."""
    from training.bench.dead import bench_dead as run

    with cli_errors():
        try:
            fractions = tuple(float(w) for w in windows.split(","))
        except ValueError:
            raise ValueError(f"--windows: expected fractions like 0.1,0.5 (got {windows!r})"
                             ) from None
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            result = run(acts, Path(work), n_latents=latents, k=k, batch=batch,
                         tokens=tokens, holdout=holdout, windows=fractions)
    typer.echo(json.dumps(result))


@bench_app.command("llama32")
def bench_llama32(
    shape: Annotated[str, typer.Option("--shape", help="1b or 3b")] = "1b",
    layer: Annotated[int, typer.Option("--layer")] = 8,
    tokens: Annotated[int, typer.Option("--tokens", help="tokens to capture")] = 8192,
    train_tokens: Annotated[int, typer.Option("--train-tokens")] = 65_536,
    latents: Annotated[int, typer.Option("--latents")] = 16_384,
    k: Annotated[int, typer.Option("--k")] = 32,
    batch: Annotated[int, typer.Option("--batch")] = 4096,
    device: DeviceOpt = None,
) -> None:
    """Capture and training tokens/s and peak memory on Llama 3.2's full shape (its real
    tokenizer, random weights)."""
    from training.bench.scale import bench_llama32 as run

    with cli_errors():
        if min(tokens, train_tokens, latents, k, batch) < 1:
            raise ValueError("--tokens, --train-tokens, --latents, --k and --batch must be "
                             "positive")
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            result = run(Path(work), shape=shape, layer=layer, tokens=tokens,
                         train_tokens=train_tokens, latents=latents, k=k, batch=batch,
                         device=device)
    typer.echo(json.dumps(result))


@bench_app.command("eval")
def bench_eval(
    sae: Annotated[Path | None, typer.Option(
        "--sae", help="SAE directory [default: a random n=8192, k=32 SAE at --layer of "
        "--model; the cost does not depend on its weights]")] = None,
    model: ModelOpt = None,
    layer: Annotated[int, typer.Option("--layer", help="block, without --sae")] = 15,
    tokens: Annotated[int, typer.Option("--tokens", help="timed tokens per path")] = 4096,
    batch: Annotated[int, typer.Option("--batch", help="contexts per batch")] = 8,
    family: Annotated[int, typer.Option("--family", help="S > 1: S random SAEs (n=8192, "
                                        "k cycling 16, 32, 64) evaluated together, as a "
                                        "sweep's are, vs each alone", min=1, max=16)] = 1,
    precision: Annotated[str, typer.Option("--precision", help="bf16: also the shared-prefix "
                                           "evaluation with the model in bf16, and how far "
                                           "its figures are from fp32's")] = "fp32",
    device: DeviceOpt = None,
) -> None:
    """Evaluation tokens/s: the shared-prefix passes vs three whole forward passes, and an
    evaluation that reads its recorded clean pass (with --family, a sweep's SAEs evaluated
    together vs each alone; with --precision bf16, also the model in bf16)."""
    import torch

    from training.bench.evaluation import bench_eval as run
    from training.bench.evaluation import bench_family as run_family
    from training.evaluation.records import CleanRecords
    from training.sae.autoencoder import SaeConfig, SparseAutoencoder
    from training.sae.folder import load_sae

    with cli_errors():
        if tokens < 1 or batch < 1:
            raise ValueError("--tokens and --batch must be positive")
        if family > 1 and sae is not None:
            raise ValueError("--family times random SAEs: leave out --sae")
        if precision not in PRECISIONS:
            raise ValueError(f"--precision: choose fp32 or bf16 (got {precision!r})")
        if family > 1 and precision != "fp32":
            raise ValueError("--precision bf16 is timed for one SAE: leave out --family")
        if sae is not None:
            loaded, cfg = load_sae(sae)
            model, layer = model or cfg.get("model_name"), int(cfg["hook_layer"])
        lm = load_lm(model, device)
        lm.check_layer(layer)
        bf16 = load_lm(model, device, precision) if precision != "fp32" else None
        torch.manual_seed(0)
        if family > 1:
            result = run_family(lm, [SparseAutoencoder(SaeConfig(
                d_in=lm.d_model, n_latents=8192, k=16 * 2 ** (i % 3))).to(lm.device)
                for i in range(family)], layer, tokens=tokens, batch=batch)
        else:
            if sae is None:
                loaded = SparseAutoencoder(SaeConfig(d_in=lm.d_model, n_latents=8192, k=32))
            with tempfile.TemporaryDirectory(prefix="saelab-bench-records-") as work:
                result = run(lm, loaded.to(lm.device), layer, tokens=tokens, batch=batch,
                             bf16=bf16, records=CleanRecords(Path(work)))
    typer.echo(json.dumps(result))


@bench_app.command("sweep")
def bench_sweep(
    acts: Annotated[Path | None, typer.Option("--acts", help="capture directory (without "
                                              "it: stream from --model's --layer)")] = None,
    model: ModelOpt = None,
    layer: Annotated[str | None, typer.Option("--layer", help="without --acts: the block, "
                                              "or several as 3,6,9")] = None,
    latents: Annotated[str, typer.Option("--latents")] = "4096,8192",
    k: Annotated[str, typer.Option("--k")] = "16,32",
    arch: Annotated[str, typer.Option("--arch")] = "topk",
    batch: Annotated[int, typer.Option("--batch")] = 4096,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens per SAE")] = 65_536,
    buffer_rows: Annotated[int, typer.Option("--buffer-rows", help="without --acts: rows "
                                             "in the shuffle buffer")] = 1 << 16,
) -> None:
    """A sweep from one read vs the same SAEs trained one run at a time (wall time), on a
    capture or straight from the model."""
    from training.bench.sweep import bench_stream_sweep
    from training.bench.sweep import bench_sweep as run

    with cli_errors():
        sizes, ks = int_list(latents, "--latents"), int_list(k, "--k")
        if (acts is None) == (layer is None):
            raise ValueError("give --acts (a capture) or --layer (stream from --model)")
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            if acts is not None:
                result = run(acts, Path(work), latents=sizes, ks=ks,
                             architectures=arch.split(","), batch=batch, tokens=tokens)
            else:
                layers = layer_list(layer)
                lm = load_lm(model, None)
                for index in layers:
                    lm.check_layer(index)
                result = bench_stream_sweep(lm, Path(work), layers=layers, latents=sizes,
                                            ks=ks, architectures=arch.split(","),
                                            batch=batch, tokens=tokens,
                                            buffer_rows=buffer_rows)
    typer.echo(json.dumps(result))


@bench_app.command("precision")
def bench_precision(
    acts: Annotated[Path, typer.Option("--acts", help="capture directory (training)")],
    model: ModelOpt = None,
    layer: Annotated[int, typer.Option("--layer", help="block (capture)")] = 6,
    latents: Annotated[int, typer.Option("--latents")] = 8192,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 65_536,
    batch: Annotated[int, typer.Option("--batch")] = 4096,
) -> None:
    """bf16 vs fp32: capture tokens/s and activation error, training tokens/s and FVU."""
    from training.bench.precision import bench_capture_precision, bench_train_precision

    with cli_errors():
        fp32, bf16 = load_lm(model, "cpu"), load_lm(model, "cpu", "bf16")
        fp32.check_layer(layer)
        result = {"bench": "precision", "model": fp32.name,
                  "capture": bench_capture_precision(fp32, bf16, layer=layer)}
        del fp32, bf16
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            result["train"] = bench_train_precision(acts, Path(work), n_latents=latents,
                                                    batch=batch, tokens=tokens)
    typer.echo(json.dumps(result))


@bench_app.command("stream")
def bench_stream(
    model: ModelOpt = None,
    layer: Annotated[int, typer.Option("--layer")] = 6,
    tokens: Annotated[int, typer.Option("--tokens", help="training tokens")] = 65_536,
    latents: Annotated[int, typer.Option("--latents")] = 4096,
    k: Annotated[int, typer.Option("--k")] = 32,
    batch: Annotated[int, typer.Option("--batch")] = 4096,
    buffer_rows: Annotated[int, typer.Option("--buffer-rows")] = 1 << 16,
) -> None:
    """Training straight from the model vs capture-then-train on the same tokens."""
    from training.bench.stream import bench_stream as run

    with cli_errors():
        lm = load_lm(model, None)
        lm.check_layer(layer)
        with tempfile.TemporaryDirectory(prefix="saelab-bench-") as work:
            result = run(lm, Path(work), layer=layer, tokens=tokens, n_latents=latents, k=k,
                         batch=batch, buffer_rows=buffer_rows)
    typer.echo(json.dumps(result))
