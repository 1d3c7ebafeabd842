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


def test_pool_codes_and_silent_windows(capture) -> None:
    store, acts = capture
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    pool = window_pool(sae, store, contexts=10, width=8)
    assert pool.token_ids.shape == (20, 8) and pool.values.shape == (20, 8, 4)
    # the last shard holds contexts 80..99; the pool is its last 10 contexts
    tail = acts[90 * 16:100 * 16]
    dense = sae.dense_latents(tail).reshape(20, 8, 64)
    tokens = store.tokens()[90:100, 1:].reshape(20, 8)
    assert torch.equal(pool.token_ids, tokens.long())
    for feature in range(64):
        fires = (dense[..., feature] > 0).any(1)
        assert pool.silent_windows(feature) == torch.nonzero(~fires).flatten().tolist()
    feature = int(dense.flatten(0, 1).sum(0).argmax())
    window = int((dense[..., feature] > 0).any(1).nonzero()[0])
    assert pool.activations(window, feature) == pytest.approx(
        dense[window, :, feature].tolist(), abs=1e-5)


def test_bad_pool_sizes(capture) -> None:
    store, _ = capture
    sae = SparseAutoencoder(SaeConfig(d_in=24, n_latents=64, k=4)).eval()
    with pytest.raises(ValueError, match="shorter than width"):
        window_pool(sae, store, contexts=4, width=32)
    with pytest.raises(ValueError, match="positive"):
        window_pool(sae, store, contexts=0)
