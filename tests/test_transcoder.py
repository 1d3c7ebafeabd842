"""Transcoders and skip-transcoders: block L's MLP input and output captured in one forward,
trained to predict the output from the input, saved so SAELens loads them, evaluated with
the MLP replaced, analysed, probed and steered like SAEs (on the tiny random Llama)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.settings import Settings
from training.data.activations import ActivationStore
from training.data.capture import CaptureConfig, capture
from training.data.hooks import edit_site, recording_sae_input
from training.sae.autoencoder import SaeConfig
from training.sae.folder import load_sae
from training.train.run import TrainError, train
from training.train.trainer import TrainConfig

LAYER = 2
N, K = 128, 8


@pytest.fixture(scope="module")
def mlp_capture(tiny_model, tmp_path_factory) -> Path:
    """24,000 MLP input/output pairs of block 2 over the embedded corpus, 4 shards."""
    out = tmp_path_factory.mktemp("mlp") / "acts"
    capture(tiny_model, CaptureConfig(layer=LAYER, tokens=24_000, context=64, dtype="fp32",
                                      shard_rows=6300, site="mlp"), out, progress=False)
    return out


def _train(acts: Path, out: Path, **sae) -> dict:
    cfg = SaeConfig(d_in=64, n_latents=N, k=K, architecture="batchtopk", site="mlp", **sae)
    return train(acts, out, cfg, TrainConfig(batch=512, warmup_steps=5, init_rows=2048,
                                             holdout_rows=2048, checkpoint_every=0,
                                             lr=1e-2, tokens=512 * 120), progress=False)


@pytest.fixture(scope="module")
def transcoders(mlp_capture, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("transcoders")
    return {name: (root / name, _train(mlp_capture, root / name, skip=skip))
            for name, skip in (("plain", False), ("skip", True))}


def test_capture_pairs_each_mlp_input_with_its_output(tiny_model, mlp_capture) -> None:
    store = ActivationStore(mlp_capture)
    store.verify()
    assert store.paired and store.manifest.site == "mlp" and store.row_width == 128
    rows = store.training_shard(0)[:500]
    x, y = rows[:, :64], rows[:, 64:]
    assert torch.equal(store.shard(0)[:500], x)  # what an encoder reads: the input
    with torch.no_grad():  # the outputs are block 2's MLP applied to the inputs
        torch.testing.assert_close(tiny_model.blocks[LAYER].mlp(x), y, rtol=1e-4, atol=1e-5)
    ids = store.tokens()[:1].to(tiny_model.device)
    with recording_sae_input(tiny_model.blocks, LAYER, "mlp") as seen, torch.no_grad():
        tiny_model.model(input_ids=ids, use_cache=False)
    torch.testing.assert_close(seen[0][0, 1:], store.shard(0)[:63], rtol=1e-4, atol=1e-5)


def test_transcoders_learn_the_mlp_and_the_skip_path_helps(transcoders) -> None:
    plain, skip = transcoders["plain"][1], transcoders["skip"][1]
    assert plain["heldout_rows"] == 2048
    # measured: held-out FVU of the MLP output 0.288 (plain) and 0.227 (skip)
    assert plain["heldout_fvu"] < 0.4
    assert skip["heldout_fvu"] < 0.9 * plain["heldout_fvu"]
    assert 0.5 * K < plain["heldout_l0"] < 2 * K
    cfg = json.loads((transcoders["skip"][0] / "cfg.json").read_text())
    assert cfg["site"] == "mlp" and cfg["skip"] is True and cfg["target_scale"] > 0
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["metadata"]["hook_name"] == f"blocks.{LAYER}.mlp.hook_in"  # after the gain
    assert cfg["metadata"]["hook_name_out"] == f"blocks.{LAYER}.hook_mlp_out"
    assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"fold_ln": False}


@pytest.mark.parametrize("name, cls", [("plain", "JumpReLUTranscoder"),
                                       ("skip", "JumpReLUSkipTranscoder")])
def test_saelens_loads_the_transcoders_exactly(transcoders, mlp_capture, name, cls) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    folder = transcoders[name][0]
    ours, _ = load_sae(folder)
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == cls
    rows = ActivationStore(mlp_capture).tail(512)
    x, y = rows[:, :64], rows[:, 64:]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.dense_latents(x), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(theirs(x), ours.forward_output(x), rtol=1e-4, atol=1e-5)
        fvu = (y - ours.forward_output(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    assert float(fvu) == pytest.approx(transcoders[name][1]["heldout_fvu"], rel=0.3)


def test_the_saelens_file_alone_reads_back_as_the_transcoder(transcoders, mlp_capture,
                                                             tmp_path) -> None:
    """Only ``sae_weights.safetensors`` (what SAELens reads and writes) read back through
    the SAELens transcoder reader gives the same transcoder."""
    import shutil

    folder = tmp_path / "saelens-only"
    shutil.copytree(transcoders["skip"][0], folder)
    (folder / "sae.safetensors").unlink()
    ours, _ = load_sae(transcoders["skip"][0])
    theirs, cfg = load_sae(folder)
    assert cfg["saelens_architecture"] == "jumprelu_skip_transcoder" and theirs.cfg.skip
    x = ActivationStore(mlp_capture).tail(256)[:, :64]
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_output(x), ours.forward_output(x),
                                   rtol=1e-5, atol=1e-6)


def test_eval_replaces_the_mlp_output(tiny_model, transcoders) -> None:
    from training.evaluation.metrics import dataset_batches, evaluate

    sae, _ = load_sae(transcoders["skip"][0])
    batches = list(dataset_batches(tiny_model, "embedded", tokens=2048, context=64, batch=8,
                                   skip_contexts=400))
    metrics = evaluate(tiny_model, sae, LAYER, batches, progress=False)

    def zero_after_bos(out, _source):
        out = out.clone()
        out[:, 1:] = 0
        return out

    ablated, count = 0.0, 0  # the ablation is the MLP's output zeroed, computed by hand
    for ids in batches:
        with edit_site(tiny_model.blocks, LAYER, "mlp", zero_after_bos), torch.no_grad():
            logits = tiny_model.model(input_ids=ids, use_cache=False).logits
        ablated += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
            reduction="sum"))
        count += ids[:, 1:].numel()
    assert metrics.ce_ablate == pytest.approx(ablated / count, rel=1e-5)
    # measured: FVU 0.305, and 0.909 of the loss the MLP's removal costs is recovered
    assert metrics.tokens == count and metrics.fvu < 0.45
    assert metrics.ce_loss_recovered > 0.6


def test_steering_a_transcoder_edits_what_the_mlp_writes(transcoders) -> None:
    from training.inference.steering import Steer, steering_edit

    sae, _ = load_sae(transcoders["plain"][0])
    torch.manual_seed(0)
    source, out = torch.randn(1, 6, 64), torch.randn(1, 6, 64)
    edit = steering_edit(sae, [Steer(3, "clamp", 2.0)], {3: 1.5})
    assert edit.site == "mlp"
    edited = edit(out, None, source)
    z = sae.dense_latents(source[0])[:, 3]  # the code of the MLP's input, not its output
    expected = out[0] + (3.0 - z)[:, None] * sae.w_dec[3]
    torch.testing.assert_close(edited[0], expected, rtol=1e-5, atol=1e-5)


def test_probe_and_generation_use_the_mlp_site(tiny_model, transcoders) -> None:
    from training.data.hooks import sae_inputs
    from training.inference.probe import probe_text
    from training.inference.steering import (
        STEERED_ROWS,
        Sampling,
        Steer,
        generate_pair,
        steering_edit,
        text_prompt_ids,
    )

    sae, _ = load_sae(transcoders["plain"][0])
    probe = probe_text(tiny_model, sae, LAYER, "def f(x): return x")
    ids = torch.tensor([[tiny_model.bos_id, *probe.ids]])
    inputs = sae_inputs(tiny_model.model, tiny_model.blocks, LAYER, ids, "mlp")[0, 1:]
    dense = sae.dense_latents(inputs)
    got = torch.zeros_like(dense).scatter_(1, probe.indices, probe.values)
    torch.testing.assert_close(got, dense)
    edit = steering_edit(sae, [Steer(0, "add", 50.0)], {0: 1.0}, rows=STEERED_ROWS)
    texts = ["", ""]
    for row, piece in generate_pair(tiny_model, LAYER, edit, text_prompt_ids(
            tiny_model, "def f(x):"), Sampling(temperature=0, max_tokens=12, seed=0)):
        texts[row] += piece
    assert texts[0] and texts[0] != texts[1]


def test_analysis_reads_the_mlp_input(transcoders, mlp_capture, tiny_model, tmp_path) -> None:
    from training.analysis.latents import analyse_capture, checked_capture

    sae, _ = load_sae(transcoders["plain"][0])
    store = checked_capture(sae, tiny_model.name, 64, mlp_capture, sae_label="sae",
                            acts_label="acts")
    result = analyse_capture(sae, store, tiny_model.model.get_output_embeddings().weight,
                             max_tokens=4000, progress=False)
    x = store.shard(0)[:result.tokens]
    fired = (sae.dense_latents(x) > 0).any(0)
    assert torch.equal(result.density > 0, fired)
    resid = tmp_path / "resid"
    capture(tiny_model, CaptureConfig(layer=LAYER, tokens=600, context=64), resid,
            progress=False)
    with pytest.raises(ValueError, match="residual-stream activations"):
        checked_capture(sae, tiny_model.name, 64, resid, sae_label="sae", acts_label="acts")


def test_wrong_pairings_are_refused_with_the_flag(mlp_capture, tiny_model, tmp_path) -> None:
    with pytest.raises(ValueError, match="--arch topk"):
        SaeConfig(d_in=64, n_latents=N, k=K, site="mlp")
    with pytest.raises(ValueError, match="--skip"):
        SaeConfig(d_in=64, n_latents=N, k=K, skip=True)
    with pytest.raises(TrainError, match="--site mlp"):
        train(mlp_capture, tmp_path / "sae", SaeConfig(d_in=64, n_latents=N, k=K),
              TrainConfig(batch=512), progress=False)
    assert not (tmp_path / "sae").exists()


def test_a_block_that_normalises_its_mlp_output_is_refused(tiny_model, tmp_path,
                                                           monkeypatch) -> None:
    """Gemma 2/3 normalise the MLP's output inside the block: there the MLP's own output
    is not TransformerLens' hook_mlp_out, so saelab hooks no transcoder there."""
    block = tiny_model.blocks[LAYER]
    monkeypatch.setattr(block, "post_feedforward_layernorm", torch.nn.Identity(),
                        raising=False)
    with pytest.raises(ValueError, match="post_feedforward_layernorm"):
        capture(tiny_model, CaptureConfig(layer=LAYER, tokens=600, context=64, site="mlp"),
                tmp_path / "acts", progress=False)
    assert not (tmp_path / "acts").exists()


