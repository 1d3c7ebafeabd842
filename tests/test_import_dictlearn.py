"""SAEs written by dictionary_learning — its own dictionary classes (TopK, BatchTopK,
Matryoshka BatchTopK, ReLU, the April-update ReLU, JumpReLU, gated) made by its trainers and
saved as its ``trainSAE`` saves them — loaded by saelab and encoded to the same codes and
reconstructions as the library's own ``encode``/``decode``; sites that are not the
residual stream and classes saelab cannot run are refused; ``saelab import-sae`` analyses
one into the store."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from tests import dictlearn_lib as dl
from tests.import_cli import import_and_list
from training.sae.folder import SaeLoadError, load_sae

ARCHITECTURE = {"AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
                "MatryoshkaBatchTopKSAE": "batchtopk", "AutoEncoder": "batchtopk",
                "AutoEncoderNew": "batchtopk", "JumpReluAutoEncoder": "jumprelu",
                "GatedAutoEncoder": "jumprelu"}
"""saelab's architecture for each class (ReLU ones: BatchTopK's rule with θ = 0)."""
runner = CliRunner()


@pytest.fixture(autouse=True)
def _library() -> None:
    dl.library()  # skips without dictionary-learning


def _sparse(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, int((dense > 0).sum(1).max()))
    values, indices = dense.topk(width, dim=1)
    return values, indices


@pytest.mark.parametrize("dict_class", list(ARCHITECTURE))
def test_dictionary_learning_folders_encode_like_the_library(dict_class, tmp_path) -> None:
    folder = dl.saved(dict_class, tmp_path / "trainer_0", model="tiny", layer=1)
    theirs = dl.load_like_library(folder)
    x = torch.randn(200, dl.D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.encode(x)
        reconstruction = theirs.decode(expected)
    ours, cfg = load_sae(folder)
    got = ours.dense_latents(x)
    assert (ours.cfg.architecture, ours.cfg.d_in, ours.cfg.n_latents) == (
        ARCHITECTURE[dict_class], dl.D, dl.N)
    assert (cfg["model_name"], cfg["hook_layer"], cfg["source_format"]) == (
        "tiny", 1, "dictionary_learning")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert 0 < int((got > 0).sum()) < got.numel(), "some latents must fire, some not"
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        assert ours.cfg.k == dl.K
    # x̂ sums ~100 float32 terms of size ~1: agreement to float32 rounding of that sum
    torch.testing.assert_close(ours.decode(*_sparse(got)), reconstruction, atol=1e-4,
                               rtol=1e-5)


@pytest.mark.parametrize(("submodule", "io", "layer", "expected"), [
    ("resid_post_layer_2", "out", 2, 2),
    (None, "out", 2, 2),                    # the library's get_submodule: block L itself
    ("model.layers.2", "in", 2, 1),         # block 2's input is block 1's output
    ("mlp_out_layer_2", "out", 2, "is an MLP output"),
    ("attn_out_layer_2", "out", 2, "is an attention output"),
    ("embed", "out", 0, "is the embeddings"),
    ("resid_post_layer_3", "out", 2, "disagrees with layer 2"),
    ("my_hook", "out", 2, "unrecognised submodule_name"),
    ("resid_post_layer_0", "in", 0, "the input of block 0"),
    ("resid_post_layer_2", "in_and_out", 2, "a transcoder"),
])
def test_only_residual_stream_sites_are_read(submodule, io, layer, expected,
                                             tmp_path) -> None:
    out = dl.trainer("AutoEncoderTopK", layer=layer, submodule=submodule)
    folder = dl.save_like_train_sae(out, tmp_path / "sae", {**dl.BUFFER, "io": io})
    if isinstance(expected, int):
        _, cfg = load_sae(folder)
        assert (cfg["hook_layer"], cfg["hook_name"]) == (
            expected, f"blocks.{expected}.hook_resid_post")
        return
    with pytest.raises(SaeLoadError, match=expected):
        load_sae(folder)


def test_what_saelab_cannot_run_is_refused_clearly(tmp_path) -> None:
    lib = dl.library()
    identity = tmp_path / "identity"
    identity.mkdir()
    torch.save(lib.dictionary.IdentityDict(dl.D).state_dict(), identity / "ae.pt")
    (identity / "config.json").write_text(json.dumps({"trainer": {
        "dict_class": "IdentityDict", "activation_dim": dl.D, "dict_size": dl.D, "layer": 1,
        "lm_name": "tiny"}}))
    with pytest.raises(SaeLoadError, match="dict_class 'IdentityDict' is not supported: "
                                           "saelab reads AutoEncoderTopK, BatchTopKSAE"):
        load_sae(identity)
    pickled = dl.saved("AutoEncoder", tmp_path / "pickled")  # a whole module, not weights
    torch.save(dl.load_like_library(pickled), pickled / "ae.pt")
    with pytest.raises(SaeLoadError, match="ae.pt is not a readable state dict"):
        load_sae(pickled)
    wrong = dl.saved("BatchTopKSAE", tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["trainer"]["dict_size"] = 2 * dl.N
    (wrong / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaeLoadError, match=f"dict_size is {2 * dl.N} but the weights"):
        load_sae(wrong)


def test_import_sae_analyses_a_dictionary_learning_sae(tmp_path, tiny_llama_dir,
                                                       tiny_model) -> None:
    """A BatchTopK SAE on the tiny model's block 1, as trainSAE saves it, imported and
    analysed into the store."""
    folder = dl.saved("BatchTopKSAE", tmp_path / "run" / "trainer_0",
                      model=str(tiny_llama_dir), layer=1)
    env, listed = import_and_list(folder, tmp_path)
    assert [(s["architecture"], s["n_latents"], s["layer"], s["k"]) for s in listed] == [
        ("batchtopk", dl.N, 1, dl.K)]
    mlp = dl.save_like_train_sae(dl.trainer("AutoEncoderTopK", submodule="mlp_out_layer_1"),
                                 tmp_path / "mlp")
    bad = runner.invoke(app, ["import-sae", str(mlp), "--now"], env=env)
    assert bad.exit_code == 2 and "is an MLP output" in bad.output
    wide = runner.invoke(app, ["import-sae", str(folder), "--model", "smollm2-135m"], env=env)
    assert wide.exit_code == 2 and "the SAE was not trained on this model" in wide.output
