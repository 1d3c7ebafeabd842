"""``saelab bench capture``: tokens/s of the early-stopping capture (``hooks.block_output``)
against a naive full forward with ``output_hidden_states=True``, batch for batch on the
same contexts, alternating the two, median over batches; the two outputs are checked to be
equal."""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch
from torch import Tensor

from training.bench.timing import timed
from training.data.corpus import iter_texts
from training.data.hooks import block_output
from training.data.models import LoadedModel
from training.data.packing import pack_contexts


def bench_capture(lm: LoadedModel, *, layer: int, batches: int = 6, batch: int = 8,
                  context: int = 128, dataset: str = "embedded") -> dict[str, Any]:
    """Early-stop capture vs ``output_hidden_states=True`` on ``batches`` batches
    [batch, context] of ``dataset``; the first batch of each is a discarded warm-up."""
    lm.check_layer(layer)
    stream = pack_contexts(iter_texts(dataset), lm.tokenizer, context, lm.bos_id)
    groups = [torch.tensor(g) for g in _chunks(stream, batch, batches + 1)]
    if len(groups) < 2:
        raise ValueError(f"--dataset {dataset} has too little text for two batches")
    ours, naive, max_diff = [], [], 0.0
    for index, ids in enumerate(groups):
        ids = ids.to(lm.device)
        t_ours, early = timed(lambda ids=ids: block_output(lm.model, lm.blocks, layer, ids))
        t_naive, full = timed(lambda ids=ids: _hidden_states(lm, ids)[layer + 1])
        max_diff = max(max_diff, float((early.float() - full.float()).abs().max()))
        if index:
            ours.append(t_ours)
            naive.append(t_naive)
    tokens = batch * context
    ours_tps, naive_tps = tokens / statistics.median(ours), tokens / statistics.median(naive)
    return {"bench": "capture", "model": lm.name, "layer": layer, "n_layers": lm.n_layers,
            "batch": batch, "context": context, "batches": len(ours),
            "threads": torch.get_num_threads(), "device": str(lm.device),
            "max_abs_diff": max_diff, "naive_tokens_per_s": naive_tps,
            "saelab_tokens_per_s": ours_tps, "speedup": ours_tps / naive_tps}


@torch.inference_mode()
def _hidden_states(lm: LoadedModel, ids: Tensor) -> tuple[Tensor, ...]:
    return lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _chunks(stream, size: int, count: int) -> list[list[list[int]]]:
    groups = []
    for _ in range(count):
        group = list(itertools.islice(stream, size))
        if len(group) < size:
            break
        groups.append(group)
    return groups