def test_the_explorer_shows_probes_and_steers_a_transcoder(transcoders, mlp_capture,
                                                           tiny_model, tmp_path) -> None:
    from fastapi.testclient import TestClient

    from app.settings import Settings
    from app.store.db import open_store
    from app.store.persist import save_analysis, token_texts
    from app.web.engine import InferenceEngine
    from app.web.main import create_app
    from training.analysis.latents import analyse_capture

    folder = transcoders["skip"][0]
    sae, cfg = load_sae(folder)
    result = analyse_capture(sae, ActivationStore(mlp_capture),
                             tiny_model.model.get_output_embeddings().weight,
                             max_tokens=4000, progress=False)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    sae_id = save_analysis(open_store(url), sae_dir=folder, sae_cfg=cfg,
                           model_name=tiny_model.name, d_model=64, n_layers=4, result=result,
                           token_text=token_texts(tiny_model.tokenizer, result))
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    engine = InferenceEngine(Settings(data_dir=tmp_path / "engine"))
    with TestClient(create_app(settings, engine)) as client:
        page = client.get(f"/saes/{sae_id}")
        assert page.status_code == 200
        assert "skip-transcoder: it reads the input of block 2" in page.text
        live = int(torch.nonzero(result.density > 0)[0])
        assert client.get(f"/saes/{sae_id}/features/{live}").status_code == 200
        probe = client.post("/api/v1/probe", json={"sae_id": sae_id, "text": "def f(x):"})
        assert probe.status_code == 200 and probe.json()["top_features"]
        steer = client.post("/api/v1/steer", json={
            "sae_id": sae_id, "prompt": "def f(x):", "max_tokens": 6,
            "features": [{"index": live, "mode": "clamp", "value": 8}]})
        assert steer.status_code == 200 and "event: done" in steer.text


