"""SAELens on-disk format: the cfg fields we write and the folders we read.

Runs without ``sae_lens`` installed. The cfg.json dicts below are copied verbatim (modulo
sizes) from folders written by sae-lens 6.54.12 (``TrainingSAE.save_inference_model`` /
``SAE.save_model``) and sae-lens 5.11.0 (``SAE.save_model``); the reference forward pass
re-implements SAELens' encode/decode (``saes/topk_sae.py``, ``saes/jumprelu_sae.py``,
``saes/standard_sae.py``) so the folding done by the reader is checked numerically.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.sae.saelens import (
    SAELAB_WEIGHTS_FILE,
    SAELENS_WEIGHTS_FILE,
    saelab_architecture,
    saelens_cfg_fields,
    saelens_state_dict,
)
from training.sae.saelens_read import read_saelens_folder

D_IN, D_SAE, K = 8, 16, 4

# Fields SAELens needs in cfg.json to load a TopK SAE with SAE.load_from_disk, from
# sae-lens 6.54.12: sae_lens/saes/sae.py (SAEConfig: d_in, d_sae, dtype, device,
# apply_b_dec_to_input, normalize_activations, reshape_activations, metadata; the
# "architecture" key selects the class via SAEConfig.from_dict), sae_lens/saes/topk_sae.py
# (TopKSAEConfig: k, rescale_acts_by_decoder_norm) and
# sae_lens/loading/pretrained_sae_loaders.py (read_sae_components_from_disk reads
# cfg["dtype"]; handle_config_defaulting takes the v6 path only if
# metadata.sae_lens_version >= 6). Only d_in/d_sae/architecture/dtype are strictly
# mandatory; the others have SAELens defaults (k=100!) that we must not rely on.
SAELENS_TOPK_REQUIRED = ("architecture", "d_in", "d_sae", "dtype", "device",
                         "apply_b_dec_to_input", "normalize_activations",
                         "reshape_activations", "metadata", "k",
                         "rescale_acts_by_decoder_norm")
# JumpReLUSAEConfig (sae_lens/saes/jumprelu_sae.py) has no fields beyond SAEConfig.
SAELENS_JUMPRELU_REQUIRED = ("architecture", "d_in", "d_sae", "dtype", "device",
                             "apply_b_dec_to_input", "normalize_activations",
                             "reshape_activations", "metadata")
# SAEMetadata keys HookedSAETransformer / the loader use (sae_lens/saes/sae.py).
SAELENS_METADATA_REQUIRED = ("sae_lens_version", "model_name", "hook_name",
                             "hook_head_index", "context_size", "prepend_bos")

# --- cfg.json layouts, verbatim from SAELens -------------------------------------------
V6_TOPK_INFERENCE = {  # TopKTrainingSAE.save_inference_model (6.54.12)
    "d_in": D_IN, "dtype": "float32", "k": K, "rescale_acts_by_decoder_norm": True,
    "apply_b_dec_to_input": True, "normalize_activations": "none", "d_sae": D_SAE,
    "reshape_activations": "none", "device": "cpu",
    "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                 "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                 "context_size": 128, "prepend_bos": True, "hook_head_index": None,
                 "training_architecture": "topk",
                 "training_architecture_details": {"decoder_init_norm": 0.1,
                                                   "use_sparse_activations": False,
                                                   "aux_loss_coefficient": 1.0}},
    "architecture": "topk",
}
V6_TOPK_CHECKPOINT = {  # TopKTrainingSAE.save_model (trainer checkpoints, 6.54.12)
    "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
    "apply_b_dec_to_input": True, "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": copy.deepcopy(V6_TOPK_INFERENCE["metadata"]),
    "decoder_init_norm": 0.1, "k": K, "use_sparse_activations": False,
    "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": True,
    "architecture": "topk",
}
V6_BATCHTOPK_INFERENCE = {  # BatchTopKTrainingSAE.save_inference_model (6.54.12)
    "d_in": D_IN, "dtype": "float32", "apply_b_dec_to_input": True,
    "normalize_activations": "none", "d_sae": D_SAE, "reshape_activations": "none",
    "device": "cpu",
    "metadata": {"sae_lens_version": "6.54.12", "sae_lens_training_version": "6.54.12",
                 "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
                 "training_architecture": "batchtopk",
                 "training_architecture_details": {"decoder_init_norm": 0.1, "k": K,
                                                   "use_sparse_activations": False,
                                                   "aux_loss_coefficient": 1.0,
                                                   "rescale_acts_by_decoder_norm": True,
                                                   "topk_threshold_lr": 0.01}},
    "architecture": "jumprelu",
}
V6_BATCHTOPK_CHECKPOINT = {  # BatchTopKTrainingSAE.save_model (6.54.12)
    "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
    "apply_b_dec_to_input": True, "normalize_activations": "none",
    "reshape_activations": "none",
    "metadata": copy.deepcopy(V6_BATCHTOPK_INFERENCE["metadata"]),
    "decoder_init_norm": 0.1, "k": K, "use_sparse_activations": False,
    "aux_loss_coefficient": 1.0, "rescale_acts_by_decoder_norm": True,
    "topk_threshold_lr": 0.01, "architecture": "batchtopk",
}
V5_TOPK = {  # sae-lens 5.11.0 SAE.save_model (SAEConfig.to_dict)
    "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32",
    "device": "cpu", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post",
    "hook_layer": 3, "hook_head_index": None, "activation_fn_str": "topk",
    "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
    "finetuning_scaling_factor": False, "sae_lens_training_version": "5.11.0",
    "prepend_bos": True, "dataset_path": "x", "dataset_trust_remote_code": True,
    "context_size": 128, "normalize_activations": "none", "neuronpedia_id": None,
    "model_from_pretrained_kwargs": {}, "seqpos_slice": [None],
}
V5_STANDARD_TOPK = {**V5_TOPK, "architecture": "standard"}  # older v5 TopK SAEs
V5_JUMPRELU = {**V5_TOPK, "architecture": "jumprelu", "activation_fn_str": "relu",
               "activation_fn_kwargs": {}}
V5_STANDARD = {**V5_JUMPRELU, "architecture": "standard"}


# --- helpers ---------------------------------------------------------------------------
def _tensors(seed: int, *, unit_rows: bool = False, threshold: str | None = None
             ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g) * 0.5,
         "b_enc": torch.randn(D_SAE, generator=g) * 0.2,
         "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.4,
         "b_dec": torch.randn(D_IN, generator=g)}
    if unit_rows:
        t["W_dec"] = t["W_dec"] / t["W_dec"].norm(dim=1, keepdim=True)
    if threshold == "uniform":
        t["threshold"] = torch.full((D_SAE,), 0.3)
    elif threshold == "per_latent":
        t["threshold"] = torch.rand(D_SAE, generator=g) * 0.5
    return t


def _write(folder: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
           weights_file: str = SAELENS_WEIGHTS_FILE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(folder / weights_file))
    return folder


def _x(seed: int = 99) -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def _saelab_forward(cfg: dict[str, Any], t: dict[str, torch.Tensor], x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """saelab's maths: z = sel(ReLU((x - b_dec) W_enc + b_enc)), x̂ = z W_dec + b_dec."""
    p = torch.relu((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"])
    if cfg["architecture"] == "topk":
        top = p.topk(cfg["k"], dim=-1)
        z = torch.zeros_like(p).scatter_(-1, top.indices, top.values)
    elif cfg["architecture"] == "batchtopk":
        z = p * (p > cfg["threshold"])
    else:
        z = p * (p > t["threshold"])
    return z, z @ t["W_dec"] + t["b_dec"]


def _saelens_forward(arch: str, t: dict[str, torch.Tensor], x: torch.Tensor, *,
                     k: int | None = None, rescale: bool = False, apply_b_dec: bool = True,
                     scale: float | None = None, ft_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' encode/decode as written in its source (v6 TopKSAE / JumpReLUSAE /
    StandardSAE, v5 finetuning scaling), with the trainer's input scaling ``scale``."""
    xin = x * scale if scale is not None else x
    sae_in = xin - t["b_dec"] if apply_b_dec else xin
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=-1)
    if rescale:
        pre = pre * norms
    if arch == "topk":
        top = pre.topk(k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    elif arch == "jumprelu":
        z = pre.relu() * (pre > t["threshold"])
    else:
        z = pre.relu()
    acts = z / norms if rescale else z
    if ft_scale is not None:
        acts = acts * ft_scale
    out = acts @ t["W_dec"] + t["b_dec"]
    return z, (out / scale if scale is not None else out)


def _assert_same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                 *, check_z: bool = True) -> None:
    if check_z:
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def _saelab_cfg(architecture: str, threshold: float | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE,
                           "k": K, "threshold": threshold, "model_name": "org/llama",
                           "hook_layer": 3, "hook_name": "blocks.3.hook_resid_post",
                           "input_scale": 0.25, "dtype": "float32", "tokens": 1000}
    cfg.update(saelens_cfg_fields(architecture, D_IN, D_SAE, K, threshold, "org/llama", 3,
                                  "blocks.3.hook_resid_post", context_size=256))
    return cfg


# --- (a) the cfg fields we write -------------------------------------------------------
def test_topk_cfg_has_every_field_saelens_needs() -> None:
    cfg = _saelab_cfg("topk")
    missing = [key for key in SAELENS_TOPK_REQUIRED if key not in cfg]
    assert not missing, f"cfg.json lacks SAELens fields {missing}"
    assert [key for key in SAELENS_METADATA_REQUIRED if key not in cfg["metadata"]] == []
    assert cfg["architecture"] == "topk" and cfg["k"] == K
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "org/llama"
    assert cfg["metadata"]["hook_head_index"] is None
    # saelab's own fields survive the merge.
    assert (cfg["hook_layer"], cfg["input_scale"], cfg["tokens"]) == (3, 0.25, 1000)
    assert saelab_architecture(cfg) == "topk"


def test_batchtopk_cfg_maps_to_jumprelu() -> None:
    cfg = _saelab_cfg("batchtopk", threshold=0.3)
    assert [key for key in SAELENS_JUMPRELU_REQUIRED if key not in cfg] == []
    assert cfg["architecture"] == "jumprelu"
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["metadata"]["training_architecture_details"]["k"] == K
    assert cfg["threshold"] == 0.3 and cfg["k"] == K  # saelab's keys, ignored by SAELens
    assert saelab_architecture(cfg) == "batchtopk"


def test_state_dict_is_exactly_what_saelens_loads() -> None:
    t = _tensors(0)
    assert sorted(saelens_state_dict("topk", {**t, "extra": torch.ones(1)})) == sorted(
        ["W_enc", "b_enc", "W_dec", "b_dec"])
    sd = saelens_state_dict("batchtopk", t, threshold=0.3)
    assert sorted(sd) == sorted(["W_enc", "b_enc", "W_dec", "b_dec", "threshold"])
    assert sd["threshold"].shape == (D_SAE,) and torch.all(sd["threshold"] == 0.3)
    assert all(v.dtype == torch.float32 for v in sd.values())


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("weights_file", [SAELENS_WEIGHTS_FILE, SAELAB_WEIGHTS_FILE])
def test_saelab_folder_round_trips(tmp_path: Path, architecture: str,
                                   weights_file: str) -> None:
    threshold = 0.3 if architecture == "batchtopk" else None
    t = _tensors(1)
    cfg = _saelab_cfg(architecture, threshold)
    folder = _write(tmp_path / "sae", cfg, saelens_state_dict(architecture, t, threshold),
                    weights_file)
    got_cfg, got = read_saelens_folder(folder)
    assert got_cfg["architecture"] == architecture
    assert (got_cfg["d_in"], got_cfg["d_sae"], got_cfg["k"]) == (D_IN, D_SAE, K)
    assert got_cfg["threshold"] == pytest.approx(threshold, rel=1e-6) if threshold else (
        got_cfg["threshold"] is None)
    assert (got_cfg["hook_layer"], got_cfg["hook_name"], got_cfg["model_name"]) == (
        3, "blocks.3.hook_resid_post", "org/llama")
    assert got_cfg["context_size"] == 256 and got_cfg["prepend_bos"] is True
    assert sorted(got) == sorted(t)
    for name, value in t.items():
        assert torch.equal(got[name], value), name


def test_saelens_cfg_fields_rejects_bad_arguments() -> None:
    args = dict(d_in=D_IN, d_sae=D_SAE, model_name="m", hook_layer=3,
                hook_name="blocks.3.hook_resid_post", context_size=128)
    with pytest.raises(ValueError, match="integer k"):
        saelens_cfg_fields("topk", k=None, threshold=None, **args)
    with pytest.raises(ValueError, match="threshold"):
        saelens_cfg_fields("batchtopk", k=K, threshold=None, **args)
    with pytest.raises(ValueError, match="unknown saelab architecture"):
        saelens_cfg_fields("gated", k=K, threshold=None, **args)
    with pytest.raises(ValueError, match="does not match hook_layer"):
        saelens_cfg_fields("topk", k=K, threshold=None,
                           **{**args, "hook_name": "blocks.4.hook_resid_post"})


# --- (b) reading SAELens folders -------------------------------------------------------
def test_v6_topk_inference(tmp_path: Path) -> None:
    t = _tensors(2, unit_rows=True)  # save_inference_model folds the decoder norms
    cfg, got = read_saelens_folder(_write(tmp_path / "s", V6_TOPK_INFERENCE, t))
    assert (cfg["architecture"], cfg["k"], cfg["threshold"]) == ("topk", K, None)
    assert (cfg["hook_layer"], cfg["hook_name"], cfg["model_name"]) == (
        3, "blocks.3.hook_resid_post", "gpt2")
    assert cfg["saelens_layout"] == "v6" and sorted(got) == sorted(t)
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("topk", t, x, k=K, rescale=True))


