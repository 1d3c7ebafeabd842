"""Evaluation on the tiny random Llama: the shared-prefix passes give the figures that three
whole forward passes give, at every layer (the last one included)."""

from __future__ import annotations

import pytest
import torch

from training.sae.autoencoder import SaeConfig, SparseAutoencoder
from training.train import metrics


def _batches(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batches = [torch.randint(4, 512, (3, 40), generator=generator) for _ in range(2)]
    for ids in batches:
        ids[:, 0] = 1  # BOS
    return batches


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_shared_prefix_equals_three_whole_passes(tiny_model, layer, monkeypatch) -> None:
    torch.manual_seed(layer)
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8))
    monkeypatch.setattr(metrics, "LOSS_CHUNK", 37)  # chunks that split a context
    shared = metrics.evaluate(tiny_model, sae, layer, _batches(), progress=False)
    whole = metrics.evaluate(tiny_model, sae, layer, _batches(), progress=False,
                             share_prefix=False)
    for name, value in whole.to_dict().items():
        assert getattr(shared, name) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert shared.kl > 0 and shared.ce_ablate != shared.ce_clean and shared.tokens == 6 * 39


def test_models_whose_blocks_differ_run_whole_passes(tiny_model, monkeypatch) -> None:
    config = tiny_model.model.config
    assert metrics._Suffix.of(tiny_model, 1) is not None
    monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"] * 2,
                        raising=False)
    assert metrics._Suffix.of(tiny_model, 1) is None
    monkeypatch.setattr(config, "layer_types", None, raising=False)
    monkeypatch.setattr(config, "model_type", "granite", raising=False)
    assert metrics._Suffix.of(tiny_model, 1) is None