def test_a_transcoder_job_defaults_to_batchtopk_and_names_a_wrong_arch(
        mlp_capture, tmp_path) -> None:
    from app.job_params import JobParams, submission_problems
    from worker.stages import train_spec

    settings = Settings(data_dir=tmp_path)

    def stored(**params) -> JobParams:  # as the worker reads a job's row back
        return JobParams(**JobParams(**params).model_dump(exclude_none=True))

    assert stored(site="mlp").arch_for("mlp") == "batchtopk"
    assert stored().arch_for("resid") == "topk"
    spec = train_spec(stored(acts=str(mlp_capture)), str(mlp_capture), tmp_path / "o", False)
    assert spec["sae"]["architecture"] == "batchtopk" and spec["sae"]["site"] == "mlp"
    SaeConfig.from_dict(spec["sae"])  # a train job on a transcoder capture can start

    def problems(kind, **params):
        return submission_problems(kind, JobParams(**params), settings, web=False)

    assert "batchtopk" in problems("pipeline", site="mlp", arch="topk")["arch"]
    assert "batchtopk" in problems("train", acts=str(mlp_capture), arch="topk")["arch"]
    assert "skip" in problems("pipeline", skip=True)
    assert not problems("pipeline", site="mlp", skip=True)
    assert "site" in problems("sweep", layer=1, site="mlp")
    assert "site" in problems("sweep", acts=str(mlp_capture))


