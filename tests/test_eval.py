"""Evaluation on the tiny random Llama: the shared-prefix passes (and the ablated pass shared
by every batch) give the figures that three whole forward passes give, at every layer (the
last one included)."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_eval import tiny_batches as _batches
from tests.tiny_eval import tiny_sae
from training.data.hooks import edit_site
from training.evaluation import ablation, metrics
from training.evaluation import losses as eval_losses
from training.evaluation.suffix import Suffix
from training.sae.autoencoder import SaeConfig, SparseAutoencoder


@pytest.mark.parametrize("site", ["resid", "mlp"])
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_shared_prefix_equals_three_whole_passes(tiny_model, layer, site, monkeypatch) -> None:
    """An SAE of block L's output, or a transcoder of its MLP (whose edit is the block's
    clean output with the MLP's output swapped), at every layer, the last one included."""
    sae = tiny_sae(site, seed=layer)
    monkeypatch.setattr(eval_losses, "LOSS_CHUNK", 37)  # chunks that split a context
    shared = metrics.evaluate(tiny_model, sae, layer, _batches(), progress=False)
    whole = metrics.evaluate(tiny_model, sae, layer, _batches(), progress=False,
                             share_prefix=False)
    # CE loss recovered divides by CE_ablate − CE_clean, which zeroing the tiny model's MLP
    # makes small: the CEs' float32 rounding (relative 1e-7) grows by CE / that span
    span = abs(whole.ce_ablate - whole.ce_clean)
    for name, value in whole.to_dict().items():
        rel = 1e-5 * (whole.ce_ablate / span if name == "ce_loss_recovered" else 1)
        assert getattr(shared, name) == pytest.approx(value, rel=rel, abs=1e-6), name
    assert shared.kl > 0 and shared.ce_ablate != shared.ce_clean and shared.tokens == 6 * 39
    if site == "mlp":  # the edit is added to the recorded residual, as the block adds it
        assert shared.to_dict() == whole.to_dict()


@pytest.mark.parametrize("site", ["resid", "mlp"])
def test_a_bf16_model_shares_its_prefix_too(tiny_llama_dir, data_dir, site) -> None:
    """With the model in bf16 (``--precision bf16``) the SAE or transcoder runs in float32
    between bf16 blocks, and the shared prefix still gives the whole passes' figures."""
    from training.data.models import load_model

    bf16 = load_model(str(tiny_llama_dir), data_dir=data_dir, device="cpu",
                      dtype=torch.bfloat16)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    torch.manual_seed(3)
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8, site=site,
                                      architecture="batchtopk" if site == "mlp" else "topk"))
    if site == "mlp":
        with torch.no_grad():
            sae.threshold.fill_(0.05)
    shared = metrics.evaluate(bf16, sae, 2, _batches(), progress=False)
    whole = metrics.evaluate(bf16, sae, 2, _batches(), progress=False, share_prefix=False)
    for name in ("fvu", "l0", "ce_clean", "ce_sae", "ce_ablate", "kl"):
        assert getattr(shared, name) == pytest.approx(getattr(whole, name), rel=1e-6), name
    assert shared.kl > 0 and shared.l0 > 0
    if site == "mlp":
        assert shared.to_dict() == whole.to_dict()


@pytest.mark.parametrize("site", ["resid", "mlp"])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_a_family_gets_the_figures_each_sae_gets_alone(tiny_model, share_prefix, site,
                                                        monkeypatch) -> None:
    """A sweep's SAEs (or transcoders) evaluated together (one clean pass per batch for
    all) get exactly the figures ``evaluate`` gives each of them alone."""
    torch.manual_seed(7)
    arch = "batchtopk" if site == "mlp" else "topk"
    family = [SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8, architecture=arch,
                                          site=site)),
              SparseAutoencoder(SaeConfig(d_in=64, n_latents=256, k=16, architecture=arch,
                                          site=site)),
              SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=4, site=site,
                                          architecture="batchtopk"))]
    for sae in family[::2]:  # thresholds that differ, so the three differ at the MLP too
        with torch.no_grad():
            sae.threshold.fill_(0.02 * sae.cfg.k)
    monkeypatch.setattr(eval_losses, "LOSS_CHUNK", 37)
    together = metrics.evaluate_family(tiny_model, family, 2, _batches(3), progress=False,
                                       share_prefix=share_prefix)
    alone = [metrics.evaluate(tiny_model, sae, 2, _batches(3), progress=False,
                              share_prefix=share_prefix) for sae in family]
    for got, expected in zip(together, alone, strict=True):
        for name, value in expected.to_dict().items():
            assert getattr(got, name) == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert len({round(m.ce_sae, 6) for m in together}) == 3  # three different SAEs


def test_a_family_is_one_site_of_one_width(tiny_model) -> None:
    resid = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8))
    mlp = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8, architecture="batchtopk",
                                      site="mlp"))
    with pytest.raises(ValueError, match="different sites"):
        metrics.evaluate_family(tiny_model, [resid, mlp], 1, _batches(), progress=False)
    with pytest.raises(ValueError, match="no SAEs"):
        metrics.evaluate_family(tiny_model, [], 1, _batches(), progress=False)
    wide = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4))
    with pytest.raises(ValueError, match="d_in=32"):
        metrics.evaluate_family(tiny_model, [resid, wide], 1, _batches(), progress=False)


