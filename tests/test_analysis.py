"""Per-latent analysis checked against brute force on a small synthetic capture."""

from __future__ import annotations

import pytest
import torch

from tests.synthetic import sparse_rows, write_capture
from training.analysis import examples as analysis
from training.analysis.latents import AnalysisConfig, analyse_capture
from training.data.activations import ActivationStore
from training.sae.autoencoder import SaeConfig, SparseAutoencoder

D, N, CONTEXT = 16, 32, 17


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    directory = tmp_path_factory.mktemp("analysis") / "acts"
    write_capture(directory, sparse_rows(16 * 120, D, seed=4), context=CONTEXT,
                  shard_contexts=25)
    torch.manual_seed(1)
    sae = SparseAutoencoder(SaeConfig(d_in=D, n_latents=N, k=4)).eval()
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # some latents fire rarely, some never
    return ActivationStore(directory), sae


def _dense(store: ActivationStore, sae: SparseAutoencoder) -> torch.Tensor:
    rows = torch.cat(list(store.iter_sequential(10_000)))
    return sae.dense_latents(rows.float()).reshape(-1, CONTEXT - 1, N)


@pytest.mark.parametrize("prune_floor", [1 << 16, 4])
def test_statistics_match_brute_force(setup, prune_floor, monkeypatch) -> None:
    """Also with the window table pruned after nearly every chunk."""
    monkeypatch.setattr(analysis, "PRUNE_FLOOR", prune_floor)
    store, sae = setup
    cfg = AnalysisConfig(top_examples=5, quantile_buckets=4, per_bucket=2, window=3,
                         chunk_contexts=7, histogram_bins=8, reservoir=20)
    result = analyse_capture(sae, store, torch.randn(50, D), cfg, progress=False)
    z = _dense(store, sae)
    flat = z.reshape(-1, N)
    assert result.tokens == flat.shape[0]
    fired = (flat > 0).sum(0)
    torch.testing.assert_close(result.density, fired.double() / flat.shape[0])
    torch.testing.assert_close(result.max_activation, flat.max(0).values)
    mean = flat.sum(0) / fired.clamp_min(1)
    torch.testing.assert_close(result.mean_activation, mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.histogram_counts.sum(1), fired)
    _check_histograms(result, flat, bins=8)

    peaks = z.max(dim=1).values  # [contexts, n]
    tokens = store.tokens()
    for f in range(N):
        tops = [e for e in result.examples.of(f) if e.kind == "top"]
        expected = peaks[:, f][peaks[:, f] > 0].sort(descending=True).values[:5]
        got = torch.tensor([max(e.activations) for e in tops])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for e in result.examples.of(f):
            peak = z[e.context_index, e.position - 1, f]
            assert max(e.activations) == pytest.approx(float(peak), rel=1e-5)
            assert len(e.tokens) == len(e.activations) <= 7
            lo = max(0, e.position - 1 - 3)
            window = z[e.context_index, lo:lo + len(e.activations), f]
            torch.testing.assert_close(torch.tensor(e.activations), window)
            assert e.tokens == tokens[e.context_index, 1 + lo:1 + lo + len(e.tokens)].tolist()
            if e.kind == "quantile":
                share = float(peak) / float(result.max_activation[f])
                assert e.bucket == min(3, int(share * 4)) and e.rank < 2
        top_contexts = {e.context_index for e in tops}
        assert not top_contexts & {e.context_index for e in result.examples.of(f)
                                   if e.kind == "quantile"}, "a quantile sample repeats a top one"


def _check_histograms(result, flat: torch.Tensor, bins: int) -> None:
    """Each firing latent's bins are linear over [0, M), M the power of two with
    max <= M < 2·max, and hold exactly the brute-force counts."""
    for f in range(flat.shape[1]):
        values = flat[:, f][flat[:, f] > 0]
        scale = float(result.histogram_scale[f])
        if not len(values):
            assert scale == 0 and int(result.histogram_counts[f].sum()) == 0
            continue
        assert scale >= float(values.max()) and scale < 2 * float(values.max())
        assert float(torch.log2(torch.tensor(scale))).is_integer()
        expected = torch.bincount((values / scale * bins).long().clamp(max=bins - 1),
                                  minlength=bins)
        assert torch.equal(result.histogram_counts[f], expected), f


def test_logits_and_neighbours(setup) -> None:
    store, sae = setup
    unembed = torch.randn(50, D)
    result = analyse_capture(sae, store, unembed, AnalysisConfig(logit_tokens=3, neighbours=4),
                             max_tokens=160, progress=False)
    assert result.tokens == 160
    effects = sae.w_dec.detach() @ unembed.t()
    assert torch.equal(result.top_logit_ids[:, 0], effects.argmax(1))
    assert torch.equal(result.bottom_logit_ids[:, 0], effects.argmin(1))
    w = torch.nn.functional.normalize(sae.w_dec.detach(), dim=1)
    cos = (w @ w.t()).fill_diagonal_(-2)
    assert torch.equal(result.neighbour_ids[:, 0], cos.argmax(1))
    assert (result.neighbour_ids != torch.arange(N)[:, None]).all()


def test_fitted_histograms_merge_exactly_as_the_max_grows() -> None:
    """Values arriving in rising chunks (each doubling the scale several times) end in the
    same bins as one histogram made with the final scale."""
    from training.analysis.histogram import FittedHistograms, histogram_of

    g = torch.Generator().manual_seed(0)
    hist = FittedHistograms(3, 16)
    seen: list[list[torch.Tensor]] = [[], [], []]
    for step in range(6):
        latents = torch.randint(0, 3, (200,), generator=g)
        values = torch.rand(200, generator=g) * 3.0 ** step + 1e-3
        hist.add(latents, values)
        for f in range(3):
            seen[f].append(values[latents == f])
    for f in range(3):
        values = torch.cat(seen[f])
        scale = float(hist.scale[f])
        assert values.max() <= scale < 2 * values.max()
        expected = torch.bincount((values / scale * 16).long().clamp(max=15), minlength=16)
        assert torch.equal(hist.counts[f], expected)
        shown = histogram_of(scale, hist.counts[f].tolist())
        assert len(shown["edges"]) == len(shown["counts"]) + 1 >= 9  # at least half the bins
        assert shown["edges"][0] == 0 and sum(shown["counts"]) == len(values)
    assert histogram_of(0.0, [0] * 16) == {"edges": [], "counts": []}
