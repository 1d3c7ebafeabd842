"""The engine end to end on the embedded SmolLM2-135M: capture -> train -> eval."""

from __future__ import annotations

import json

import pytest

from training.evaluation.metrics import evaluate_sae_on_dataset
from training.sae.folder import load_sae

pytestmark = pytest.mark.slow


def test_embedded_sae_reconstructs_and_recovers_loss(embedded_model, embedded_sae) -> None:
    metrics = json.loads((embedded_sae["sae"] / "metrics.json").read_text())
    assert metrics["heldout_fvu"] < 0.5 and metrics["heldout_l0"] <= 16
    sae, cfg = load_sae(embedded_sae["sae"])
    assert cfg["model_name"] == "smollm2-135m" and cfg["hook_layer"] == 3
    manifest = json.loads((embedded_sae["acts"] / "manifest.json").read_text())
    ev = evaluate_sae_on_dataset(embedded_model, sae, 3, dataset="embedded", tokens=1024,
                                 skip_contexts=manifest["contexts"], progress=False)
    # The SAE keeps most of what zero-ablating the layer's output destroys.
    assert ev.ce_clean < ev.ce_sae < ev.ce_ablate
    assert ev.ce_loss_recovered > 0.5
    assert 0 < ev.fvu < 0.6 and ev.kl > 0 and ev.l0 <= 16
