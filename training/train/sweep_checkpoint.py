"""A sweep's checkpoint: every member's trainer in one file, so a sweep resumes.

Every ``checkpoint_every`` steps a sweep saves one file holding its members' folders,
their settings, each one's trainer state (weights, optimiser, firing counts, step) and
logged history, and what its batch stream needs to continue: nothing more for a sweep
from a capture (the batch order is a function of the seed: the trained batches are
skipped), the contexts read and each block's held-out rows for a sweep from the model.
The file lives in the *last* member's partial directory, the last one a sweep removes as
it puts its members in place, so a sweep stopped even then can resume. It is written
under a temporary name and renamed: a checkpoint is whole, or the one before it.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from training.train.run import TrainError, check_settings, load_trainer, partial_dir
from training.train.trainer import Trainer

log = logging.getLogger(__name__)

SWEEP_CHECKPOINT = "sweep-checkpoint.pt"
SOURCES = {"capture": "a capture (--acts)", "model": "the model (no --acts)"}
"""What a sweep reads, as its checkpoint records it: a resume must read the same."""


def checkpoint_path(outs: Sequence[Path]) -> Path:
    """Where the sweep writing ``outs`` (in order) keeps its checkpoint."""
    return partial_dir(Path(outs[-1])) / SWEEP_CHECKPOINT


def save_sweep_checkpoint(outs: Sequence[Path], trainers: Sequence[Trainer],
                          histories: Sequence[list[dict]], settings: Sequence[dict],
                          stream: dict | None = None) -> None:
    """Every member's state after the same step; ``stream`` is the model stream's
    position (``{"contexts": int, "holdouts": [Tensor]}``), None for a capture's."""
    path = checkpoint_path(outs)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"source": "capture" if stream is None else "model",
                "members": _names(outs), "settings": list(settings),
                "trainers": [trainer.state_dict() for trainer in trainers],
                "histories": [list(history) for history in histories],
                "stream": stream or {}}, tmp)
    os.replace(tmp, path)


def load_sweep_checkpoint(outs: Sequence[Path], trainers: Sequence[Trainer],
                          settings: Sequence[dict], flags: dict[str, str],
                          source: str) -> dict:
    """The checkpoint of the sweep writing ``outs``, loaded into ``trainers`` once it is
    the same sweep: one reading the same ``source`` (a key of ``SOURCES``), the same
    member folders in the same order, and each member's saved settings equal to
    ``settings`` on every key of ``flags`` (a difference names its flag). Returns
    ``{"histories": [...], "stream": {...}}``."""
    path = checkpoint_path(outs)
    if not path.is_file():
        raise TrainError(f"nothing to resume: no sweep checkpoint in {path.parent}")
    try:
        state = torch.load(path, map_location=trainers[0].device, weights_only=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise TrainError(f"cannot read the sweep checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("source") not in SOURCES:
        raise TrainError(f"{path} is not a sweep checkpoint")
    if state["source"] != source:
        raise TrainError(f"the sweep checkpoint in {path.parent} is of a sweep from "
                         f"{SOURCES[state['source']]}: --resume it from there")
    if state.get("members") != _names(outs):
        raise TrainError("--resume needs the interrupted sweep's members: it trained "
                         f"{', '.join(state.get('members') or [])}; now "
                         f"{', '.join(_names(outs))}")
    for saved, now in zip(state["settings"], settings, strict=True):
        check_settings(saved, now, flags, "sweep")
    for trainer, trainer_state in zip(trainers, state["trainers"], strict=True):
        load_trainer(trainer, trainer_state, path)
    log.info("resumed the sweep of %d SAEs at step %d", len(trainers), trainers[0].steps_done)
    return {"histories": state["histories"], "stream": state["stream"]}


def _names(outs: Sequence[Path]) -> list[str]:
    """The members' folders, absolute: a resume from another working directory is the
    same sweep."""
    return [str(Path(out).resolve()) for out in outs]
