"""A sweep straight from the model: one forward per batch of contexts feeds every SAE.

Where the activations are streamed (no capture on disk), reading a batch *is* the
model's forward, the dominant cost of a run; training a family one run at a time pays it
once per SAE. A streaming sweep runs the stream once: the held-out rows, the shuffle
buffer and its batches are those a single streaming run with the same settings draws,
and every member is stepped on each batch, so each member is the SAE that run would
write (tested), saved to its own folder the same way.

Like a sweep from a capture, it runs in one process and has no checkpoints: an
interrupted streaming sweep starts again (its partial folders are removed).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from training.data.capture import activation_stream
from training.data.models import LoadedModel
from training.sae.autoencoder import SaeConfig
from training.train.run import TrainError
from training.train.stream import (
    CountedRows,
    ShuffleBuffer,
    StreamConfig,
    check_buffer,
    check_out,
    prepend,
    stage_stream_run,
    stream_metrics,
    take_rows,
)
from training.train.sweep import (
    SweepStep,
    initialise_members,
    member_dirs,
    publish_members,
    step_members,
)
from training.train.trainer import TrainConfig, Trainer


def train_streaming_sweep(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig,
                          stream: StreamConfig, *, progress: bool = True,
                          on_step: SweepStep | None = None) -> list[dict]:
    """Train every ``members`` SAE (its output folder -> its config) on block
    ``stream.capture.layer`` of ``lm`` as it reads the dataset, ``cfg.tokens`` tokens
    each (required); returns each one's metrics, in order."""
    _check(lm, members, cfg, stream)
    cfg = replace(cfg, checkpoint_every=0)
    total_steps = cfg.tokens // cfg.batch
    trainers = [Trainer(sae_cfg, cfg, total_steps, device=lm.device)
                for sae_cfg in members.values()]
    with member_dirs(list(members)) as works:
        counted = CountedRows(activation_stream(lm, stream.capture), 0)
        holdout = take_rows(counted, cfg.holdout_rows)
        batches = iter(ShuffleBuffer(counted, stream.buffer_rows, cfg.batch, cfg.seed))
        first = next(batches, None)
        if first is None:
            raise TrainError(f"dataset {stream.capture.dataset!r} yielded no batch")
        initialise_members(trainers, first)
        histories, seconds = step_members(trainers, prepend(first, batches), progress,
                                          on_step, f"sweep of {len(trainers)} (streaming)")
        results = []
        for trainer, work, history in zip(trainers, works, histories, strict=True):
            metrics = {**stream_metrics(trainer, holdout, history, seconds, 0, cfg.batch),
                       "sweep_size": len(members)}
            stage_stream_run(trainer, lm, stream, work, metrics, history, counted.contexts)
            results.append(metrics)
        publish_members(works, list(members))
        return results


def _check(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig,
           stream: StreamConfig) -> None:
    """What a streaming sweep refuses before the model runs."""
    if cfg.tokens is None:
        raise TrainError("--tokens is required when training from the model")
    if not members:
        raise TrainError("a sweep needs at least one SAE")
    check_buffer(stream, cfg)
    for out, sae_cfg in members.items():
        if sae_cfg.transcoder:
            raise TrainError("a sweep trains residual-stream SAEs: train a transcoder on its "
                             "own (one --latents, --k and --arch)")
        if sae_cfg.d_in != lm.d_model:
            raise TrainError(f"{lm.name} has d={lm.d_model}, SAE d_in={sae_cfg.d_in}")
        check_out(Path(out))
