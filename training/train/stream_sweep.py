"""A sweep straight from the model: one forward per batch of contexts feeds every SAE.

Where the activations are streamed (no capture on disk), reading a batch *is* the
model's forward, the dominant cost of a run; training a family one run at a time pays it
once per SAE. A streaming sweep runs the stream once: the held-out rows, the shuffle
buffer and its batches are those a single streaming run with the same settings draws,
and every member is stepped on each batch, so each member has the weights and figures
that run would (tested), saved to its own folder the same way; no member is put in place
before every member is saved.

A sweep over several blocks runs one forward per batch up to the deepest; each block's
rows wait in their own queue for that block's reader (its held-out rows, its shuffle
buffer), so every block's members see what a sweep of that block alone would. The
readers advance in step, so a queue holds at most about one buffer fill: memory is up to
twice --buffer-rows rows per block.

Like a sweep from a capture, it runs in one process and saves one checkpoint of all its
members every ``checkpoint_every`` steps; ``resume`` continues from it as a resumed
streaming run does (tested equal): the stream skips the contexts read before the stop,
the held-out rows are the saved ones, and a fresh shuffle buffer is filled (the rows that
waited in the old one are not seen).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from training.data.capture import layer_streams
from training.data.models import LoadedModel
from training.sae.autoencoder import SaeConfig
from training.train.run import TrainError
from training.train.stream import (
    STREAM_FLAGS,
    CountedRows,
    ShuffleBuffer,
    StreamConfig,
    check_stream_run,
    prepend,
    stage_stream_run,
    stream_metrics,
    stream_settings,
    take_rows,
)
from training.train.sweep import (
    SweepStep,
    initialise_members,
    member_dirs,
    publish_members,
    step_members,
)
from training.train.sweep_checkpoint import load_sweep_checkpoint, save_sweep_checkpoint
from training.train.trainer import TrainConfig, Trainer


def train_streaming_sweep(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig,
                          stream: StreamConfig, *, resume: bool = False,
                          progress: bool = True, on_step: SweepStep | None = None
                          ) -> list[dict]:
    """Train every ``members`` SAE (its output folder -> its config) on block
    ``stream.capture.layer`` of ``lm`` as it reads the dataset, ``cfg.tokens`` tokens
    each (required); returns each one's metrics, in order."""
    return train_layer_sweep(lm, {stream.capture.layer: members}, cfg, stream,
                             resume=resume, progress=progress, on_step=on_step)


def train_layer_sweep(lm: LoadedModel, layers: dict[int, dict[Path, SaeConfig]],
                      cfg: TrainConfig, stream: StreamConfig, *, resume: bool = False,
                      progress: bool = True, on_step: SweepStep | None = None) -> list[dict]:
    """Train each block's ``layers[block]`` SAEs (output folder -> config) from one
    stream of the model up to the deepest block, ``cfg.tokens`` tokens each; returns the
    metrics block by block, member by member (``on_step``'s index counts the same way).
    ``resume`` continues the interrupted sweep of the same members from its checkpoint."""
    members = {out: sae_cfg for group in layers.values() for out, sae_cfg in group.items()}
    if len(members) != sum(len(group) for group in layers.values()):
        raise TrainError("two SAEs of the sweep would write the same folder")
    _check(lm, members, cfg, stream)
    total_steps = cfg.tokens // cfg.batch
    trainers = [Trainer(sae_cfg, cfg, total_steps, device=lm.device)
                for sae_cfg in members.values()]
    group_of = [index for index, group in enumerate(layers.values()) for _ in group]
    streams = [_at_layer(stream, layer) for layer in layers]
    outs = list(members)
    settings = [stream_settings(trainer, streams[group], lm.name)
                for trainer, group in zip(trainers, group_of, strict=True)]
    state = (load_sweep_checkpoint(outs, trainers, settings, STREAM_FLAGS, "model") if resume
             else {"histories": None, "stream": {}})  # a refused resume touches nothing
    with member_dirs(outs, resume) as works:
        readers = _readers(lm, list(layers), cfg, stream, state["stream"])
        for index, reader in enumerate(readers):
            if not resume:
                initialise_members([t for t, g in zip(trainers, group_of, strict=True)
                                    if g == index], reader.first)
        first_step = trainers[0].steps_done

        def checkpoint(histories: list[list[dict]]) -> None:
            position = {"contexts": max(r.counted.contexts for r in readers),
                        "holdouts": [r.holdout for r in readers]}
            save_sweep_checkpoint(outs, trainers, histories, settings, position)

        desc = f"sweep of {len(trainers)} (streaming)"
        every_layer = zip(*(r.batches for r in readers), strict=False)  # all run out at once
        histories, seconds = step_members(trainers, every_layer, group_of, progress, on_step,
                                          desc, state["histories"], checkpoint)
        results = []
        for trainer, work, history, group in zip(trainers, works, histories, group_of,
                                                 strict=True):
            reader = readers[group]
            metrics = {**stream_metrics(trainer, reader.holdout, history, seconds,
                                        first_step, cfg.batch), "sweep_size": len(members)}
            stage_stream_run(trainer, lm, reader.stream, work, metrics, history,
                             reader.counted.contexts)
            results.append(metrics)
        publish_members(works, list(members))
        return results