def test_v6_topk_checkpoint_folds_decoder_norms(tmp_path: Path) -> None:
    t = _tensors(3)  # unnormalised decoder rows + rescale_acts_by_decoder_norm
    cfg, got = read_saelens_folder(_write(tmp_path / "s", V6_TOPK_CHECKPOINT, t))
    assert cfg["architecture"] == "topk"
    torch.testing.assert_close(got["W_dec"].norm(dim=1), torch.ones(D_SAE))
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("topk", t, x, k=K, rescale=True))


def test_v6_batchtopk_inference_is_batchtopk(tmp_path: Path) -> None:
    t = _tensors(4, unit_rows=True, threshold="uniform")
    cfg, got = read_saelens_folder(_write(tmp_path / "s", V6_BATCHTOPK_INFERENCE, t))
    assert cfg["architecture"] == "batchtopk" and cfg["k"] == K
    assert cfg["threshold"] == pytest.approx(0.3)
    assert "threshold" not in got
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("jumprelu", t, x))


def test_v6_batchtopk_checkpoint(tmp_path: Path) -> None:
    t = _tensors(5)
    stored = {**t, "topk_threshold": torch.tensor(0.2, dtype=torch.float64)}
    cfg, got = read_saelens_folder(_write(tmp_path / "s", V6_BATCHTOPK_CHECKPOINT, stored))
    assert cfg["architecture"] == "batchtopk" and cfg["threshold"] == pytest.approx(0.2)
    x = _x()
    # What SAELens saves for inference: JumpReLU(θ) on pre·‖W_dec‖, decoded through
    # W_dec/‖W_dec‖ (BatchTopKTrainingSAE.process_state_dict_for_saving_inference).
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * t["W_dec"].norm(dim=-1)
    z_ref = pre.relu() * (pre > 0.2)
    out_ref = (z_ref / t["W_dec"].norm(dim=-1)) @ t["W_dec"] + t["b_dec"]
    _assert_same(_saelab_forward(cfg, got, x), (z_ref, out_ref))


