"""dictionary_learning's own classes, and SAE folders saved exactly as its ``trainSAE``
saves them (``config.json`` = {"trainer": trainer.config, "buffer": buffer.config}, then
``ae.pt`` = the state dict), for the import tests. The library comes with the dev setup
(``scripts/setup.sh --dev``); without it these tests skip."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

D, N, K = 64, 256, 8
BUFFER = {"d_submodule": D, "io": "out", "n_ctxs": 30_000, "ctx_len": 128,
          "refresh_batch_size": 512, "out_batch_size": 8192, "device": "cpu"}
"""The keys of ``ActivationBuffer.config`` (the buffer itself needs nnsight and a model)."""


def library() -> ModuleType:
    """The ``dictionary_learning`` package with its ``dictionary`` and ``trainers`` modules.
    Its ``__init__`` is left unrun: it imports the nnsight activation buffer, which building
    and saving dictionaries does not need (nnsight is not installed)."""
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None:
            pytest.skip("dictionary-learning is part of the dev setup (scripts/setup.sh --dev)")
        sys.modules["dictionary_learning"] = importlib.util.module_from_spec(spec)
    import dictionary_learning.dictionary
    import dictionary_learning.trainers
    import dictionary_learning.trainers.matryoshka_batch_top_k  # noqa: F401

    return sys.modules["dictionary_learning"]


def trainer(dict_class: str, *, model: str = "tiny", layer: int = 1,
            submodule: str | None = "resid_post_layer_{layer}"):
    """The library trainer that makes ``dict_class``, on CPU, its dictionary randomised."""
    lib = library()
    made = lib.trainers
    common = {"steps": 10_000, "activation_dim": D, "dict_size": N, "layer": layer,
              "lm_name": model, "submodule_name": submodule and submodule.format(layer=layer),
              "device": "cpu", "seed": 0}
    make = {
        "AutoEncoderTopK": lambda: made.TopKTrainer(k=K, **common),
        "BatchTopKSAE": lambda: made.BatchTopKTrainer(k=K, **common),
        "MatryoshkaBatchTopKSAE": lambda: made.matryoshka_batch_top_k
        .MatryoshkaBatchTopKTrainer(k=K, group_fractions=[0.25, 0.75], **common),
        "AutoEncoder": lambda: made.StandardTrainer(**common),
        "JumpReluAutoEncoder": lambda: made.JumpReluTrainer(**common),
        "GatedAutoEncoder": lambda: made.GatedSAETrainer(**common),
    }[dict_class]
    out = make()
    randomise(out.ae)
    return out


def randomise(ae, seed: int = 3) -> None:
    """Weights that make every code path count: random (pre-activations of unit size,
    decoder norms ≠ 1), with thresholds that cut."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in ae.named_parameters():
            small = "bias" in name or name.startswith(("b_", "r_"))
            param.copy_(torch.randn_like(param) * (0.3 if small else 0.2))
        if hasattr(ae, "threshold"):  # a learned scalar (BatchTopK) or one per latent
            ae.threshold.copy_(0.5 + torch.rand(ae.threshold.shape) * 1.5)


def save_like_train_sae(out, folder: Path, buffer: dict | None = None) -> Path:
    """What ``trainSAE(save_dir=...)`` writes for one trainer (its ``trainer_i`` folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"trainer": out.config, "buffer": BUFFER if buffer is None else buffer}
    (folder / "config.json").write_text(json.dumps(config, indent=4))
    torch.save({k: v.cpu() for k, v in out.ae.state_dict().items()}, folder / "ae.pt")
    return folder


def saved(dict_class: str, folder: Path, **kwargs) -> Path:
    """A ``dict_class`` dictionary from its trainer, saved in ``folder``."""
    if dict_class == "AutoEncoderNew":  # no trainer of the library names it in its config
        return _saved_new(folder, **kwargs)
    return save_like_train_sae(trainer(dict_class, **kwargs), folder)


def _saved_new(folder: Path, *, model: str = "tiny", layer: int = 1,
               submodule: str | None = "resid_post_layer_{layer}") -> Path:
    ae = library().dictionary.AutoEncoderNew(D, N)
    randomise(ae)
    folder.mkdir(parents=True, exist_ok=True)
    trainer_cfg = {"dict_class": "AutoEncoderNew", "trainer_class": "StandardTrainer",
                   "activation_dim": D, "dict_size": N, "layer": layer, "lm_name": model,
                   "submodule_name": submodule and submodule.format(layer=layer),
                   "device": "cpu"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer_cfg,
                                                    "buffer": BUFFER}))
    torch.save(ae.state_dict(), folder / "ae.pt")
    return folder


def load_like_library(folder: Path):
    """The dictionary as ``dictionary_learning.utils.load_dictionary`` loads it (that module
    imports nnsight and datasets, so its dispatch is repeated here)."""
    lib = library()
    config = json.loads((folder / "config.json").read_text())["trainer"]
    path = str(folder / "ae.pt")
    with_k = {"AutoEncoderTopK": lib.trainers.top_k.AutoEncoderTopK,
              "BatchTopKSAE": lib.trainers.batch_top_k.BatchTopKSAE,
              "MatryoshkaBatchTopKSAE": lib.trainers.matryoshka_batch_top_k
              .MatryoshkaBatchTopKSAE}
    if config["dict_class"] in with_k:
        return with_k[config["dict_class"]].from_pretrained(path, k=config["k"], device="cpu")
    plain = {"AutoEncoder": lib.dictionary.AutoEncoder,
             "AutoEncoderNew": lib.dictionary.AutoEncoderNew,
             "JumpReluAutoEncoder": lib.dictionary.JumpReluAutoEncoder,
             "GatedAutoEncoder": lib.dictionary.GatedAutoEncoder}[config["dict_class"]]
    return plain.from_pretrained(path, device="cpu")
