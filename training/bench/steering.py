"""``saelab bench steer``: decode tokens/s of a steered model against the same model
unsteered."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from training.bench.timing import timed
from training.data.models import LoadedModel
from training.inference.steering import Sampling, Steer, chat_prompt_ids, generate, steering_edit
from training.sae.autoencoder import SparseAutoencoder


def bench_steering(lm: LoadedModel, sae: SparseAutoencoder, layer: int, steers: Sequence[Steer],
                   max_activations: Mapping[int, float], *, prompt: str, tokens: int = 128,
                   repeats: int = 5) -> dict[str, Any]:
    """Decode tokens/s of ``generate`` unsteered vs steered by ``steers`` at ``layer``:
    greedy, exactly ``tokens`` new tokens each (prompt prefill included in the time),
    one discarded warm-up of each, then ``repeats`` alternating runs; medians."""
    lm.check_layer(layer)
    if repeats < 1:
        raise ValueError(f"--repeats must be positive (got {repeats})")
    edit = steering_edit(sae, steers, max_activations)
    prompt_ids = chat_prompt_ids(lm, prompt)
    sampling = Sampling(temperature=0.0, max_tokens=tokens)

    def run(steer: bool) -> tuple[float, str]:
        pieces = generate(lm, layer, edit if steer else None, prompt_ids, sampling,
                          ignore_eos=True)
        return timed(lambda: "".join(pieces))

    times: dict[bool, list[float]] = {False: [], True: []}
    texts: dict[bool, str] = {}
    for index in range(repeats + 1):
        for steer in (False, True):
            seconds, texts[steer] = run(steer)
            if index:
                times[steer].append(seconds)
    plain_tps = tokens / statistics.median(times[False])
    steered_tps = tokens / statistics.median(times[True])
    return {"bench": "steering", "model": lm.name, "layer": layer,
            "n": sae.cfg.n_latents, "steers": len(steers), "prompt_tokens": len(prompt_ids),
            "tokens": tokens, "repeats": repeats, "threads": torch.get_num_threads(),
            "device": str(lm.device), "text_changed": texts[True] != texts[False],
            "unsteered_tokens_per_s": plain_tps, "steered_tokens_per_s": steered_tps,
            "ratio": steered_tps / plain_tps}