def test_v6_jumprelu_per_latent_threshold(tmp_path: Path) -> None:
    layout = {**V6_BATCHTOPK_INFERENCE,
              "metadata": {**V6_BATCHTOPK_INFERENCE["metadata"],
                           "training_architecture": "jumprelu",
                           "training_architecture_details": {}}}
    t = _tensors(6, threshold="per_latent")
    cfg, got = read_saelens_folder(_write(tmp_path / "s", layout, t))
    assert (cfg["architecture"], cfg["k"], cfg["threshold"]) == ("jumprelu", None, None)
    assert torch.equal(got["threshold"], t["threshold"])
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("jumprelu", t, x))


def test_apply_b_dec_to_input_false_is_folded(tmp_path: Path) -> None:
    t = _tensors(7, unit_rows=True)
    layout = {**V6_TOPK_INFERENCE, "apply_b_dec_to_input": False}
    cfg, got = read_saelens_folder(_write(tmp_path / "s", layout, t))
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x),
                 _saelens_forward("topk", t, x, k=K, rescale=True, apply_b_dec=False))


@pytest.mark.parametrize("scaler_file", ["activation_scaler.json",
                                         "activations_store_state.safetensors"])
def test_expected_average_scaling_factor_is_folded(tmp_path: Path, scaler_file: str) -> None:
    t = _tensors(8)
    layout = {**V6_TOPK_CHECKPOINT, "normalize_activations": "expected_average_only_in"}
    folder = _write(tmp_path / "s", layout, t)
    if scaler_file.endswith(".json"):  # v6 trainer checkpoints (ActivationScaler.save)
        (folder / scaler_file).write_text(json.dumps({"scaling_factor": 0.125,
                                                      "has_whitening": False}))
    else:  # v5 checkpoints (ActivationsStore.save)
        save_file({"estimated_norm_scaling_factor": torch.tensor(0.125)},
                  str(folder / scaler_file))
    cfg, got = read_saelens_folder(folder)
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x),
                 _saelens_forward("topk", t, x, k=K, rescale=True, scale=0.125))


