"""``saelab bench eval``: the evaluation's shared-prefix passes against three whole forward
passes, on the same batches, alternated batch by batch.

Both paths compute the same figures (checked: ``max_rel_diff``); only their cost differs.
With a bf16 copy of the model, ``bench_eval`` also times the shared-prefix evaluation in bf16
(the SAE and the losses in float32) and says how far its figures are from fp32's. With a
records folder it also times the evaluation that records its clean pass, and the one that
reads that record (each batch recorded, then read: the cost of an evaluation of text at a
block already evaluated, whatever the SAE).
``bench_family`` times a sweep's evaluation: S SAEs of one layer evaluated together
(one clean pass per batch for all) against each evaluated alone, both ways.
The clean pass always runs the whole model; the shared path then runs blocks L+1.. and the
LM head for the spliced pass (and, for a transcoder, the ablated one; an SAE's ablated pass
is cached per model and layer) where the whole path runs the model twice more, so the
gain grows with how early block L is and shrinks with the LM head's share of the cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from training.bench.timing import timed
from training.data.models import LoadedModel
from training.evaluation.metrics import EvalMetrics, dataset_batches, evaluate, evaluate_family
from training.evaluation.records import CleanRecords
from training.sae.autoencoder import SparseAutoencoder


def bench_eval(lm: LoadedModel, sae: SparseAutoencoder, layer: int, *, tokens: int = 4096,
               batch: int = 8, context: int = 128, dataset: str = "embedded",
               bf16: LoadedModel | None = None, records: CleanRecords | None = None
               ) -> dict[str, Any]:
    """Tokens/s of ``evaluate`` with and without the shared prefix (medians over batches,
    after one warm-up batch of each) and the largest relative difference of their figures.
    With ``bf16`` (the same model in bf16) also its shared-prefix evaluation, and how far
    each of its figures is from fp32's on the same batches. With ``records`` (an empty
    folder) also the evaluation that records the clean pass and the one that reads it."""
    paths = {"shared": lambda ids: [evaluate(lm, sae, layer, [ids], progress=False)],
             "whole": lambda ids: [evaluate(lm, sae, layer, [ids], progress=False,
                                            share_prefix=False)]}
    if bf16 is not None:
        paths["bf16"] = lambda ids: [evaluate(bf16, sae, layer, [ids], progress=False)]
    if records is not None:
        paths["recording"] = recorded_path(lm, sae, layer, records, "written")
        paths["read"] = recorded_path(lm, sae, layer, records, "read")
    rates, figures = _alternate(paths, _batches(lm, dataset, tokens, batch, context))
    result = {"bench": "eval", "model": lm.name, "layer": layer, "n_layers": lm.n_layers,
              "n": sae.cfg.n_latents, "batch": batch, "context": context,
              "timed_batches": len(figures["shared"]), "threads": torch.get_num_threads(),
              "device": str(lm.device), "whole_passes_tokens_per_s": rates["whole"],
              "shared_prefix_tokens_per_s": rates["shared"],
              "speedup": rates["shared"] / rates["whole"],
              "max_rel_diff": max_rel_diff(figures["shared"], figures["whole"])}
    if bf16 is not None:
        result["bf16"] = {
            "shared_prefix_tokens_per_s": rates["bf16"],
            "vs_fp32_whole_passes": rates["bf16"] / rates["whole"],
            "vs_fp32_shared_prefix": rates["bf16"] / rates["shared"],
            "max_abs_diff": _max_abs_diff(figures["bf16"], figures["shared"]),
            "fp32_mean": _mean(figures["shared"]), "bf16_mean": _mean(figures["bf16"])}
    if records is not None:
        result["records"] = {
            "recording_tokens_per_s": rates["recording"], "read_tokens_per_s": rates["read"],
            "recording_vs_shared_prefix": rates["recording"] / rates["shared"],
            "read_vs_whole_passes": rates["read"] / rates["whole"],
            "read_vs_shared_prefix": rates["read"] / rates["shared"],
            "read_max_rel_diff": max_rel_diff(figures["read"], figures["shared"]),
            "recording_max_rel_diff": max_rel_diff(figures["recording"], figures["shared"])}
    return result


def recorded_path(lm: LoadedModel, sae: SparseAutoencoder, layer: int, records: CleanRecords,
              outcome: str) -> Callable[[torch.Tensor], list[EvalMetrics]]:
    """``evaluate`` with ``records``, refusing to time a batch whose clean pass was not
    ``outcome`` ("written": recorded now; "read": from the record)."""
    def path(ids: torch.Tensor) -> list[EvalMetrics]:
        figures = evaluate(lm, sae, layer, [ids], progress=False, records=records)
        if records.outcome != outcome:
            raise RuntimeError(f"the clean pass was {records.outcome!r}, not {outcome!r}")
        return [figures]

    return path


def _alternate(paths: dict[str, Callable[[torch.Tensor], list[EvalMetrics]]],
               batches: list[torch.Tensor]) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Run every path on each batch in turn: each path's tokens/s (the median over the
    batches after the first, a warm-up) and its figures on those batches, in order."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    figures: dict[str, list[dict]] = {name: [] for name in paths}
    for index, ids in enumerate(batches):
        for name, path in paths.items():
            seconds, results = timed(lambda ids=ids, path=path: path(ids))
            if index:
                times[name].append(seconds / sum(r.tokens for r in results))
                figures[name].extend(r.to_dict() for r in results)
    return {name: 1 / statistics.median(t) for name, t in times.items()}, figures


def _batches(lm: LoadedModel, dataset: str, tokens: int, batch: int, context: int
             ) -> list[torch.Tensor]:
    """``tokens`` timed tokens of ``dataset`` in batches [batch, context], plus one warm-up
    batch in front."""
    batches = list(dataset_batches(lm, dataset, tokens=tokens + batch * (context - 1),
                                   context=context, batch=batch))
    if len(batches) < 3:
        raise ValueError(f"--tokens {tokens}: too few for two timed batches of {batch}")
    return batches


def max_rel_diff(a: list[dict], b: list[dict]) -> float:
    worst = 0.0
    for left, right in zip(a, b, strict=True):
        for name, value in left.items():
            other = right[name]
            worst = max(worst, abs(value - other) / max(abs(other), 1e-9))
    return worst


def _max_abs_diff(a: list[dict], b: list[dict]) -> dict[str, float]:
    """Each figure's largest |a − b| over the batches."""
    return {name: max(abs(left[name] - right[name]) for left, right in zip(a, b, strict=True))
            for name in a[0]}


