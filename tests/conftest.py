"""Shared fixtures: a tiny random Llama saved to disk (unit tests) and the embedded model
loaded once per session (slow end-to-end tests)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 512
# FastAPI's TestClient sends "Host: testserver"; the security tests set their own list
os.environ.setdefault("SAELAB_ALLOWED_HOSTS", "127.0.0.1,localhost,::1,testserver")
PG_SERVER = "postgresql+psycopg://postgres@127.0.0.1:5432"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The data dir of the test session; the embedded model is converted into it once."""
    return tmp_path_factory.mktemp("saelab-data")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 4-layer, d=64 random LlamaForCausalLM with a character-level tokenizer (vocab
    512, BOS id 1), saved as a genuine on-disk HF checkpoint so the real loading code runs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    names = [f"<{i}>" for i in range(4)] + [chr(c) for c in range(32, 127)] + ["\n"]
    names += [f"x{i}" for i in range(TINY_VOCAB - len(names))]
    vocab = {name: index for index, name in enumerate(names)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<3>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<1>", eos_token="<2>",
                                   unk_token="<3>", pad_token="<0>")
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_llama_dir, data_dir):
    from training.data.models import load_model

    return load_model(str(tiny_llama_dir), data_dir=data_dir, device="cpu")


@pytest.fixture(scope="session")
def embedded_model(data_dir):
    """SmolLM2-135M-Instruct, loaded once for every slow test."""
    from training.data.models import EMBEDDED_MODEL, load_model

    return load_model(EMBEDDED_MODEL, data_dir=data_dir, device="cpu")


@pytest.fixture(scope="session")
def embedded_sae(embedded_model, tmp_path_factory) -> dict[str, Path]:
    """One small capture of the embedded model (layer 3, 16k tokens) and an SAE trained on
    it (n=1024, k=16), shared by every test that needs real data."""
    from training.data.capture import CaptureConfig, capture
    from training.sae.autoencoder import SaeConfig
    from training.train.run import train
    from training.train.trainer import TrainConfig

    root = tmp_path_factory.mktemp("embedded")
    capture(embedded_model, CaptureConfig(layer=3, tokens=16_384, context=128, dtype="fp32"),
            root / "acts", progress=False)
    train(root / "acts", root / "sae",
          SaeConfig(d_in=embedded_model.d_model, n_latents=1024, k=16),
          TrainConfig(batch=1024, lr=2e-3, warmup_steps=10, holdout_rows=2048,
                      checkpoint_every=0), progress=False)
    return {"acts": root / "acts", "sae": root / "sae"}


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small line corpus (3,000 short numbered sentences) for streaming from the tiny
    Llama."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(f"Line {i}: the {['cat', 'dog', 'fox'][i % 3]} sat on mat "
                              f"{i * 7 % 13}." for i in range(3000)))
    return path


@contextmanager
def empty_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty SQLite file or a fresh PostgreSQL database (dropped after)."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    import psycopg

    name = f"saelab_test_{uuid.uuid4().hex[:12]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """An empty database of each kind (a fresh PostgreSQL database per test)."""
    with empty_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(scope="session")
def explorer_data(embedded_model, embedded_sae, tmp_path_factory) -> dict:
    """The embedded SAE analysed (8k tokens) into a SQLite store, with a few explanations,
    for the explorer's route and browser tests: {"data_dir", "db_url", "sae_id",
    "explained": {index: text}}."""
    from sqlalchemy import select

    from app.store.db import open_store
    from app.store.models import Explanation, Latent
    from app.store.persist import save_analysis, token_texts
    from training.analysis.latents import analyse_capture
    from training.data.activations import ActivationStore
    from training.sae.folder import load_sae

    root = tmp_path_factory.mktemp("explorer")
    db_url = f"sqlite:///{root / 'store.db'}"
    sessions = open_store(db_url)
    sae, cfg = load_sae(embedded_sae["sae"])
    result = analyse_capture(sae, ActivationStore(embedded_sae["acts"]),
                             embedded_model.model.get_output_embeddings().weight,
                             max_tokens=8192, progress=False)
    sae_id = save_analysis(sessions, sae_dir=embedded_sae["sae"], sae_cfg=cfg,
                           model_name=embedded_model.name, d_model=embedded_model.d_model,
                           n_layers=embedded_model.n_layers, result=result,
                           token_text=token_texts(embedded_model.tokenizer, result))
    explained = {}
    with sessions.begin() as session:
        busiest = session.scalars(select(Latent).where(Latent.sae_id == sae_id)
                                  .order_by(Latent.density.desc()).limit(3)).all()
        for latent, text in zip(busiest, ["python keywords in code", "<script>alert(1)</script>",
                                          "punctuation marks"], strict=True):
            latent.explanation = text
            session.add(Explanation(latent_id=latent.id, text=text, source="human", score=0.8))
            explained[latent.index] = text
    sessions.kw["bind"].dispose()
    return {"data_dir": root / "data", "db_url": db_url, "sae_id": sae_id,
            "explained": explained}
