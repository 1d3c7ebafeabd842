"""Contrastive search: the latents most specific to one set of texts against another, on
the tiny random Llama with a random SAE."""

from __future__ import annotations

import pytest
import torch

from training.data.hooks import block_output
from training.inference.probe import (
    MAX_CONTRAST_TEXTS,
    MIN_CONTRAST_SCORE,
    contrast_texts,
    probe_text,
)
from training.sae.autoencoder import SaeConfig, SparseAutoencoder

D = 64
LAYER = 2
N_LATENTS = 96
CODE = ["def f(x):\n    return x", "class A:\n    pass", "for i in range(3): print(i)"]
PROSE = ["The cat sat on the mat.", "Rain fell all day long", "She smiled."]


@pytest.fixture(scope="module")
def sae() -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d_in=D, n_latents=N_LATENTS, k=6)).eval()


def _maxima(lm, sae, text: str) -> torch.Tensor:
    """[n] each latent's max over the text's tokens, from the dense code (no probe)."""
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    acts = block_output(lm.model, lm.blocks, LAYER, torch.tensor([[lm.bos_id, *ids]]))
    with torch.no_grad():
        return sae.dense_latents(acts[0, 1:]).max(0).values.clamp(min=0)


def test_contrast_matches_the_formula_computed_by_brute_force(tiny_model, sae) -> None:
    a = torch.stack([_maxima(tiny_model, sae, t) for t in CODE]).double()
    b = torch.stack([_maxima(tiny_model, sae, t) for t in PROSE]).double()
    peak = torch.maximum(a.max(0).values, b.max(0).values)
    expected = {f: float((a[:, f].mean() - b[:, f].mean()) / peak[f])
                for f in range(N_LATENTS) if peak[f] > 0}
    positive = sorted((f for f, s in expected.items() if s >= MIN_CONTRAST_SCORE),
                      key=lambda f: (-round(expected[f], 9), -float(a[:, f].mean()), f))
    assert positive, "the random SAE should separate code from prose somewhat"
    got = contrast_texts(tiny_model, sae, LAYER, CODE, PROSE, limit=N_LATENTS)
    assert [f for f, *_ in got] == positive
    for feature, score, mean_a, mean_b in got:
        assert score == pytest.approx(expected[feature], abs=1e-5)
        assert mean_a == pytest.approx(float(a[:, feature].mean()), abs=1e-5)
        assert mean_b == pytest.approx(float(b[:, feature].mean()), abs=1e-5)
        assert 0 < score <= 1
    assert contrast_texts(tiny_model, sae, LAYER, CODE, PROSE, limit=3) == got[:3]


def test_latents_firing_only_on_the_shared_text_score_one_half(tiny_model, sae) -> None:
    """A = [t1], B = [t1, t2]: a latent firing on t1 only has a = m, b = m/2, M = m, so
    its score is exactly 0.5, and nothing scores higher."""
    t1, t2 = CODE[0], PROSE[0]
    only_t1 = dict((f, m) for f, m, _ in probe_text(tiny_model, sae, LAYER, t1)
                   .top_features(N_LATENTS))
    for f, *_ in probe_text(tiny_model, sae, LAYER, t2).top_features(N_LATENTS):
        only_t1.pop(f, None)
    assert only_t1, "some latent should fire on one text and not the other"
    got = contrast_texts(tiny_model, sae, LAYER, [t1], [t1, t2], limit=N_LATENTS)
    head = got[:len(only_t1)]
    assert [f for f, *_ in head] == sorted(only_t1, key=lambda f: (-only_t1[f], f))
    assert all(score == pytest.approx(0.5) for _, score, _, _ in head)
    assert all(score < 0.5 for _, score, _, _ in got[len(only_t1):])


def test_a_set_against_itself_has_no_specific_latent(tiny_model, sae) -> None:
    assert contrast_texts(tiny_model, sae, LAYER, CODE, list(reversed(CODE))) == []


def test_swapping_the_sets_gives_disjoint_answers(tiny_model, sae) -> None:
    forward = {f for f, *_ in contrast_texts(tiny_model, sae, LAYER, CODE, PROSE, N_LATENTS)}
    backward = {f for f, *_ in contrast_texts(tiny_model, sae, LAYER, PROSE, CODE, N_LATENTS)}
    assert forward and backward and not forward & backward


def test_bad_sets_are_refused(tiny_model, sae) -> None:
    with pytest.raises(ValueError, match="texts_a is empty"):
        contrast_texts(tiny_model, sae, LAYER, [], PROSE)
    with pytest.raises(ValueError, match="texts_b is empty"):
        contrast_texts(tiny_model, sae, LAYER, CODE, [])
    with pytest.raises(ValueError, match=f"at most {MAX_CONTRAST_TEXTS}"):
        contrast_texts(tiny_model, sae, LAYER, ["a"] * (MAX_CONTRAST_TEXTS + 1), PROSE)
    with pytest.raises(ValueError, match=r"texts_b\[1\]: the text is empty"):
        contrast_texts(tiny_model, sae, LAYER, CODE, ["fine", ""])
    with pytest.raises(ValueError, match="limit"):
        contrast_texts(tiny_model, sae, LAYER, CODE, PROSE, limit=0)