@pytest.mark.parametrize(("layout", "arch"), [(V5_TOPK, "topk"),
                                              (V5_STANDARD_TOPK, "topk")])
def test_v5_topk_layouts(tmp_path: Path, layout: dict[str, Any], arch: str) -> None:
    t = _tensors(9)
    cfg, got = read_saelens_folder(_write(tmp_path / "s", layout, t))
    assert (cfg["architecture"], cfg["k"], cfg["hook_layer"]) == (arch, K, 3)
    assert cfg["saelens_layout"] == "v5" and cfg["model_name"] == "gpt2"
    assert cfg["context_size"] == 128
    for name, value in t.items():
        assert torch.equal(got[name], value)
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("topk", t, x, k=K))


def test_v5_jumprelu_and_standard(tmp_path: Path) -> None:
    t = _tensors(10, threshold="per_latent")
    cfg, got = read_saelens_folder(_write(tmp_path / "j", V5_JUMPRELU, t))
    assert cfg["architecture"] == "jumprelu"
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("jumprelu", t, x))

    t = _tensors(11)
    cfg, got = read_saelens_folder(_write(tmp_path / "s", V5_STANDARD, t))
    assert cfg["architecture"] == "jumprelu" and torch.all(got["threshold"] == 0)
    _assert_same(_saelab_forward(cfg, got, x), _saelens_forward("standard", t, x))


