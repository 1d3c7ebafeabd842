"""SAEs written by the real libraries — SAELens (ReLU, TopK, BatchTopK, JumpReLU with
per-latent thresholds, gated, and its four transcoders) and EleutherAI's sparsify (TopK) —
saved with their own save functions, loaded by saelab, and encoded to the same codes as the
library's own ``encode``; then ``saelab import-sae`` analyses an SAE and a transcoder into
the store."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from app.cli import app
from tests.import_cli import import_and_list
from training.data.activations import ActivationStore
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
    env, listed = import_and_list(folder, tmp_path)
    assert [(s["architecture"], s["n_latents"], s["layer"]) for s in listed] == [
        ("jumprelu", N, 1)]
    assert listed[0]["analysed_tokens"] >= 2048
    bad = runner.invoke(app, ["import-sae", str(tmp_path), "--now"], env=env)
    assert bad.exit_code == 2 and "not an SAE folder" in bad.output


TRANSCODERS = ["transcoder", "skip_transcoder", "jumprelu_transcoder",
               "jumprelu_skip_transcoder"]


def _saelens_transcoder(arch: str, model: str = "tiny", layer: int = 1, **hooks: str):
    """An SAELens transcoder of ``arch`` from block ``layer``'s MLP input to its output."""
    from sae_lens.saes import transcoder as tc

    cls, config = {"transcoder": (tc.Transcoder, tc.TranscoderConfig),
                   "skip_transcoder": (tc.SkipTranscoder, tc.SkipTranscoderConfig),
                   "jumprelu_transcoder": (tc.JumpReLUTranscoder, tc.JumpReLUTranscoderConfig),
                   "jumprelu_skip_transcoder": (tc.JumpReLUSkipTranscoder,
                                                tc.JumpReLUSkipTranscoderConfig)}[arch]
    cfg = config(d_in=D, d_sae=N, d_out=D, apply_b_dec_to_input=False)
    cfg.metadata.model_name = model
    cfg.metadata.hook_name = hooks.get("hook_name", f"blocks.{layer}.mlp.hook_in")
    cfg.metadata.hook_name_out = hooks.get("hook_name_out", f"blocks.{layer}.hook_mlp_out")
    made = cls(cfg)
    _randomised(made)
    return made