def test_low_precision_logits_get_float32_log_probs() -> None:
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 300) * 4).bfloat16()
    ids = torch.randint(0, 300, (2, 6))
    log_p, ce = eval_losses.clean_log_probs(logits, ids)
    expected = torch.log_softmax(logits.float(), -1)
    assert log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, expected, rtol=0, atol=1e-6)
    picked = expected.gather(2, ids[:, 1:].unsqueeze(2))
    assert ce == pytest.approx(-float(picked.sum()), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_saes_losses_are_those_of_the_familys_path(dtype, monkeypatch) -> None:
    """One SAE computes both log-softmaxes a chunk at a time instead of keeping the clean
    log-probabilities: the same figures, bit for bit."""
    torch.manual_seed(1)
    clean, spliced = ((torch.randn(3, 9, 300) * 4).to(dtype) for _ in range(2))
    ids = torch.randint(0, 300, (3, 10))
    monkeypatch.setattr(eval_losses, "LOSS_CHUNK", 4)
    ce_clean, ce_sae, kl = eval_losses.pair_losses(clean, spliced, ids)
    log_p, expected_clean = eval_losses.clean_log_probs(clean.clone(), ids)
    assert (ce_clean, ce_sae, kl) == (expected_clean,
                                      *eval_losses.spliced_losses(log_p, spliced, ids))
    assert kl > 0


def test_models_whose_blocks_differ_run_whole_passes(tiny_model, monkeypatch) -> None:
    config = tiny_model.model.config
    assert Suffix.of(tiny_model, 1) is not None
    monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"] * 2,
                        raising=False)
    assert Suffix.of(tiny_model, 1) is None
    monkeypatch.setattr(config, "layer_types", None, raising=False)
    monkeypatch.setattr(config, "model_type", "granite", raising=False)
    assert Suffix.of(tiny_model, 1) is None


def test_a_transcoder_without_a_recordable_residual_runs_whole_passes(tiny_model, monkeypatch
                                                                     ) -> None:
    """Without a post-attention norm there is no residual to add the edit to: block 1's
    transcoder runs whole passes, and block 1's SAE, or block 2's transcoder, still do not."""
    assert Suffix.of(tiny_model, 1, "mlp") is not None
    monkeypatch.delattr(tiny_model.blocks[1], "post_attention_layernorm")
    assert Suffix.of(tiny_model, 1, "mlp") is None
    assert Suffix.of(tiny_model, 1) is not None
    assert Suffix.of(tiny_model, 2, "mlp") is not None


def _ablated_log_probs_per_batch(lm, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """log p [B, T − 1, V] of the zero-ablated model, run on these very contexts."""
    with edit_site(lm.blocks, layer, "resid", ablation.zero_after_bos):
        logits = lm.model(input_ids=ids, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("layer", [0, 2, 3])
@torch.inference_mode()
def test_the_ablated_pass_does_not_depend_on_the_text(tiny_model, layer) -> None:
    """The claim the shared ablated pass rests on: with block L's output zeroed after BOS,
    every context gets the same log-probabilities at each position, so one context's serve
    all (and a longer context's first rows serve a shorter one)."""
    ids = torch.cat(_batches(seed=layer))  # 6 different texts, BOS first
    per_batch = _ablated_log_probs_per_batch(tiny_model, layer, ids)
    shared = ablation.ablated_log_probs(tiny_model, layer, ids)
    for row in per_batch:
        torch.testing.assert_close(row, shared, rtol=1e-5, atol=1e-5)
    ce = -per_batch.gather(2, ids[:, 1:, None]).double().sum()
    assert ablation.summed_ce(shared, ids) == pytest.approx(float(ce), rel=1e-5)
    short = ids[:, :17]
    torch.testing.assert_close(ablation.ablated_log_probs(tiny_model, layer, short),
                               _ablated_log_probs_per_batch(tiny_model, layer, short[:1])[0],
                               rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_the_ablated_pass_runs_once_until_the_model_changes(tiny_model) -> None:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=64, n_latents=128, k=8))
    metrics.evaluate(tiny_model, sae, 1, _batches(), progress=False)
    entry = ablation._MEMO[tiny_model.model]
    metrics.evaluate(tiny_model, sae, 1, _batches(seed=5), progress=False)
    assert ablation._MEMO[tiny_model.model] is entry  # other texts: not recomputed
    weight = tiny_model.blocks[2].mlp.down_proj.weight
    saved = weight.clone()
    try:
        weight.mul_(2)  # edited in place: the cached pass is stale
        ids = _batches()[0]
        torch.testing.assert_close(ablation.ablated_log_probs(tiny_model, 1, ids),
                                   _ablated_log_probs_per_batch(tiny_model, 1, ids)[0],
                                   rtol=1e-5, atol=1e-5)
        assert ablation._MEMO[tiny_model.model] is not entry
    finally:
        weight.copy_(saved)


@torch.inference_mode()
def test_the_ablated_pass_is_not_shared_where_contexts_or_hooks_differ(tiny_model) -> None:
    ids = _batches()[0]
    assert ablation.ablated_log_probs(tiny_model, 1, ids) is not None
    mixed = ids.clone()
    mixed[1, 0] = 7  # a context that does not start with BOS
    assert ablation.ablated_log_probs(tiny_model, 1, mixed) is None
    handle = tiny_model.blocks[3].register_forward_hook(lambda _m, _i, out: out)
    try:
        assert ablation.ablated_log_probs(tiny_model, 1, ids) is None
    finally:
        handle.remove()


@pytest.mark.slow
@torch.inference_mode()
def test_the_embedded_models_ablated_pass_does_not_depend_on_the_text(embedded_model
                                                                      ) -> None:
    ids = next(metrics.dataset_batches(embedded_model, "embedded", tokens=3 * 63,
                                       context=64, batch=3))
    for layer in (6, 15):
        per_batch = _ablated_log_probs_per_batch(embedded_model, layer, ids)
        ce = -per_batch.gather(2, ids[:, 1:, None]).double().sum()
        shared = ablation.ablated_log_probs(embedded_model, layer, ids)
        assert ablation.summed_ce(shared, ids) == pytest.approx(float(ce), rel=1e-5)
