"""A sweep: several SAEs trained from one pass over the activations, in one process.

Researchers train families of SAEs (widths × k × architectures) on the same activations.
Run one by one, each run reads and shuffles the whole capture again; a sweep reads each
batch once and steps every SAE on it. Every member sees exactly the batches, the seed, the
input scale and the b_dec start a separate run with the same settings would, so a sweep's
SAEs are the SAEs those runs would write (tested); each lands in its own folder, written
the same way (a hidden partial directory, then one rename), and none is renamed into
place before every member is saved.

A sweep runs in one process. Every ``checkpoint_every`` steps it saves one checkpoint of
all its members (``sweep_checkpoint``); ``resume`` continues from it, on the same batches
an uninterrupted sweep would have read (tested equal).
"""

from __future__ import annotations

import itertools
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from training.data.activations import ActivationStore, estimate_input_scale
from training.data.models import default_device
from training.data.stop import Interrupted
from training.sae.autoencoder import SaeConfig
from training.train.run import (
    CURVE_POINTS,
    RUN_FLAGS,
    TrainError,
    discard_partial,
    final_metrics,
    partial_dir,
    plan_run,
    publish_run,
    run_folder_fields,
    run_settings,
    stage_run,
)
from training.train.sweep_checkpoint import (
    SWEEP_CHECKPOINT,
    checkpoint_path,
    load_sweep_checkpoint,
    save_sweep_checkpoint,
)
from training.train.trainer import StepStats, TrainConfig, Trainer, geometric_median

SweepStep = Callable[[int, StepStats], None]
"""Called with (member index, its step's figures) after every member's step."""
Checkpoint = Callable[[list[list[dict]]], None]
"""Saves every member's state, given their histories so far, after a common step."""
SWEEP_FLAGS = {**RUN_FLAGS, "activations": "--acts"}
"""What a resumed sweep from a capture must share with the interrupted one."""


def sweep_configs(base: SaeConfig, latents: Sequence[int], ks: Sequence[int],
                  architectures: Sequence[str], matryoshka: Sequence[int] = ()
                  ) -> dict[str, SaeConfig]:
    """Every combination as {folder name: config}, e.g. ``n4096-k32-topk``; a
    combination with k ≥ n is an error naming it. ``matryoshka`` widths are checked
    against each member's own width."""
    configs: dict[str, SaeConfig] = {}
    for n, k, arch in itertools.product(latents, ks, architectures):
        if k >= n:
            raise ValueError(f"--k {k} is not below --latents {n}: drop that combination")
        configs[f"n{n}-k{k}-{arch}"] = replace(base, n_latents=n, k=k, architecture=arch,
                                               matryoshka_widths=tuple(matryoshka))
    if len(configs) != len(list(itertools.product(latents, ks, architectures))):
        raise ValueError("--latents, --k and --arch must not repeat a value")
    return configs


def train_sweep(acts_dir: Path, members: dict[Path, SaeConfig], cfg: TrainConfig, *,
                resume: bool = False, progress: bool = True,
                on_step: SweepStep | None = None) -> list[dict]:
    """Train every ``members`` SAE (its output folder -> its config) on one batch stream;
    returns each one's metrics, in order. ``resume`` continues the interrupted sweep of
    the same members and settings from its checkpoint."""
    if any(sae_cfg.transcoder for sae_cfg in members.values()):
        raise TrainError("a sweep trains residual-stream SAEs: train a transcoder on its own "
                         "(one --latents, --k and --arch)")
    store, (holdout, train_rows, total_steps) = plan_run(Path(acts_dir), members, cfg)
    device = default_device()
    trainers = [Trainer(sae_cfg, cfg, total_steps, device=device)
                for sae_cfg in members.values()]
    outs = list(members)
    settings = [{**run_settings(trainer), "activations": str(store.directory.resolve())}
                for trainer in trainers]
    histories = None  # a refused resume (other members or settings) touches nothing
    if resume:
        histories = load_sweep_checkpoint(outs, trainers, settings, SWEEP_FLAGS,
                                          "capture")["histories"]
    with member_dirs(outs, resume) as works:
        if not resume:
            initialise_members(trainers, store.sample(cfg.init_rows, seed=cfg.seed,
                                                      limit_rows=train_rows))
        first_step = trainers[0].steps_done
        histories, seconds = _loop(trainers, store, train_rows, progress, on_step, histories,
                                   lambda now: save_sweep_checkpoint(outs, trainers, now,
                                                                     settings))
        results = []
        rows = store.tail(holdout) if holdout else None  # read once for every member
        for trainer, work, history in zip(trainers, works, histories, strict=True):
            metrics = final_metrics(trainer, rows, history, (total_steps - first_step)
                                    * cfg.batch / max(seconds, 1e-9))
            metrics["sweep_size"] = len(members)
            stage_run(trainer, work, metrics, history, **run_folder_fields(store))
            results.append(metrics)
        publish_members(works, list(members))
        return results