@pytest.mark.parametrize("arch", TRANSCODERS)
def test_saelens_transcoders_run_like_saelens(arch, tmp_path) -> None:
    transcoder = _saelens_transcoder(arch)
    transcoder.save_model(tmp_path)
    x = torch.randn(200, D) * 3
    ours, cfg = load_sae(tmp_path)
    assert (cfg["hook_layer"], cfg["model_name"], cfg["site"]) == (1, "tiny", "mlp")
    assert ours.cfg.transcoder and ours.cfg.skip == ("skip" in arch)
    # a ReLU transcoder is a JumpReLU one at θ = 0, which saelab runs as BatchTopK at θ = 0
    assert ours.cfg.architecture == ("jumprelu" if arch.startswith("jumprelu") else "batchtopk")
    with torch.no_grad():
        got, expected = ours.dense_latents(x), transcoder.encode(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert 0 < int((got > 0).sum()) < got.numel(), "the inputs must fire some latents"
        torch.testing.assert_close(ours.forward_output(x), transcoder(x), atol=1e-3,
                                   rtol=1e-4)


@pytest.mark.parametrize("hooks, problem", [
    ({"hook_name": "blocks.1.hook_resid_mid"}, "MLP input after its norm"),
    ({"hook_name": "blocks.1.hook_mlp_in"}, "MLP input after its norm"),
    ({"hook_name": "blocks.1.ln2.hook_normalized"}, "before its gain"),
    ({"hook_name_out": "blocks.2.hook_mlp_out"}, "blocks.1.hook_mlp_out"),
    ({"hook_name_out": "blocks.1.hook_resid_post"}, "blocks.1.hook_mlp_out")])
def test_transcoders_of_other_sites_are_refused(hooks, problem, tmp_path) -> None:
    _saelens_transcoder("skip_transcoder", **hooks).save_model(tmp_path)
    with pytest.raises(SaeLoadError, match=problem):
        load_sae(tmp_path)


def test_circuit_tracers_output_hook_and_a_log_threshold_are_read(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    transcoder = _saelens_transcoder("jumprelu_transcoder", hook_name="blocks.1.mlp.hook_in",
                                     hook_name_out="blocks.1.mlp.hook_out")
    transcoder.save_model(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    state = load_file(str(weights))
    state["log_threshold"] = state.pop("threshold").log()
    save_file(state, str(weights))
    ours, cfg = load_sae(tmp_path)
    assert cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    x = torch.randn(100, D) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours.dense_latents(x), transcoder.encode(x), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("edit, problem", [
    (lambda cfg, state: cfg.pop("apply_b_dec_to_input"), "apply_b_dec_to_input"),
    (lambda cfg, state: cfg.update(normalize_activations="layer_norm"), "layer_norm"),
    (lambda cfg, state: cfg.update(activation_fn="tanh"), "tanh"),
    (lambda cfg, state: state.update(W_skip=torch.zeros(D, D + 1)), "W_skip has shape"),
    (lambda cfg, state: state.update(threshold=torch.zeros(N + 1)), "threshold has shape"),
    (lambda cfg, state: state.pop("threshold"), "lack a 'threshold'"),
    (lambda cfg, state: state.update(extra=torch.zeros(3)), "unexpected tensors"),
    (lambda cfg, state: state.pop("W_dec"), "lack W_dec"),
    (lambda cfg, state: cfg["metadata"].update(model_from_pretrained_kwargs={"fold_ln": True}),
     "fold_ln")])
def test_malformed_transcoder_folders_say_what_is_wrong(edit, problem, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    _saelens_transcoder("jumprelu_skip_transcoder").save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    state = load_file(str(tmp_path / "sae_weights.safetensors"))
    edit(cfg, state)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(SaeLoadError, match=problem):
        load_sae(tmp_path)


def test_transcoders_between_widths_are_refused(tmp_path) -> None:
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    cfg = TranscoderConfig(d_in=D, d_sae=N, d_out=2 * D, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = ("blocks.1.mlp.hook_in",
                                                          "blocks.1.hook_mlp_out")
    Transcoder(cfg).save_model(tmp_path)
    with pytest.raises(SaeLoadError, match="from width 64 to 128"):
        load_sae(tmp_path)


def test_import_sae_analyses_a_saelens_transcoder(tmp_path, tiny_llama_dir, tiny_model) -> None:
    """A JumpReLU skip-transcoder of the tiny model's block 1 (circuit-tracer's hook name),
    imported: the analysis captures that MLP's input, and the SAE page says what it is."""
    from fastapi.testclient import TestClient

    from app.sae_import import read_folder
    from app.settings import Settings
    from app.web.main import create_app

    transcoder = _saelens_transcoder("jumprelu_skip_transcoder", str(tiny_llama_dir),
                                     hook_name="blocks.1.mlp.hook_in")
    with torch.no_grad():  # a per-latent threshold low enough that the MLP input fires it
        transcoder.threshold.copy_(torch.rand(N) * 0.2)
    folder = tmp_path / "transcoder"
    transcoder.save_model(folder)
    env, listed = import_and_list(folder, tmp_path)
    assert read_folder(folder).describe().startswith(
        "a saelens jumprelu skip-transcoder: d_in 64, 96 latents")
    assert [(s["architecture"], s["site"], s["skip"], s["layer"]) for s in listed] == [
        ("jumprelu", "mlp", True, 1)]
    features = json.loads(runner.invoke(
        app, ["features", str(listed[0]["id"]), "--limit", str(N), "--json"], env=env).stdout)
    [manifest] = (tmp_path / "data").rglob("manifest.json")  # the job's own capture
    capture = ActivationStore(manifest.parent)
    assert capture.manifest.site == "mlp" and capture.manifest.layer == 1
    ours, _ = load_sae(folder)
    with torch.no_grad():
        rows = capture.shard(0)[:listed[0]["analysed_tokens"]].float()
        peaks = ours.dense_latents(rows).amax(0)
    stored = torch.tensor([f["max_activation"] for f in features])
    assert int((stored > 0).sum()) > N // 4, "the MLP input fires many latents"
    torch.testing.assert_close(stored, peaks, atol=1e-3, rtol=1e-3)
    client = TestClient(create_app(Settings(data_dir=tmp_path / "data",
                                            database_url=env["SAELAB_DATABASE_URL"])))
    page = client.get(f"/saes/{listed[0]['id']}")
    assert page.status_code == 200
    assert "skip-transcoder: it reads the input of block 1" in page.text
