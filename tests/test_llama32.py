"""Llama 3.2's architecture with its real tokenizer (random weights, narrowed to 4 blocks
of width 128): a pipeline job (capture -> train -> analyse -> eval -> label), then probing
and steered chat in the Llama 3 chat format through the explorer's API."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app.cli import app
from app.settings import Settings
from app.web.main import create_app
from training.bench.llama32 import write_llama32
from training.data.models import load_model
from training.inference.sampling import Sampling, special_token_ids
from training.inference.steering import conversation_ids, generate

pytestmark = pytest.mark.slow
runner = CliRunner()
LAYER = 2


@pytest.fixture(scope="module")
def llama32_dir(tmp_path_factory):
    return write_llama32(tmp_path_factory.mktemp("llama32"), "1b", layers=4, hidden=128)


@pytest.fixture(scope="module")
def llama32(llama32_dir, tmp_path_factory):
    return load_model(str(llama32_dir), data_dir=tmp_path_factory.mktemp("l32-data"),
                      device="cpu")


@pytest.fixture(scope="module")
def analysed(llama32_dir, tmp_path_factory) -> dict:
    """A pipeline job run inline on the model: {"env", "job"}."""
    root = tmp_path_factory.mktemp("l32-store")
    env = {"SAELAB_DATA_DIR": str(root / "data"),
           "SAELAB_DATABASE_URL": f"sqlite:///{root / 'store.db'}"}
    result = runner.invoke(app, [
        "jobs", "submit", "pipeline", "--model", str(llama32_dir), "--layer", str(LAYER),
        "--tokens", "8192", "--latents", "256", "--k", "8", "--batch", "512",
        "--analyze-tokens", "4096", "--now", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return {"env": env, "job": json.loads(result.stdout.strip().splitlines()[-1])}


def test_the_model_is_llama32_shaped_with_its_tokenizer(llama32_dir, llama32) -> None:
    config = json.loads((llama32_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]  # transformers 5 / 4
    assert rope["rope_type"] == "llama3" and config["tie_word_embeddings"]
    assert config["vocab_size"] == 128_256 and config["num_key_value_heads"] * 4 == config[
        "num_attention_heads"]
    lm = llama32.model
    assert lm.get_output_embeddings().weight.data_ptr() == lm.get_input_embeddings(
        ).weight.data_ptr()
    ids = conversation_ids(llama32, [{"role": "user", "content": "Hi"}])
    tokens = llama32.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<|begin_of_text|>", "<|start_header_id|>"]
    assert "<|eot_id|>" in tokens and tokens[-2:] == ["<|end_header_id|>", "ĊĊ"]
    special = special_token_ids(llama32)
    marks = llama32.tokenizer.convert_tokens_to_ids(
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"])
    assert set(marks) <= special


def test_chat_markers_are_left_unsteered(llama32) -> None:
    """Every position of the chat prompt's header and ``<|eot_id|>`` tokens is masked out
    of the edit; the message's own text is steered."""
    ids = conversation_ids(llama32, [{"role": "user", "content": "Tell me about rivers."}])
    masks = []

    def recorder(h, steerable):
        masks.append(steerable)
        return h

    list(generate(llama32, LAYER, recorder, ids, Sampling(temperature=0, max_tokens=2),
                  ignore_eos=True))
    special = special_token_ids(llama32)
    expected = [i not in special for i in ids]
    expected[0] = False
    assert masks[0][0].tolist() == expected and sum(expected) >= 5


def test_pipeline_probe_steer_and_eval(analysed, llama32_dir, tmp_path) -> None:
    job = analysed["job"]
    assert job["state"] == "succeeded", job["message"]
    sae_id = job["result"]["sae_id"]
    listed = json.loads(runner.invoke(app, ["saes", "--json"], env=analysed["env"]).stdout)
    assert [(s["id"], s["n_latents"], s["layer"]) for s in listed] == [(sae_id, 256, LAYER)]
    evaluated = runner.invoke(app, ["eval", "--sae", job["result"]["sae"], "--tokens",
                                    "1024"], env=analysed["env"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout.strip().splitlines()[-1])
    # random weights: every loss sits near ln(128,256) = 11.76, the spliced one included
    assert all(abs(metrics[name] - 11.76) < 1.5 for name in ("ce_clean", "ce_sae"))
    assert 0 < metrics["fvu"] < 1 and metrics["kl"] >= 0 and metrics["l0"] <= 8

    settings = Settings(data_dir=tmp_path / "web",
                        database_url=analysed["env"]["SAELAB_DATABASE_URL"],
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    with TestClient(create_app(settings)) as client:
        probe = client.post("/api/v1/probe", json={"sae_id": sae_id,
                                                   "text": "The river runs to the sea."})
        assert probe.status_code == 200, probe.text
        body = probe.json()
        assert "".join(body["tokens"]) == "The river runs to the sea."
        feature = body["top_features"][0]["index"]
        steered = _steer(client, sae_id, feature)
    assert steered["baseline"] != steered["steered"]


def _steer(client, sae_id: int, feature: int) -> dict[str, str]:
    replies = {"baseline": "", "steered": ""}
    body = {"sae_id": sae_id, "prompt": "Tell me a story.",
            "features": [{"index": feature, "value": 20}], "max_tokens": 12,
            "temperature": 0, "seed": 0}
    with client.stream("POST", "/api/v1/steer", json=body) as response:
        assert response.status_code == 200, response.read()
        for block in response.read().decode().split("\n\n"):
            if block.startswith("event: token"):
                data = json.loads(block.split("data: ", 1)[1])
                replies[data["side"]] += data["text"]
    return replies


def test_the_llama32_benchmark_reports_capture_and_training(tmp_path) -> None:
    from training.bench.scale import bench_llama32

    result = bench_llama32(tmp_path, layer=1, tokens=1024, train_tokens=2048, latents=256,
                           k=8, batch=256, device="cpu", narrow={"layers": 2, "hidden": 128})
    assert result["d_model"] == 128 and result["params"] > 128_256 * 128
    assert result["capture"]["tokens_per_s"] > 0 and result["capture"]["peak_gib"] > 0
    figures = result["train"]
    assert figures["tokens_per_s"] > 0 and figures["flops_fraction"] > 0
    assert 0 < figures["heldout_fvu"] < 2
