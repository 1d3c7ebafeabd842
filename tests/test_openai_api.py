"""The steered model behind an OpenAI-compatible API, driven by the official ``openai``
client against a live server on the analysed embedded SAE: chat and text completions,
streamed and not, steering in the ``steer`` body field or a saved preset as the model,
and the admin token as the API key."""

from __future__ import annotations

import shutil

import openai
import pytest

from app.settings import Settings
from app.web.engine import InferenceEngine
from app.web.main import create_app
from app.web.serve import serve_in_thread

pytestmark = pytest.mark.slow
TOKEN = "api-secret"


@pytest.fixture(scope="module")
def server(explorer_data, embedded_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), root / "store.db")
    settings = Settings(data_dir=root / "data", database_url=f"sqlite:///{root / 'store.db'}",
                        broker_url=f"sqla+sqlite:///{root / 'broker.db'}", admin_token=TOKEN)
    engine = InferenceEngine(settings)
    engine.preload_model(embedded_model.name, embedded_model)
    with serve_in_thread(create_app(settings, engine), "127.0.0.1", 0) as url:
        yield {"url": url, **explorer_data}


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=TOKEN, max_retries=0)


def _steer(server, value: float = 30.0) -> dict:
    feature = next(iter(server["explained"]))
    return {"sae": server["sae_id"], "latents": [{"index": feature, "mode": "clamp",
                                                  "value": value}]}


def test_chat_completions_steered_and_not(client, server) -> None:
    ask = {"model": "smollm2-135m", "max_tokens": 16, "temperature": 0, "seed": 1,
           "messages": [{"role": "user", "content": "Name a colour."}]}
    plain = client.chat.completions.create(
        **ask, extra_body={"steer": {"sae": server["sae_id"], "latents": []}})
    steered = client.chat.completions.create(**ask, extra_body={"steer": _steer(server)})
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content and steered.choices[0].message.content
    assert steered.choices[0].message.content != plain.choices[0].message.content
    assert 0 < plain.usage.completion_tokens <= 16 and plain.usage.prompt_tokens > 5
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + \
        plain.usage.completion_tokens
    assert plain.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_text_in_chunks(client, server) -> None:
    ask = {"model": "smollm2-135m", "max_tokens": 12, "temperature": 0,
           "messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Say hello."}],
           "extra_body": {"steer": _steer(server, 4.0)}}
    whole = client.chat.completions.create(**ask).choices[0].message.content
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert len(chunks) > 2 and chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completions_and_presets(client, server) -> None:
    import httpx

    created = httpx.post(f"{server['url']}/api/v1/presets", headers={
        "Authorization": f"Bearer {TOKEN}"}, json={
        "name": "loud", "sae_id": server["sae_id"],
        "features": [{"index": next(iter(server["explained"])), "mode": "add", "value": 8}]})
    assert created.status_code == 201, created.text
    model = created.json()["model"]
    assert model in [m.id for m in client.models.list().data]
    text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10,
                                     temperature=0)
    assert text.choices[0].text and text.object == "text_completion"
    stream = list(client.completions.create(model=model, prompt="Once upon a time",
                                            max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream) == text.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="preset-999999", prompt="x", max_tokens=2)


def test_the_admin_token_is_the_api_key_and_bad_requests_are_4xx(server, client) -> None:
    stranger = openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model="smollm2-135m", max_tokens=4, messages=[
            {"role": "user", "content": "hi"}], extra_body={"steer": _steer(server)})
    with pytest.raises(openai.UnprocessableEntityError):  # a steer on another model
        client.chat.completions.create(model="gpt-4o", max_tokens=4, messages=[
            {"role": "user", "content": "hi"}], extra_body={"steer": _steer(server)})
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="smollm2-135m", max_tokens=4, messages=[
            {"role": "user", "content": "hi"}])  # no steer and no preset
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="smollm2-135m", max_tokens=100_000, messages=[
            {"role": "user", "content": "hi"}], extra_body={"steer": _steer(server)})