@contextmanager
def member_dirs(outs: list[Path], resume: bool = False) -> Iterator[list[Path]]:
    """Each member's partial directory: emptied for a new sweep; for a resumed one (its
    checkpoint already loaded) kept, less any member staged before the stop. Removed when
    the sweep is published, or fails with no checkpoint to resume from (then the folders
    it made go too); a sweep that fails after a checkpoint keeps them for ``resume``, and
    an ``Interrupted`` one (a job handed to another worker) leaves them as they are."""
    works = [partial_dir(Path(out)) for out in outs]
    made = sorted({parent for work in works for parent in work.parents
                   if not parent.exists()}, key=lambda path: len(path.parts), reverse=True)
    for work in works:
        if not resume and work.exists():
            discard_partial(work, SWEEP_CHECKPOINT)
        shutil.rmtree(work / "sae", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
    try:
        yield works
    except Interrupted:
        raise  # its owner resumes it, or another process owns these folders now
    except BaseException:
        if not checkpoint_path(outs).is_file():
            _remove(works, made)
        raise
    _remove(works, made)


def _remove(works: list[Path], made: list[Path]) -> None:
    for work in works:
        shutil.rmtree(work, ignore_errors=True)
    for parent in made:  # deepest first: the folders a failed sweep made, left empty
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def publish_members(works: list[Path], outs: list[Path]) -> None:
    """Put every staged member in place, only once all are staged: a sweep that fails
    before this leaves no member of it (and every older SAE of those names) in place."""
    for work, out in zip(works, outs, strict=True):
        publish_run(work, Path(out))


def initialise_members(trainers: list[Trainer], sample: Tensor) -> None:
    """Every member's input scale and b_dec from one raw sample [N, d], as a separate run
    would set them (the geometric median, the costly part, computed once for all)."""
    scale = estimate_input_scale(sample)
    scaled = sample.to(trainers[0].device, torch.float32) * scale  # as initialise scales it
    center = geometric_median(scaled) if trainers[0].cfg.b_dec_init == "median" else None
    for trainer in trainers:
        trainer.initialise(sample, scale, center=center)


def _loop(trainers: list[Trainer], store: ActivationStore, train_rows: int, progress: bool,
          on_step: SweepStep | None, histories: list[list[dict]] | None,
          checkpoint: Checkpoint) -> tuple[list[list[dict]], float]:
    """The capture's shuffled batches, each read once for every trainer; a resumed sweep
    skips the batches its members have trained on."""
    cfg = trainers[0].cfg
    batches = store.iter_shuffled(cfg.batch, seed=cfg.seed, limit_rows=train_rows)
    for _ in range(trainers[0].steps_done):
        next(batches)
    return step_members(trainers, ((batch,) for batch in batches), [0] * len(trainers),
                        progress, on_step, f"sweep of {len(trainers)}", histories,
                        checkpoint)


def step_members(trainers: list[Trainer], batches: Iterator[Sequence[Tensor]],
                 group_of: Sequence[int], progress: bool, on_step: SweepStep | None,
                 desc: str, histories: list[list[dict]] | None = None,
                 checkpoint: Checkpoint | None = None) -> tuple[list[list[dict]], float]:
    """Each step's batches ([batch, d], one per group of members: a layer's) read once,
    every trainer stepped on its group's (``group_of[i]``), from the step after the one
    they have reached (0, or a checkpoint's) to their common number of steps, with a
    ``checkpoint`` every ``checkpoint_every`` steps; (each member's logged history, after
    ``histories`` when resumed, and seconds). A stream that runs out first is a
    TrainError."""
    cfg, total = trainers[0].cfg, trainers[0].total_steps
    log_every = cfg.log_every or max(1, total // CURVE_POINTS)
    histories = histories or [[] for _ in trainers]
    done = trainers[0].steps_done
    started = time.perf_counter()
    with tqdm(total=total * cfg.batch, initial=done * cfg.batch, unit="tok",
              unit_scale=True, desc=desc, disable=not progress) as bar:
        for step in range(done + 1, total + 1):
            step_batches = next(batches, None)
            if step_batches is None:
                raise TrainError(f"the activations ran out after {step - 1} of {total} "
                                 "steps: lower --tokens")
            for index, trainer in enumerate(trainers):
                stats = trainer.step(step_batches[group_of[index]])
                if step % log_every == 0 or step == total:
                    histories[index].append(asdict(stats))
                if on_step is not None:
                    on_step(index, stats)
            bar.update(cfg.batch)
            if checkpoint is not None and cfg.checkpoint_every and (
                    step % cfg.checkpoint_every == 0):
                checkpoint(histories)
    return histories, time.perf_counter() - started
