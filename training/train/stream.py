"""Training straight from the model: no activation dump on disk.

For runs whose activations do not fit on disk (a 65k-latent SAE on billions of tokens),
the model runs as training goes: each forward batch's activations enter a bounded shuffle
buffer in memory, and training batches are drawn from it. The buffer is filled to
``buffer_rows``, shuffled, and its first half is served as batches while the second half
waits and is mixed with the next fill (SAELens' mixing buffer does the same), so a batch
mixes rows of many contexts and documents, never only consecutive tokens.

The first ``holdout_rows`` rows of the stream are held out (never trained on) for the
held-out figures; the first training batch gives the sample for the input scale and
b_dec. A checkpoint records the trainer, the run's settings and how many contexts the
stream has consumed; a resumed run must use the same settings (layer, dataset, context,
SAE shape, batch stream), skips those contexts and fills a fresh buffer (the rows that
were waiting in the old one are not seen). The SAE folder is written as a training run
writes it, with the contexts the stream consumed (``stream_contexts``), so evaluation can
start after them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from training.data.activations import estimate_input_scale
from training.data.capture import CaptureConfig, activation_stream
from training.data.models import LoadedModel
from training.data.stop import Interrupted
from training.sae.autoencoder import SaeConfig
from training.train.run import (
    CHECKPOINT,
    CURVE_POINTS,
    RUN_FLAGS,
    StepCallback,
    TrainError,
    check_out,
    discard_partial,
    final_metrics,
    load_checkpoint,
    partial_dir,
    publish_run,
    run_settings,
    stage_run,
)
from training.train.trainer import TrainConfig, Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Where the activations come from and how many wait in memory."""

    capture: CaptureConfig
    """Layer, dataset, context and forward batch (``tokens`` is unused here)."""
    buffer_rows: int = 1 << 18
    """Rows held in the shuffle buffer (262,144 × d floats: 600 MB at d = 576)."""

    def __post_init__(self) -> None:
        if self.buffer_rows < 2:
            raise TrainError(f"--buffer-rows must be at least 2 (got {self.buffer_rows})")