def _mean(figures: list[dict]) -> dict[str, float]:
    return {name: statistics.fmean(row[name] for row in figures) for name in figures[0]}


def bench_family(lm: LoadedModel, saes: list[SparseAutoencoder], layer: int, *,
                 tokens: int = 4096, batch: int = 8, context: int = 128,
                 dataset: str = "embedded") -> dict[str, Any]:
    """Per-SAE tokens/s of evaluating ``saes`` together (``evaluate_family``) and each
    alone, with the shared prefix and with three whole passes; the three paths alternate
    batch by batch, medians over the batches after a warm-up one. ``max_rel_diff``: the
    family's figures against each SAE's alone."""
    batches = _batches(lm, dataset, tokens, batch, context)
    paths = {
        "family": lambda ids: evaluate_family(lm, saes, layer, [ids], progress=False),
        "alone": lambda ids: [evaluate(lm, sae, layer, [ids], progress=False)
                              for sae in saes],
        "whole": lambda ids: [evaluate(lm, sae, layer, [ids], progress=False,
                                       share_prefix=False) for sae in saes]}
    rates, figures = _alternate(paths, batches)
    return {"bench": "eval-family", "model": lm.name, "layer": layer,
            "n_layers": lm.n_layers, "saes": len(saes),
            "n": [sae.cfg.n_latents for sae in saes], "k": [sae.cfg.k for sae in saes],
            "batch": batch, "context": context,
            "timed_batches": len(figures["family"]) // len(saes),
            "threads": torch.get_num_threads(), "device": str(lm.device),
            "tokens_per_s_per_sae": rates,
            "family_vs_alone": rates["family"] / rates["alone"],
            "family_vs_whole_passes": rates["family"] / rates["whole"],
            "max_rel_diff": max_rel_diff(figures["family"], figures["alone"])}