def test_v5_finetuning_scaling_factor_is_folded(tmp_path: Path) -> None:
    t = _tensors(12)
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) + 0.5
    layout = {**V5_TOPK, "finetuning_scaling_factor": True}
    cfg, got = read_saelens_folder(
        _write(tmp_path / "s", layout, {**t, "finetuning_scaling_factor": scale}))
    x = _x()
    _assert_same(_saelab_forward(cfg, got, x),
                 _saelens_forward("topk", t, x, k=K, ft_scale=scale))


def test_v5_hook_resid_pre_maps_to_previous_resid_post(tmp_path: Path) -> None:
    layout = {**V5_TOPK, "hook_name": "blocks.4.hook_resid_pre", "hook_layer": 4}
    cfg, _ = read_saelens_folder(_write(tmp_path / "s", layout, _tensors(13)))
    assert (cfg["hook_layer"], cfg["hook_name"]) == (3, "blocks.3.hook_resid_post")
    assert cfg["saelens_hook_name"] == "blocks.4.hook_resid_pre"


def test_bfloat16_weights_become_float32(tmp_path: Path) -> None:
    t = {k: v.to(torch.bfloat16) for k, v in _tensors(14, unit_rows=True).items()}
    layout = {**V6_TOPK_INFERENCE, "dtype": "bfloat16", "rescale_acts_by_decoder_norm": False}
    cfg, got = read_saelens_folder(_write(tmp_path / "s", layout, t))
    assert cfg["dtype"] == "float32"
    assert all(v.dtype == torch.float32 for v in got.values())
    assert torch.equal(got["W_enc"], t["W_enc"].float())


