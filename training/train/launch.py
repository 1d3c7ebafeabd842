"""Entry point of one training process, single or under torchrun.

``run_spec`` takes the JSON-able spec the CLI (or a worker) builds; ``python -m
training.train.launch SPEC.json RESULT.json`` is what torchrun starts on every rank (rank 0 writes
the metrics to RESULT.json). Multi-node runs use torchrun directly with this module.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from training.sae.autoencoder import SaeConfig
from training.train.distributed import DistContext
from training.train.run import StepCallback, train
from training.train.trainer import TrainConfig


def run_spec(spec: dict, dist: DistContext | None = None, progress: bool = True,
             on_step: StepCallback | None = None) -> dict:
    """Train as ``spec`` says: {acts, out, resume, sae: SaeConfig fields, train: TrainConfig
    fields, progress_file (optional)}; returns the metrics. With ``progress_file``, rank 0
    appends one JSON line of step figures per step (how a worker follows a torchrun job)."""
    if on_step is None and spec.get("progress_file") and (dist is None or dist.is_main):
        on_step = _step_writer(Path(spec["progress_file"]))
    return train(Path(spec["acts"]), Path(spec["out"]), SaeConfig.from_dict(spec["sae"]),
                 TrainConfig.from_dict(spec["train"]), resume=bool(spec.get("resume")),
                 dist=dist, progress=progress, on_step=on_step)


def _step_writer(path: Path) -> StepCallback:
    handle = path.open("a", buffering=1)

    def write(stats) -> None:
        handle.write(json.dumps(asdict(stats)) + "\n")

    return write


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    dist = DistContext.from_environment()
    try:
        metrics = run_spec(json.loads(spec_path.read_text()), dist)
    except (ValueError, OSError) as exc:  # bad input: one message for the CLI, no traceback
        if dist.is_main:
            result_path.write_text(json.dumps({"error": str(exc)}))
        return 2
    finally:
        dist.close()
    if dist.is_main:
        result_path.write_text(json.dumps(metrics))
    return 0


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this rank when its parent (torchrun's agent, or the CLI) dies,
    however it dies: a rank must not train on as an orphan."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