class ShuffleBuffer:
    """Training batches [batch, d] drawn from a bounded, mixed pool of streamed rows."""

    def __init__(self, rows: Iterator[Tensor], capacity: int, batch: int, seed: int) -> None:
        if capacity < 2 * batch:
            raise TrainError(f"--buffer-rows {capacity} must hold at least two --batch "
                             f"({batch})")
        self.rows, self.capacity, self.batch = rows, capacity, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(0)
        self.exhausted = False

    def _fill(self) -> None:
        parts, have = [self.pool], len(self.pool)
        while have < self.capacity and not self.exhausted:
            chunk = next(self.rows, None)
            if chunk is None:
                self.exhausted = True
                break
            parts.append(chunk)
            have += len(chunk)
        pool = torch.cat([p for p in parts if p.numel()]) if have else self.pool
        self.pool = pool[torch.randperm(len(pool), generator=self.generator)]

    def __iter__(self) -> Iterator[Tensor]:
        while True:
            self._fill()
            serve = len(self.pool) if self.exhausted else len(self.pool) // 2
            served = (serve // self.batch) * self.batch
            if served == 0:
                return
            for start in range(0, served, self.batch):
                yield self.pool[start:start + self.batch]
            self.pool = self.pool[served:]


def train_streaming(lm: LoadedModel, out: Path, sae_cfg: SaeConfig, cfg: TrainConfig,
                    stream: StreamConfig, *, resume: bool = False, progress: bool = True,
                    on_step: StepCallback | None = None) -> dict:
    """Train an SAE on block ``stream.capture.layer`` of ``lm`` as it reads the dataset;
    ``cfg.tokens`` training tokens (required). Returns the metrics dict."""
    out = Path(out)
    check_stream_run(lm, out, sae_cfg, cfg, stream)
    total_steps = cfg.tokens // cfg.batch
    work = partial_dir(out)
    trainer = Trainer(sae_cfg, cfg, total_steps, device=lm.device)
    try:
        state = _resume(trainer, work, stream, lm.name) if resume else _fresh(work)
        source = activation_stream(lm, stream.capture, skip_contexts=state["contexts"])
        counted = CountedRows(source, state["contexts"])
        holdout = state.get("holdout")
        if holdout is None:
            holdout = take_rows(counted, cfg.holdout_rows)
        batches = iter(ShuffleBuffer(counted, stream.buffer_rows, cfg.batch, cfg.seed
                                     + state["contexts"]))
        if not resume:
            first = next(batches, None)
            if first is None:
                raise TrainError(f"dataset {stream.capture.dataset!r} yielded no batch")
            trainer.initialise(first, estimate_input_scale(first))
            batches = prepend(first, batches)
        history = state.get("history", [])
        seconds = _loop(trainer, batches, counted, holdout, work, history, progress, on_step,
                        stream_settings(trainer, stream, lm.name))
        metrics = stream_metrics(trainer, holdout, history, seconds, state["steps"],
                                 cfg.batch)
        finish_stream_run(trainer, lm, stream, out, work, metrics, history,
                          counted.contexts)
        return metrics
    except BaseException as exc:
        if not isinstance(exc, Interrupted) and not (work / CHECKPOINT).is_file():
            shutil.rmtree(work, ignore_errors=True)
        raise


def check_stream_run(lm: LoadedModel, out: Path, sae_cfg: SaeConfig, cfg: TrainConfig,
                     stream: StreamConfig) -> None:
    """What a run (or a sweep's member) from the model refuses before the model runs."""
    if cfg.tokens is None:
        raise TrainError("--tokens is required when training from the model")
    if sae_cfg.d_in != lm.d_model:
        raise TrainError(f"{lm.name} has d={lm.d_model}, SAE d_in={sae_cfg.d_in}")
    check_out(out)
    check_buffer(stream, cfg)


def check_buffer(stream: StreamConfig, cfg: TrainConfig) -> None:
    """The shuffle buffer must hold two batches (one served while the next mixes in);
    checked before the model runs."""
    if stream.buffer_rows < 2 * cfg.batch:
        raise TrainError(f"--buffer-rows {stream.buffer_rows} must hold at least two "
                         f"--batch ({cfg.batch})")


class CountedRows:
    """The activation stream's rows, remembering how many contexts it has consumed."""

    def __init__(self, source: Iterator[tuple[Tensor, int]], contexts: int) -> None:
        self.source, self.contexts = source, contexts

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        rows, self.contexts = next(self.source)
        return rows


def take_rows(rows: Iterator[Tensor], count: int) -> Tensor:
    taken, have = [], 0
    while have < count:
        chunk = next(rows, None)
        if chunk is None:
            break
        taken.append(chunk)
        have += len(chunk)
    return torch.cat(taken)[:count] if taken else torch.empty(0)


def prepend(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def _fresh(work: Path) -> dict:
    discard_partial(work)
    return {"contexts": 0, "steps": 0}


def stream_settings(trainer: Trainer, stream: StreamConfig, model: str) -> dict:
    """What a resumed run must share with the interrupted one."""
    capture = stream.capture
    return {**run_settings(trainer), "model": model, "layer": capture.layer,
            "dataset": capture.dataset, "context": capture.context,
            "buffer_rows": stream.buffer_rows}


STREAM_FLAGS = {**RUN_FLAGS, "model": "--model", "layer": "--layer", "dataset": "--dataset",
                "context": "--context", "buffer_rows": "--buffer-rows"}


def _resume(trainer: Trainer, work: Path, stream: StreamConfig, model: str) -> dict:
    state = load_checkpoint(work, trainer, stream_settings(trainer, stream, model),
                            STREAM_FLAGS)
    log.info("resumed at step %d after %d contexts", trainer.steps_done, state["contexts"])
    return {**state, "steps": trainer.steps_done}


def _loop(trainer: Trainer, batches: Iterator[Tensor], counted: CountedRows, holdout: Tensor,
          work: Path, history: list[dict], progress: bool, on_step: StepCallback | None,
          settings: dict) -> float:
    cfg, total = trainer.cfg, trainer.total_steps
    log_every = cfg.log_every or max(1, total // CURVE_POINTS)
    started = time.perf_counter()
    with tqdm(total=total * cfg.batch, initial=trainer.steps_done * cfg.batch, unit="tok",
              unit_scale=True, desc="train (streaming)", disable=not progress) as bar:
        while trainer.steps_done < total:
            batch = next(batches, None)
            if batch is None:
                raise TrainError(f"the dataset ran out after {trainer.steps_done} of "
                                 f"{total} steps: lower --tokens")
            stats = trainer.step(batch)
            bar.update(cfg.batch)
            if stats.step % log_every == 0 or stats.step == total:
                history.append(asdict(stats))
            if on_step is not None:
                on_step(stats)
            if cfg.checkpoint_every and stats.step % cfg.checkpoint_every == 0:
                _checkpoint(trainer, work, history, counted.contexts, holdout, settings)
    return time.perf_counter() - started


def _checkpoint(trainer: Trainer, work: Path, history: list[dict], contexts: int,
                holdout: Tensor, settings: dict) -> None:
    tmp = work / f".{CHECKPOINT}.tmp"
    torch.save({"trainer": trainer.state_dict(), "history": history, "contexts": contexts,
                "holdout": holdout, "settings": settings}, tmp)
    os.replace(tmp, work / CHECKPOINT)


def stream_metrics(trainer: Trainer, holdout: Tensor, history: list[dict], seconds: float,
                   first_step: int, batch: int) -> dict:
    tokens_per_s = (trainer.steps_done - first_step) * batch / max(seconds, 1e-9)
    return {**final_metrics(trainer, holdout, history, tokens_per_s), "streamed": True}


def finish_stream_run(trainer: Trainer, lm: LoadedModel, stream: StreamConfig, out: Path,
                      work: Path, metrics: dict, history: list[dict], contexts: int) -> None:
    stage_stream_run(trainer, lm, stream, work, metrics, history, contexts)
    publish_run(work, out)


def stage_stream_run(trainer: Trainer, lm: LoadedModel, stream: StreamConfig, work: Path,
                     metrics: dict, history: list[dict], contexts: int) -> None:
    """A streamed run's SAE folder, staged in ``work`` (``stage_run``)."""
    capture = stream.capture
    stage_run(trainer, work, metrics, history, model=lm.name, layer=capture.layer,
              context=capture.context,
              extra={"activations": None, "streamed": True, "dataset": capture.dataset,
                     "buffer_rows": stream.buffer_rows, "stream_contexts": contexts})