class LayerFanout:
    """One stream of several blocks' rows split into a reader per block: a forward runs
    when a reader finds its queue empty, and the other blocks' rows wait in theirs."""

    def __init__(self, source: Iterator[tuple[dict[int, Tensor], int]],
                 layers: list[int]) -> None:
        self.source = source
        self.queues: dict[int, deque[tuple[Tensor, int]]] = {
            layer: deque() for layer in layers}

    def reader(self, layer: int) -> Iterator[tuple[Tensor, int]]:
        """Block ``layer``'s (rows, contexts consumed), as ``activation_stream`` yields."""
        queue = self.queues[layer]
        while True:
            if not queue:
                item = next(self.source, None)
                if item is None:
                    return
                rows, consumed = item
                for other, waiting in self.queues.items():
                    waiting.append((rows[other], consumed))
            yield queue.popleft()


def _readers(lm: LoadedModel, layers: list[int], cfg: TrainConfig, stream: StreamConfig,
             position: dict) -> list[_LayerReader]:
    """Every block's reader of one stream; ``position`` (a checkpoint's, or empty for a
    new sweep) says how many contexts to skip and holds each block's held-out rows."""
    contexts, holdouts = position.get("contexts", 0), position.get("holdouts")
    skipping = layer_streams(lm, stream.capture, layers, skip_contexts=contexts)
    fanout = LayerFanout(skipping, layers)
    return [_LayerReader.start(fanout, layer, cfg, stream, contexts,
                               None if holdouts is None else holdouts[index])
            for index, layer in enumerate(layers)]


def _at_layer(stream: StreamConfig, layer: int) -> StreamConfig:
    return replace(stream, capture=replace(stream.capture, layer=layer))


@dataclass
class _LayerReader:
    """One block's share of the stream, as a single streaming run of it reads it (or
    resumes it: after ``contexts`` contexts, with its held-out rows already taken)."""

    stream: StreamConfig
    counted: CountedRows
    holdout: Tensor
    first: Tensor | None
    batches: Iterator[Tensor]

    @classmethod
    def start(cls, fanout: LayerFanout, layer: int, cfg: TrainConfig, stream: StreamConfig,
              contexts: int = 0, holdout: Tensor | None = None) -> _LayerReader:
        counted = CountedRows(fanout.reader(layer), contexts)
        resumed = holdout is not None
        if holdout is None:
            holdout = take_rows(counted, cfg.holdout_rows)
        batches = iter(ShuffleBuffer(counted, stream.buffer_rows, cfg.batch,
                                     cfg.seed + contexts))
        first = None
        if not resumed:
            first = next(batches, None)
            if first is None:
                raise TrainError(f"dataset {stream.capture.dataset!r} yielded no batch")
            batches = prepend(first, batches)
        return cls(_at_layer(stream, layer), counted, holdout, first, batches)


def _check(lm: LoadedModel, members: dict[Path, SaeConfig], cfg: TrainConfig,
           stream: StreamConfig) -> None:
    """What a streaming sweep refuses before the model runs."""
    if not members:
        raise TrainError("a sweep needs at least one SAE")
    for out, sae_cfg in members.items():
        if sae_cfg.transcoder:
            raise TrainError("a sweep trains residual-stream SAEs: train a transcoder on its "
                             "own (one --latents, --k and --arch)")
        check_stream_run(lm, Path(out), sae_cfg, cfg, stream)
