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

import shutil
from dataclasses import replace
from pathlib import Path

from training.data.capture import activation_stream
from training.data.models import LoadedModel
from training.sae.autoencoder import SaeConfig
from training.train.run import TrainError, partial_dir
from training.train.stream import (
    CountedRows,
    ShuffleBuffer,
    StreamConfig,
    check_out,
    finish_stream_run,
    prepend,
    stream_metrics,
    take_rows,
)
from training.train.sweep import SweepStep, fresh_dirs, initialise_members, step_members
from training.train.trainer import TrainConfig, Trainer


def train_streaming_sweep(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig,
                          stream: StreamConfig, *, progress: bool = True,
                          on_step: SweepStep | None = None) -> list[dict]:
    """Train every ``members`` SAE (its output folder -> its config) on block
    ``stream.capture.layer`` of ``lm`` as it reads the dataset, ``cfg.tokens`` tokens
    each (required); returns each one's metrics, in order."""
    _check(lm, members, cfg)
    cfg = replace(cfg, checkpoint_every=0)
    total_steps = cfg.tokens // cfg.batch
    works = [partial_dir(out) for out in members]
    try:
        trainers = [Trainer(sae_cfg, cfg, total_steps, device=lm.device)
                    for sae_cfg in members.values()]
        fresh_dirs(works)
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
        for trainer, out, work, history in zip(trainers, members, works, histories,
                                               strict=True):
            metrics = {**stream_metrics(trainer, holdout, history, seconds, 0, cfg.batch),
                       "sweep_size": len(members)}
            finish_stream_run(trainer, lm, stream, out, work, metrics, history,
                              counted.contexts)
            results.append(metrics)
        return results
    finally:
        for work in works:
            shutil.rmtree(work, ignore_errors=True)


def _check(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig) -> None:
    """What a streaming sweep refuses before it loads a batch."""
    if cfg.tokens is None:
        raise TrainError("--tokens is required when training from the model")
    if not members:
        raise TrainError("a sweep needs at least one SAE")
    for out, sae_cfg in members.items():
        if sae_cfg.transcoder:
            raise TrainError("a sweep trains residual-stream SAEs: train a transcoder on its "
                             "own (one --latents, --k and --arch)")
        if sae_cfg.d_in != lm.d_model:
            raise TrainError(f"{lm.name} has d={lm.d_model}, SAE d_in={sae_cfg.d_in}")
        check_out(Path(out))
