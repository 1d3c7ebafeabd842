"""Probing which SAE latents fire on a text."""

from __future__ import annotations

import pytest
import torch

from training.data.hooks import block_output
from training.inference.probe import ProbeResult, probe_text, token_texts
from training.sae.autoencoder import SaeConfig, SparseAutoencoder

D = 64
LAYER = 2
TEXT = "def f(x):\n    return x  # twice"


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d_in=D, n_latents=96, k=6)).eval()


@pytest.fixture(scope="module")
def probe(tiny_model, sae) -> ProbeResult:
    return probe_text(tiny_model, sae, LAYER, TEXT)


@pytest.fixture(scope="module")
def dense(tiny_model, sae) -> torch.Tensor:
    """z of every non-BOS token of TEXT, [T, n], computed without the probe."""
    ids = tiny_model.tokenizer.encode(TEXT, add_special_tokens=False)
    acts = block_output(tiny_model.model, tiny_model.blocks, LAYER,
                        torch.tensor([[tiny_model.bos_id, *ids]]))
    return sae.dense_latents(acts[0, 1:])


def test_probe_codes_every_token_after_bos(tiny_model, probe, dense) -> None:
    ids = tiny_model.tokenizer.encode(TEXT, add_special_tokens=False)
    assert probe.ids == ids
    assert probe.values.shape == probe.indices.shape == (len(ids), 6)
    assert probe.values.device.type == "cpu"
    rebuilt = torch.zeros_like(dense).scatter_(1, probe.indices, probe.values)
    torch.testing.assert_close(rebuilt, dense)


def test_tokens_concatenate_to_the_text(probe) -> None:
    assert "".join(probe.tokens) == TEXT
    assert probe.tokens[9:14] == ["\n", " ", " ", " ", " "]


def test_activations_of_a_feature(probe, dense) -> None:
    feature = int(dense.sum(0).argmax())
    assert probe.activations_of(feature) == pytest.approx(dense[:, feature].tolist())
    assert probe.activations_of(10_000) == [0.0] * len(probe.ids)


def test_top_features_by_max_activation(probe, dense) -> None:
    top = probe.top_features(limit=5)
    peaks = dense.max(0).values
    expected = peaks.argsort(descending=True)[:5].tolist()
    assert [feature for feature, _, _ in top] == expected
    for feature, peak, count in top:
        assert peak == pytest.approx(float(peaks[feature]))
        assert count == int((dense[:, feature] > 0).sum())
    assert len(probe.top_features(limit=1000)) == int((peaks > 0).sum())


def test_token_features_are_the_nonzero_code_descending(probe, dense) -> None:
    row = dense[3]
    pairs = probe.token_features(3, limit=4)
    assert [f for f, _ in pairs] == row.argsort(descending=True)[:4].tolist()
    assert [v for _, v in pairs] == pytest.approx(row.sort(descending=True).values[:4].tolist())
    assert all(v > 0 for _, v in probe.token_features(3, limit=100))
    with pytest.raises(ValueError, match="position 99 is out of range"):
        probe.token_features(99)


@pytest.mark.parametrize(("text", "kwargs", "message"), [
    ("", {}, "text is empty"),
    ("abcdef", {"max_tokens": 5}, "6 tokens; the probe takes at most 5"),
    ("a" * 300, {}, "300 tokens; the probe takes at most 255"),
])
def test_bad_texts_are_rejected(tiny_model, sae, text, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        probe_text(tiny_model, sae, LAYER, text, **kwargs)


def test_bad_layer_or_sae_width_is_rejected(tiny_model, sae) -> None:
    with pytest.raises(ValueError, match="layer 4 is out of range"):
        probe_text(tiny_model, sae, 4, TEXT)
    narrow = SparseAutoencoder(SaeConfig(d_in=32, n_latents=64, k=4)).eval()
    with pytest.raises(ValueError, match="width 32"):
        probe_text(tiny_model, narrow, LAYER, TEXT)


class ByteTokenizer:
    """Ids are UTF-8 bytes, as in byte-level BPE vocabularies at their finest."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_split_characters_go_to_the_token_completing_them() -> None:
    text = "a é😀\n"
    texts = token_texts(ByteTokenizer(), list(text.encode()))
    assert texts == ["a", " ", "", "é", "", "", "", "😀", "\n"]
    assert token_texts(ByteTokenizer(), [0xFF, 0x41]) == ["", "\ufffdA"]


def test_ranking_is_relative_to_each_latents_own_max_with_sinks_last() -> None:


    # three tokens; latent 5 is dense and strong, 9 rare and at its usual strength, 2 a sink
    result = ProbeResult(tokens=["a", "b", "c"], ids=[1, 2, 3],
                         values=torch.tensor([[4.0, 0.5, 30.0], [3.0, 0.0, 0.0],
                                              [0.0, 0.4, 0.0]]),
                         indices=torch.tensor([[5, 9, 2], [5, 9, 2], [5, 9, 2]]))
    maxima = {5: 20.0, 9: 0.6, 2: 31.0}
    relative = result.ranked_features(maxima, sinks={2})
    assert [r.index for r in relative] == [9, 5, 2]
    assert relative[0].relative == pytest.approx(0.5 / 0.6) and relative[2].sink
    assert [r.index for r in result.ranked_features(maxima, {2}, by="raw")] == [5, 9, 2]
    unsorted_sinks = result.ranked_features(maxima, {2}, sinks_last=False)
    assert [r.index for r in unsorted_sinks] == [2, 9, 5]
    assert [r.count for r in relative] == [2, 2, 1]
