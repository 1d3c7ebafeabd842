"""The evaluation as it first shipped (three whole passes, ``training/train/metrics.py`` of
commit 1c104cb^, read with ``git show``) against today's, in fp32 and with the model in
bf16, and in fp32 recording its clean pass and then reading that record (an evaluation of
text at a block already evaluated), on the same batches of 8 × 128 tokens, alternated batch
by batch; medians over the batches after two warm-up ones. A random n = 8,192, k = 32 SAE
(the cost does not depend on its weights). Prints one JSON line per block.

    .venv/bin/python bench/eval_vs_original.py 15 6
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.cli.common import load_lm  # noqa: E402
from training.bench.evaluation import max_rel_diff, recorded_path  # noqa: E402
from training.bench.timing import timed  # noqa: E402
from training.evaluation import metrics  # noqa: E402
from training.evaluation.records import CleanRecords  # noqa: E402
from training.sae.autoencoder import SaeConfig, SparseAutoencoder  # noqa: E402

ORIGINAL = "1c104cb^:training/train/metrics.py"


def _original_metrics() -> types.ModuleType:
    source = subprocess.run(["git", "-C", str(ROOT), "show", ORIGINAL], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("original_metrics")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, ORIGINAL, "exec"), module.__dict__)
    return module


def main(layers: list[int]) -> None:
    original = _original_metrics()
    fp32, bf16 = load_lm(None, None, "fp32"), load_lm(None, None, "bf16")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=fp32.d_model, n_latents=8192, k=32))
    batches = list(metrics.dataset_batches(fp32, "embedded", tokens=7 * 8 * 127, context=128,
                                           batch=8))
    with tempfile.TemporaryDirectory(prefix="saelab-records-") as work:
        records = CleanRecords(Path(work))
        for layer in layers:
            print(json.dumps(_compare(original, fp32, bf16, sae, batches, layer, records)),
                  flush=True)


def _one(path):
    """A path of ``training.bench.evaluation`` (a list of one evaluation's figures) as the
    evaluation's figures."""
    return lambda ids: path(ids)[0]


def _compare(original, fp32, bf16, sae, batches: list[torch.Tensor], layer: int,
             records: CleanRecords) -> dict:
    paths = {"original": lambda ids: original.evaluate(fp32, sae, layer, [ids],
                                                       progress=False),
             "fp32": lambda ids: metrics.evaluate(fp32, sae, layer, [ids], progress=False),
             "bf16": lambda ids: metrics.evaluate(bf16, sae, layer, [ids], progress=False),
             "recording": _one(recorded_path(fp32, sae, layer, records, "written")),
             "read": _one(recorded_path(fp32, sae, layer, records, "read"))}
    times: dict[str, list[float]] = {name: [] for name in paths}
    figures: dict[str, list[dict]] = {name: [] for name in paths}
    for index, ids in enumerate(batches):
        for name, path in paths.items():
            seconds, result = timed(lambda ids=ids, path=path: path(ids))
            if index >= 2:
                times[name].append(seconds / result.tokens)
                figures[name].append(result.to_dict())
    rates = {name: 1 / statistics.median(per_token) for name, per_token in times.items()}

    return {"bench": "eval-vs-original", "layer": layer, "tokens_per_s": rates,
            "fp32_vs_original": rates["fp32"] / rates["original"],
            "bf16_vs_original": rates["bf16"] / rates["original"],
            "recording_vs_original": rates["recording"] / rates["original"],
            "read_vs_original": rates["read"] / rates["original"],
            "fp32_max_rel_diff_vs_original": max_rel_diff(figures["fp32"], figures["original"]),
            "read_max_rel_diff_vs_fp32": max_rel_diff(figures["read"], figures["fp32"]),
            "timed_batches": len(times["fp32"]),
            "tokens_per_batch": 8 * 127, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [15, 6])
