"""SAEs written by the real libraries — SAELens (ReLU, TopK, BatchTopK, JumpReLU with
per-latent thresholds, gated) and EleutherAI's sparsify (TopK) — saved with their own save
functions, loaded by saelab, and encoded to the same codes as the library's own
``encode``; then ``saelab import-sae`` analyses one into the store."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from training.sae.folder import SaeLoadError, load_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is part of the dev extra")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is part of the dev extra")

D, N = 64, 96
runner = CliRunner()


def _metadata(cfg, model: str = "tiny", layer: int = 1):
    cfg.metadata.model_name = model
    cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
    return cfg


def _randomised(sae) -> None:
    """Weights that make every code path count: random, with thresholds that cut."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if name.startswith("b") else 1.0))
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(N) * 2)


def _saelens(kind: str):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        GatedSAE,
        GatedSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    made = {"standard": lambda: StandardSAE(_metadata(StandardSAEConfig(d_in=D, d_sae=N))),
            "topk": lambda: TopKSAE(_metadata(TopKSAEConfig(d_in=D, d_sae=N, k=8))),
            "jumprelu": lambda: JumpReLUSAE(_metadata(JumpReLUSAEConfig(d_in=D, d_sae=N))),
            "gated": lambda: GatedSAE(_metadata(GatedSAEConfig(d_in=D, d_sae=N))),
            "batchtopk": lambda: BatchTopKTrainingSAE(_metadata(
                BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=8)))}[kind]()
    _randomised(made)
    return made


@pytest.mark.parametrize("kind", ["standard", "topk", "jumprelu", "gated", "batchtopk"])
def test_saelens_folders_encode_like_saelens(kind, tmp_path) -> None:
    sae = _saelens(kind)
    x = torch.randn(200, D) * 3
    if kind == "batchtopk":  # SAELens saves its inference form (JumpReLU, shared θ)
        with torch.no_grad():
            sae.topk_threshold.fill_(0.7)
        sae.save_inference_model(tmp_path)
        reloaded = sae_lens.SAE.load_from_disk(str(tmp_path))
        expected = reloaded.encode(x)
    else:
        sae.save_model(tmp_path)
        expected = sae.encode(x)
    ours, cfg = load_sae(tmp_path)
    got = ours.dense_latents(x)
    assert cfg["hook_layer"] == 1 and cfg["model_name"] == "tiny"
    assert ours.cfg.architecture == {"standard": "batchtopk", "topk": "topk",
                                     "jumprelu": "jumprelu", "gated": "jumprelu",
                                     "batchtopk": "batchtopk"}[kind]
    torch.testing.assert_close(got, expected.detach().float(), atol=1e-4, rtol=1e-4)
    assert (got > 0).sum() > 0, "the test inputs must fire some latents"
    decoded = ours.decode(*_sparse(got))
    torch.testing.assert_close(decoded, sae.decode(expected).detach(), atol=1e-3, rtol=1e-4)


def _sparse(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, int((dense > 0).sum(1).max()))
    values, indices = dense.topk(width, dim=1)
    return values, indices


def test_sparsify_folders_encode_like_sparsify(tmp_path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=6))
    torch.manual_seed(5)
    with torch.no_grad():
        for param in coder.parameters():
            param.copy_(torch.randn_like(param))
    folder = tmp_path / "run" / "layers.1"
    coder.save_to_disk(folder)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "tiny"}))
    x = torch.randn(150, D)
    out = coder.encode(x)
    expected = torch.zeros(150, N).scatter_(1, out.top_indices, out.top_acts)
    ours, cfg = load_sae(folder)
    assert (cfg["hook_layer"], cfg["model_name"], ours.cfg.k) == (1, "tiny", 6)
    torch.testing.assert_close(ours.dense_latents(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.decode(out.top_acts, out.top_indices),
                               coder.decode(out.top_acts, out.top_indices), atol=1e-4,
                               rtol=1e-4)
    transcoder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=6, transcode=True))
    transcoder.save_to_disk(tmp_path / "transcoder")
    with pytest.raises(SaeLoadError, match="transcoder"):
        load_sae(tmp_path / "transcoder")


def test_import_sae_analyses_a_foreign_sae_into_the_store(tmp_path, tiny_llama_dir,
                                                           tiny_model) -> None:
    """A SAELens JumpReLU SAE on the tiny model's block 1, imported and analysed."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(_metadata(JumpReLUSAEConfig(d_in=D, d_sae=N), str(tiny_llama_dir)))
    _randomised(sae)
    with torch.no_grad():  # a threshold per latent (equal ones would read as BatchTopK)
        sae.threshold.copy_(torch.rand(N) * 0.2)
    folder = tmp_path / "jumprelu"
    sae.save_model(folder)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    env = {"SAELAB_DATA_DIR": str(tmp_path / "data"),
           "SAELAB_DATABASE_URL": f"sqlite:///{tmp_path / 'store.db'}"}
    result = runner.invoke(app, ["import-sae", str(folder), "--dataset", str(corpus),
                                 "--tokens", "2048", "--now", "--json"], env=env)
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout.strip().splitlines()[-1])
    assert job["state"] == "succeeded", job["message"]
    listed = json.loads(runner.invoke(app, ["saes", "--json"], env=env).stdout)
    assert [(s["architecture"], s["n_latents"], s["layer"]) for s in listed] == [
        ("jumprelu", N, 1)]
    assert listed[0]["analysed_tokens"] >= 2048
    bad = runner.invoke(app, ["import-sae", str(tmp_path), "--now"], env=env)
    assert bad.exit_code == 2 and "not an SAE folder" in bad.output
