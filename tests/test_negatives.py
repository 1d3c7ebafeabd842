"""The window pool behind detection scoring: codes match the SAE, silent windows are
exactly those where a latent never fires, tokens line up with the capture."""

from __future__ import annotations

import pytest
import torch

from tests.synthetic import sparse_rows, write_capture
from training.autointerp.negatives import window_pool
from training.data.activations import ActivationStore
from training.sae.autoencoder import SaeConfig, SparseAutoencoder


@pytest.fixture
def capture(tmp_path):
    acts = sparse_rows(16 * 100, 24)
    write_capture(tmp_path / "acts", acts, context=17, shard_contexts=40)
    return ActivationStore(tmp_path / "acts"), acts


@pytest.mark.parametrize("contexts", [10, 30, 500])
def test_pool_codes_and_silent_windows(capture, contexts) -> None:
    """The pool is the capture's last ``contexts`` contexts, across shards (the last
    shard holds 20 of the 100) and capped at what the capture holds."""
    store, acts = capture
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    pool = window_pool(sae, store, contexts=contexts, width=8)
    count = min(contexts, 100)
    assert pool.token_ids.shape == (2 * count, 8) and pool.values.shape == (2 * count, 8, 4)
    tail = acts[(100 - count) * 16:100 * 16]
    dense = sae.dense_latents(tail).reshape(2 * count, 8, 64)
    tokens = store.tokens()[100 - count:100, 1:].reshape(2 * count, 8)
    assert torch.equal(pool.token_ids, tokens.long())
    for feature in range(64):
        fires = (dense[..., feature] > 0).any(1)
        assert pool.silent_windows(feature) == torch.nonzero(~fires).flatten().tolist()
    feature = int(dense.flatten(0, 1).sum(0).argmax())
    window = int((dense[..., feature] > 0).any(1).nonzero()[0])
    assert pool.activations(window, feature) == pytest.approx(
        dense[window, :, feature].tolist(), abs=1e-5)


def test_a_last_shard_of_one_context_does_not_shrink_the_pool(tmp_path) -> None:
    """A capture whose last shard holds a single context (as a capture of a round number
    of tokens ends) still gives a pool of the last ``contexts`` contexts."""
    acts = sparse_rows(16 * 81, 24)
    write_capture(tmp_path / "acts", acts, context=17, shard_contexts=40)
    store = ActivationStore(tmp_path / "acts")
    assert store.manifest.shards[-1] == 16
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    pool = window_pool(sae, store, contexts=48, width=16)
    assert len(pool) == 48
    assert torch.equal(pool.token_ids, store.tokens()[33:81, 1:].long())


def test_bad_pool_sizes(capture) -> None:
    store, _ = capture
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    with pytest.raises(ValueError, match="shorter than width"):
        window_pool(sae, store, contexts=4, width=32)
    with pytest.raises(ValueError, match="positive"):
        window_pool(sae, store, contexts=0)


def test_maxact_calibrates_on_silent_windows_apart_from_its_scoring_negatives(
        capture, tiny_llama_dir) -> None:
    """The explain stage gives maxact every silent window of a latent except the ones its
    detection is scored on: together they are the silent windows, and none is both."""
    from transformers import AutoTokenizer

    from worker.explain_stage import Pool, _negatives, calibration

    store, _ = capture
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    pool = Pool(window_pool(sae, store, contexts=100, width=8),
                AutoTokenizer.from_pretrained(tiny_llama_dir))
    for feature in range(64):
        silent = [pool.texts[w] for w in pool.pool.silent_windows(feature)]
        scored = [w.tokens for w in _negatives(pool, feature, 20)]
        own = calibration(pool, feature, 20)
        assert len(scored) == min(20, len(silent)) and len(own) == len(silent) - len(scored)
        assert sorted(map(tuple, own + scored)) == sorted(map(tuple, silent))
    assert calibration(None, 0, 20) == []