# --- (c) what we refuse ----------------------------------------------------------------
@pytest.mark.parametrize(("layout", "tensors", "message"), [
    ({**V6_TOPK_INFERENCE, "architecture": "matching_pursuit"}, "plain",
     "unsupported SAELens architecture"),
    ({**V6_TOPK_INFERENCE, "architecture": "gated"}, "plain", "gated SAE weights lack"),
    ({**V6_TOPK_INFERENCE, "normalize_activations": "layer_norm"}, "plain", "cannot be folded"),
    ({**V6_TOPK_INFERENCE, "normalize_activations": "constant_norm_rescale"}, "plain",
     "cannot be folded"),
    ({**V6_TOPK_INFERENCE, "normalize_activations": "expected_average_only_in"}, "plain",
     "no scaling factor"),
    ({**V5_TOPK, "normalize_activations": True}, "plain", "no scaling factor"),
    ({**V6_TOPK_INFERENCE, "normalize_activations": "covariance_whitening"}, "plain",
     "activation_whitening"),
    ({**V6_TOPK_INFERENCE, "reshape_activations": "hook_z"}, "plain", "hook_z"),
    ({**V5_TOPK, "hook_name": "blocks.3.attn.hook_z"}, "plain", "hook_z"),
    ({**V5_TOPK, "hook_head_index": 2}, "plain", "hook_head_index"),
    ({**V5_TOPK, "hook_name": "blocks.3.hook_mlp_out"}, "plain", "unsupported hook point"),
    ({**V5_TOPK, "activation_fn_str": "tanh-relu"}, "plain", "unsupported activation"),
    ({**V5_TOPK, "activation_fn_kwargs": {}}, "plain", "activation_fn_kwargs.k"),
    ({**V5_TOPK, "d_sae": D_SAE * 2}, "plain", "W_enc has shape"),
    (V5_JUMPRELU, "plain", "lack a 'threshold'"),
    (V6_TOPK_INFERENCE, "extra", "unexpected tensors"),
    (V6_TOPK_INFERENCE, "sparsify", "sparsify checkpoint"),
    (V6_TOPK_INFERENCE, "missing", "lack b_dec"),
])
def test_unsupported_folders_raise(tmp_path: Path, layout: dict[str, Any], tensors: str,
                                   message: str) -> None:
    t = _tensors(20)
    stored = {
        "plain": t,
        "extra": {**t, "b_mag": t["b_enc"]},
        "sparsify": {"encoder.weight": t["W_enc"].T, "encoder.bias": t["b_enc"],
                     "W_dec": t["W_dec"], "b_dec": t["b_dec"]},
        "missing": {k: v for k, v in t.items() if k != "b_dec"},
    }[tensors]
    with pytest.raises(ValueError, match=message):
        read_saelens_folder(_write(tmp_path / "s", layout, stored))


def test_missing_files_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        read_saelens_folder(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(V6_TOPK_INFERENCE))
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        read_saelens_folder(tmp_path)


def test_reader_does_not_modify_files(tmp_path: Path) -> None:
    t = _tensors(21)
    folder = _write(tmp_path / "s", V6_TOPK_CHECKPOINT, t)
    before = (folder / "cfg.json").read_text()
    read_saelens_folder(folder)
    assert (folder / "cfg.json").read_text() == before
    stored = load_file(str(folder / SAELENS_WEIGHTS_FILE))
    assert all(torch.equal(stored[k], t[k]) for k in t)