def test_a_skip_transcoder_resumes_exactly(mlp_capture, tmp_path) -> None:
    from safetensors.torch import load_file

    sae = SaeConfig(d_in=64, n_latents=N, k=K, architecture="batchtopk", site="mlp",
                    skip=True)
    cfg = TrainConfig(batch=512, warmup_steps=5, init_rows=2048, holdout_rows=2048,
                      checkpoint_every=10, lr=1e-2, tokens=512 * 30)
    train(mlp_capture, tmp_path / "whole", sae, cfg, progress=False)

    class Interrupt(Exception):
        pass

    def stop_at_15(stats) -> None:
        if stats.step == 15:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(mlp_capture, tmp_path / "cut", sae, cfg, progress=False, on_step=stop_at_15)
    train(mlp_capture, tmp_path / "cut", sae, cfg, progress=False, resume=True)
    whole = load_file(str(tmp_path / "whole" / "sae.safetensors"))
    cut = load_file(str(tmp_path / "cut" / "sae.safetensors"))
    assert "W_skip" in whole
    for name in whole:
        torch.testing.assert_close(cut[name], whole[name], rtol=0, atol=0)
    with pytest.raises(Interrupt):
        train(mlp_capture, tmp_path / "other", sae, cfg, progress=False, on_step=stop_at_15)
    with pytest.raises(TrainError, match="--skip True"):
        train(mlp_capture, tmp_path / "other", replace(sae, skip=False), cfg,
              progress=False, resume=True)


def test_saelens_hooked_transformer_splices_the_transcoder_where_saelab_does(tmp_path) -> None:
    """SAELens' own HookedSAETransformer (TransformerLens), given a saelab transcoder's
    folder, replaces the MLP output with the same prediction saelab computes, on a Llama
    whose norm gains are not 1 (which is where blocks.L.mlp.hook_in and TransformerLens'
    ln2.hook_normalized differ). A plain transcoder: HookedSAETransformer (6.54.12)
    splices with encode and decode, which leave out a skip-transcoder's W_skip."""
    sae_lens = pytest.importorskip("sae_lens")
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.sae.autoencoder import SparseAutoencoder
    from training.sae.folder import save_sae

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    hf = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in hf.model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    tl_cfg = HookedTransformerConfig(
        d_model=64, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128, n_layers=4,
        n_ctx=256, d_vocab=512, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=16, gated_mlp=True, final_rms=True,
        eps=config.rms_norm_eps, original_architecture="LlamaForCausalLM")
    tl = sae_lens.HookedSAETransformer(tl_cfg)
    tl.load_and_process_state_dict(convert_llama_weights(hf, tl_cfg), fold_ln=False,
                                   center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    transcoder = SparseAutoencoder(SaeConfig(d_in=64, n_latents=N, k=K, site="mlp",
                                             architecture="batchtopk"))
    with torch.no_grad():
        for param in transcoder.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
        transcoder.threshold.fill_(0.1)
    transcoder.eval()  # its inference rule (the threshold), which is what is saved
    save_sae(tmp_path / "tc", transcoder, 1.0, model="tiny", layer=LAYER, context=64)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "tc"))
    ids = torch.randint(4, 512, (2, 24))
    ids[:, 0] = 1

    def predicted(_out, source):
        flat = source.reshape(-1, 64)
        return transcoder.forward_output(flat).reshape(source.shape)

    with torch.no_grad():
        clean = hf(ids).logits
        with edit_site(hf.model.layers, LAYER, "mlp", predicted):
            ours = hf(ids).logits
        tl.add_sae(theirs)
        spliced = tl(ids)
        tl.reset_saes()
        theirs.cfg.metadata.hook_name = f"blocks.{LAYER}.ln2.hook_normalized"
        tl.add_sae(theirs)
        before_gain = tl(ids)
    torch.testing.assert_close(spliced, ours, rtol=1e-4, atol=1e-4)
    assert (ours - clean).abs().max() > 1e-2  # the splice changed the logits
    assert (before_gain - ours).abs().max() > 1e-2  # the norm's output before its gain
