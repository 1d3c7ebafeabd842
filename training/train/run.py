"""A whole training run: cached activations in, a saved SAE folder out.

The run writes into a hidden sibling ``.<out>.partial``: a checkpoint every
``checkpoint_every`` steps there, the final ``cfg.json`` + ``sae.safetensors`` +
``metrics.json`` + ``loss_curve.csv`` at the end, then one rename to ``out``. ``resume``
continues from the partial directory's checkpoint (same data order: the batch stream is a
function of the seed, and the batches already trained on are skipped). A run that fails
before its first checkpoint removes the partial directory. Only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from training.data.activations import ActivationStore, estimate_input_scale
from training.data.stop import Interrupted
from training.sae.autoencoder import SaeConfig, SparseAutoencoder, fvu_loss, variance_sum
from training.sae.folder import replace_dir, save_sae
from training.train.distributed import DistContext
from training.train.trainer import StepStats, TrainConfig, Trainer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
CURVE_POINTS = 500
"""About how many points ``loss_curve.csv`` gets when ``log_every`` is not set."""
StepCallback = Callable[[StepStats], None]


class TrainError(ValueError):
    """A training run that cannot start (bad settings or inputs); the message says why."""


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def train(acts_dir: Path, out: Path, sae_cfg: SaeConfig, cfg: TrainConfig, *,
          resume: bool = False, dist: DistContext | None = None, progress: bool = True,
          on_step: StepCallback | None = None) -> dict:
    """Train an SAE on ``acts_dir`` and save it to ``out``; returns the metrics dict."""
    dist = dist or DistContext()
    out = Path(out)
    store, plan = plan_run(Path(acts_dir), {out: sae_cfg}, cfg)
    holdout, train_rows, total_steps = plan
    work = partial_dir(out)
    trainer = Trainer(sae_cfg, cfg, total_steps, dist, dist.device())
    try:
        history = _start(trainer, store, work, train_rows, resume, dist)
        started, first_step = time.perf_counter(), trainer.steps_done
        _loop(trainer, store, train_rows, work, history, dist, progress, on_step)
        seconds = time.perf_counter() - started
        metrics = final_metrics(trainer, store.tail(holdout) if holdout else None, history, (
            trainer.steps_done - first_step) * cfg.batch / max(seconds, 1e-9))
        if dist.is_main:
            write_run(trainer, out, work, metrics, history, **run_folder_fields(store))
    except BaseException as exc:
        if dist.is_main and not isinstance(exc, Interrupted) and not (
                work / CHECKPOINT).is_file():
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing
        raise
    dist.barrier()
    return metrics


def plan_run(acts_dir: Path, members: dict[Path, SaeConfig], cfg: TrainConfig
             ) -> tuple[ActivationStore, tuple[int, int, int]]:
    """The verified capture and (held-out rows, training rows, steps) of a run training
    each ``members`` SAE into its folder; refuses a width mismatch, an --out that would
    overwrite other data, or fewer rows than one batch."""
    store = ActivationStore(acts_dir)
    store.verify()
    for out, sae_cfg in members.items():
        if store.d_model != sae_cfg.d_in:
            raise TrainError(f"activations in {acts_dir} have d={store.d_model}, "
                             f"SAE d_in={sae_cfg.d_in}")
        if store.paired != sae_cfg.transcoder:
            raise TrainError(f"--acts {acts_dir} holds " + (
                "an MLP's inputs and outputs: it trains a transcoder (--site mlp)"
                if store.paired else "residual-stream activations: a transcoder needs a "
                "capture made with --site mlp"))
        _check_out(Path(out), Path(acts_dir))
    holdout = min(cfg.holdout_rows, len(store) // 10)
    train_rows = len(store) - holdout
    total_steps = (cfg.tokens or train_rows) // cfg.batch
    if total_steps < 1:
        raise TrainError(f"{acts_dir} has {train_rows} training rows, fewer than one --batch "
                         f"({cfg.batch})")
    return store, (holdout, train_rows, total_steps)


def _check_out(out: Path, acts_dir: Path) -> None:
    """Refuse an --out that would overwrite something other than an earlier SAE."""
    if out.resolve() == acts_dir.resolve() or acts_dir.resolve().is_relative_to(out.resolve()):
        raise TrainError(f"--out {out} would overwrite the activations in --acts {acts_dir}")
    check_out(out)


def check_out(out: Path) -> None:
    """An output folder a run may replace: absent, or an SAE folder."""
    if out.exists() and not (out / "cfg.json").is_file():
        raise TrainError(f"--out {out} exists and is not an SAE folder; choose a new --out")


RUN_FLAGS = {"n_latents": "--latents", "k": "--k", "architecture": "--arch",
             "dead_tokens": "--dead-tokens", "batch": "--batch", "tokens": "--tokens",
             "lr": "--lr", "seed": "--seed", "matryoshka_widths": "--matryoshka",
             "skip": "--skip", "precision": "--precision",
             "d_in": "activations of width"}


def run_settings(trainer: Trainer) -> dict:
    """What a checkpoint records of its run, for a resume to compare against."""
    return {**trainer.sae.cfg.to_dict(), **trainer.cfg.to_dict()}


def load_checkpoint(work: Path, trainer: Trainer, now: dict,
                    flags: dict[str, str] = RUN_FLAGS) -> dict:
    """The checkpoint in ``work``, loaded into ``trainer`` once its recorded settings
    match ``now`` on every key of ``flags`` (each one that differs is named by its flag:
    a resumed run must use the interrupted one's model shape, batch stream and
    schedule); returns the whole saved state."""
    checkpoint = work / CHECKPOINT
    if not checkpoint.is_file():
        raise TrainError(f"nothing to resume: no checkpoint in {work}")
    try:
        state = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainError(f"cannot read the checkpoint {checkpoint}: {exc}") from exc
    check_settings(state.get("settings", {}), now, flags)
    load_trainer(trainer, state["trainer"], checkpoint)
    return state


def load_trainer(trainer: Trainer, state: dict, checkpoint: Path) -> None:
    """A checkpoint's trainer state into ``trainer``; one that does not fit it (another
    shape, a damaged file) is a TrainError naming the file."""
    try:
        trainer.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise TrainError(f"the checkpoint {checkpoint} does not fit this run's SAE: "
                         f"{str(exc).splitlines()[0]}") from exc


def check_settings(saved: dict, now: dict, flags: dict[str, str], what: str = "run") -> None:
    """Refuse a resume whose settings ``now`` differ from the ``saved`` ones on a key of
    ``flags``, naming each such flag with both values."""
    differ = [f"{flag} {saved[key]!r} (now {now[key]!r})" for key, flag in flags.items()
              if key in saved and saved[key] != now[key]]
    if differ:
        raise TrainError(f"--resume needs the interrupted {what}'s settings: it used "
                         + ", ".join(differ))


def _start(trainer: Trainer, store: ActivationStore, work: Path, train_rows: int,
           resume: bool, dist: DistContext) -> list[dict]:
    if resume:
        state = load_checkpoint(work, trainer, run_settings(trainer))
        log.info("resumed at step %d", trainer.steps_done)
        return state["history"]
    if dist.is_main:
        discard_partial(work)
    sample = store.sample(trainer.cfg.init_rows, seed=trainer.cfg.seed, limit_rows=train_rows)
    d = trainer.sae.cfg.d_in
    if trainer.sae.cfg.transcoder:  # the MLP's input and output, each with its own scale
        trainer.initialise(sample, estimate_input_scale(sample[:, :d]),
                           target_scale=estimate_input_scale(sample[:, d:]))
    else:
        trainer.initialise(sample, estimate_input_scale(sample))
    return []


def discard_partial(work: Path, checkpoint: str = CHECKPOINT) -> None:
    """Empty a partial directory for a run that starts afresh, saying so when it held a
    checkpoint that ``--resume`` would have continued."""
    if (work / checkpoint).is_file():
        log.warning("starting afresh: the checkpoint in %s is discarded (--resume would "
                    "have continued it)", work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)


def _loop(trainer: Trainer, store: ActivationStore, train_rows: int, work: Path,
          history: list[dict], dist: DistContext, progress: bool,
          on_step: StepCallback | None) -> None:
    cfg = trainer.cfg
    log_every = cfg.log_every or max(1, trainer.total_steps // CURVE_POINTS)
    batches = store.iter_shuffled(cfg.batch, seed=cfg.seed, limit_rows=train_rows)
    for _ in range(trainer.steps_done):  # the resumed run continues the same stream
        next(batches)
    bar = tqdm(total=trainer.total_steps * cfg.batch, initial=trainer.steps_done * cfg.batch,
               unit="tok", unit_scale=True, desc="train", disable=not (progress and dist.is_main))
    with bar:
        while trainer.steps_done < trainer.total_steps:
            stats = trainer.step(next(batches))
            bar.update(cfg.batch)
            if stats.step % log_every == 0 or stats.step == trainer.total_steps:
                history.append(asdict(stats))
                bar.set_postfix(fvu=f"{stats.fvu:.3f}", l0=f"{stats.l0:.0f}",
                                dead=f"{stats.dead_fraction:.1%}")
            if on_step is not None:
                on_step(stats)
            if cfg.checkpoint_every and stats.step % cfg.checkpoint_every == 0 and dist.is_main:
                _checkpoint(trainer, work, history)


def _checkpoint(trainer: Trainer, work: Path, history: list[dict]) -> None:
    tmp = work / f".{CHECKPOINT}.tmp"
    torch.save({"trainer": trainer.state_dict(), "history": history,
                "settings": run_settings(trainer)}, tmp)
    os.replace(tmp, work / CHECKPOINT)


@torch.no_grad()
def heldout_stats(sae: SparseAutoencoder, rows: torch.Tensor, input_scale: float = 1.0,
                  batch: int = 4096, target_scale: float = 1.0) -> dict[str, float]:
    """Inference-mode FVU, mean L0 and fraction of latents that never fire on raw rows [N, d]
    ([N, 2d], input ‖ output, for a transcoder: the FVU is the output's), in fp32 as the
    saved SAE runs, whatever precision it was trained in."""
    was_training, matmul_dtype = sae.training, sae.matmul_dtype
    sae.eval()
    sae.matmul_dtype = torch.float32
    rows = rows.float().to(sae.b_dec.device)
    d = sae.cfg.d_in
    x = rows[:, :d] * input_scale
    y = rows[:, d:] * target_scale if sae.cfg.transcoder else x
    err, l0 = 0.0, 0.0
    fired = torch.zeros(sae.cfg.n_latents, dtype=torch.bool, device=x.device)
    for part, want in zip(x.split(batch), y.split(batch), strict=True):
        enc = sae.encode(part)
        err += float(fvu_loss(want, sae.decode(enc.values, enc.indices, part),
                              torch.tensor(1.0)))
        active = enc.values > 0
        l0 += float(active.sum())
        fired[enc.indices[active]] = True
    sae.train(was_training)
    sae.matmul_dtype = matmul_dtype
    return {"heldout_fvu": err / float(variance_sum(y)), "heldout_l0": l0 / max(1, len(x)),
            "heldout_dead_fraction": 1 - float(fired.float().mean())}


def final_metrics(trainer: Trainer, holdout: torch.Tensor | None, history: list[dict],
                  tokens_per_s: float) -> dict:
    """A finished run's figures: the last logged step's, and the held-out rows' [N, d]
    (raw activations never trained on) when there are any; no tokens/s when no step ran
    in this process (a resume of a checkpoint at the last step)."""
    last = history[-1] if history else {}
    metrics = {"steps": trainer.steps_done, "tokens": trainer.steps_done * trainer.cfg.batch,
               "train_fvu": last.get("fvu"), "l0": last.get("l0"),
               "dead_fraction": last.get("dead_fraction"),
               "tokens_per_s": tokens_per_s if tokens_per_s > 0 else None,
               "input_scale": trainer.input_scale}
    if trainer.sae.cfg.transcoder:
        metrics["target_scale"] = trainer.target_scale
    if holdout is not None and len(holdout):
        stats = heldout_stats(trainer.sae, holdout, trainer.input_scale,
                              target_scale=trainer.target_scale)
        metrics.update(stats, heldout_explained_variance=1 - stats["heldout_fvu"],
                       heldout_rows=len(holdout))
    return metrics


def run_folder_fields(store: ActivationStore) -> dict:
    """``write_run``'s model, layer, context and cfg.json extras for a run on ``store``."""
    manifest = store.manifest
    return {"model": manifest.model, "layer": manifest.layer, "context": manifest.context,
            "extra": {"activations": str(store.directory), "dataset": manifest.dataset}}


def write_run(trainer: Trainer, out: Path, work: Path, metrics: dict, history: list[dict],
              *, model: str, layer: int, context: int, extra: dict) -> None:
    """Save the trained SAE with its metrics and loss curve in ``work``, then put it in
    place of ``out`` (atomically) and remove ``work``."""
    stage_run(trainer, work, metrics, history, model=model, layer=layer, context=context,
              extra=extra)
    publish_run(work, out)


def stage_run(trainer: Trainer, work: Path, metrics: dict, history: list[dict], *,
              model: str, layer: int, context: int, extra: dict) -> None:
    """Save the trained SAE with its metrics and loss curve in ``work/sae`` (a sweep
    stages every member before it publishes any, so a failure leaves no mixed family)."""
    save_sae(work / "sae", trainer.sae, trainer.input_scale, model=model, layer=layer,
             context=context, extra={"train": trainer.cfg.to_dict(), **extra},
             target_scale=trainer.target_scale)
    final = work / "sae"
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_curve(final / "loss_curve.csv", history)


def publish_run(work: Path, out: Path) -> None:
    """Put the SAE staged in ``work`` in place of ``out`` (atomically); remove ``work``."""
    replace_dir(work / "sae", out)
    shutil.rmtree(work, ignore_errors=True)


def _write_curve(path: Path, history: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(StepStats.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(history)
