"""Explain jobs end to end on the analysed embedded SAE: Claude through the real
``anthropic`` client against a local Messages API server (scores, usage, idempotent
re-runs, exhausted credit failing cleanly) and the local instruct model."""

from __future__ import annotations

import json
import shutil

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from app.cli import app
from app.store.db import open_store
from app.store.explanations import NewExplanation, save_explanations
from app.store.models import Explanation, Job, Latent
from tests.fake_anthropic import FakeAnthropic, credit_too_low, user_text
from training.autointerp import maxact

pytestmark = pytest.mark.slow
runner = CliRunner()


def _answer(body: dict) -> str:
    """Labels name keywords; the judge says yes to contexts holding ``def``."""
    text = user_text(body)
    if "Answer yes or no" not in text:
        return "Python keywords such as def"
    shown = next((p for p in text.split("\n\n") if p.startswith("Text")), text)
    return "yes" if "def" in shown else "no"


@pytest.fixture
def store_copy(explorer_data, tmp_path, data_dir):
    """A copy of the analysed store, and the env pointing the CLI at it."""
    db = tmp_path / "store.db"
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), db)
    env = {"SAELAB_DATA_DIR": str(data_dir), "SAELAB_DATABASE_URL": f"sqlite:///{db}"}
    return env, open_store(env["SAELAB_DATABASE_URL"]), explorer_data["sae_id"]


def _explain(env, sae_id, *args):
    result = runner.invoke(app, ["explain", str(sae_id), "--now", "--json", *map(str, args)],
                           env=env)
    return result, (json.loads(result.stdout.strip().splitlines()[-1])
                    if result.stdout.strip() else None)


def test_claude_explains_scores_and_skips_what_is_done(store_copy) -> None:
    env, sessions, sae_id = store_copy
    with FakeAnthropic(_answer) as api:
        env = {**env, "ANTHROPIC_API_KEY": "sk-test", "SAELAB_ANTHROPIC_BASE_URL": api.url,
               "SAELAB_CLAUDE_MODEL": "claude-test"}
        result, job = _explain(env, sae_id, "--latents", "10-13")
        assert result.exit_code == 0, result.output
        assert job["state"] == "succeeded" and job["result"]["explain"]["explained"] == 4
        usage = job["result"]["explain"]["usage"]
        assert usage["requests"] == len(api.requests) > 4 and usage["cost_usd"] > 0
        with sessions() as session:
            rows = session.scalars(select(Explanation).where(
                Explanation.source == "claude-test")).all()
            assert len(rows) == 4 and all(r.settings_key for r in rows)
            scores = [s for r in rows for s in (r.detection_score, r.fuzzing_score)]
            assert all(s is None or 0 <= s <= 1 for s in scores)
            assert sum(s is not None for s in scores) >= 2  # rare latents may lack held-out
            # examples: all of theirs were shown to the explainer, none left to score on
            assert all(r.embedding and len(r.embedding) == 384 for r in rows)
        scored = next(r for r in rows if r.detection_score is not None)
        with sessions() as session:
            index = session.get(Latent, scored.latent_id).index
        shown = runner.invoke(app, ["feature", str(sae_id), str(index), "--json"], env=env)
        latent = json.loads(shown.stdout)
        assert latent["explanation"] == "Python keywords such as def"
        assert latent["explanations"][0]["detection_score"] == scored.detection_score
        sent = len(api.requests)
        again, job = _explain(env, sae_id, "--latents", "10-13")
        assert again.exit_code == 0 and job["result"]["explain"]["skipped"] == 4
        assert len(api.requests) == sent, "a re-run asks nothing already answered"


def test_exhausted_credit_fails_the_job_with_the_reason(store_copy) -> None:
    env, sessions, sae_id = store_copy
    with FakeAnthropic(_answer) as api:
        api.fail_always(credit_too_low())
        env = {**env, "ANTHROPIC_API_KEY": "sk-test", "SAELAB_ANTHROPIC_BASE_URL": api.url}
        result, job = _explain(env, sae_id, "--latents", "20-29")
        assert result.exit_code == 1 and job["state"] == "failed"
        assert "credit balance is too low" in job["message"]
        assert len(api.requests) == 1, "a fatal error is not retried nor repeated"
    with sessions() as session:
        assert session.scalars(select(Explanation).where(
            Explanation.settings_key.is_not(None))).all() == []
        assert session.scalars(select(Job).where(Job.kind == "explain")).one().state == "failed"


def test_bad_explain_input_is_refused(store_copy) -> None:
    env, _, sae_id = store_copy
    assert _explain(env, 999)[0].exit_code == 2
    result, _ = _explain(env, sae_id, "--latents", "5-99999")
    assert result.exit_code == 2 and "latent_range" in result.output
    result, _ = _explain(env, sae_id, "--explainer", "claude")
    assert result.exit_code == 1 and "ANTHROPIC_API_KEY" in result.output


def test_local_model_explains_a_few_latents(store_copy) -> None:
    env, sessions, sae_id = store_copy
    result, job = _explain(env, sae_id, "--latents", "0-1", "--explainer", "local")
    assert result.exit_code == 0, result.output
    assert job["state"] == "succeeded", job["message"]
    with sessions() as session:
        rows = session.scalars(select(Explanation).where(
            Explanation.source == "smollm2-135m")).all()
    assert len(rows) == 2 and all(r.text.strip() for r in rows)
    assert all(r.score is None or 0 <= r.score <= 1 for r in rows)


def test_maxact_labels_and_scores_every_live_latent_offline(store_copy) -> None:
    env, sessions, sae_id = store_copy
    with sessions() as session:
        first, second = session.scalars(select(Latent).where(
            Latent.sae_id == sae_id, Latent.density > 0).order_by(Latent.index).limit(2)).all()
        first_id, second_id = first.id, second.id
    save_explanations(sessions, [  # an older maxact's label, shown (scored high), and a paid one
        NewExplanation(first_id, "old maxact label", "maxact-1", "old", detection=0.99,
                       fuzzing=0.99, detection_n=4, fuzzing_n=4),
        NewExplanation(second_id, "old maxact label", "maxact-1", "old", detection=0.99,
                       fuzzing=0.99, detection_n=4, fuzzing_n=4),
        NewExplanation(second_id, "a paid label", "claude-test", "paid", detection=0.98,
                       fuzzing=0.98, detection_n=10, fuzzing_n=10)])
    result, job = _explain(env, sae_id, "--latents", "all", "--explainer", "maxact")
    assert result.exit_code == 0, result.output
    summary = job["result"]["explain"]
    with sessions() as session:
        live = session.scalars(select(Latent).where(Latent.sae_id == sae_id,
                                                    Latent.density > 0)).all()
        dead = session.scalars(select(Latent).where(Latent.sae_id == sae_id,
                                                    Latent.density == 0)).all()
        rows = session.scalars(select(Explanation).where(
            Explanation.source == maxact.VERSION)).all()
    assert summary["explained"] == len(live) == len(rows) and not summary["failed"]
    with sessions() as session:  # the older maxact's labels are replaced, the paid one kept
        assert not session.scalars(select(Explanation).where(
            Explanation.source == "maxact-1")).all()
        assert session.get(Latent, first_id).explanation == next(
            r.text for r in rows if r.latent_id == first_id)
        assert session.get(Latent, second_id).explanation == "a paid label"
    assert summary["usage"]["cost_usd"] == 0
    assert summary["explainer"] == f"maxact ({maxact.VERSION})"
    assert all(lat.explanation for lat in live) and not any(lat.explanation for lat in dead)
    scored = [r for r in rows if r.detection_score is not None]
    assert len(scored) >= 0.8 * len(rows)
    for r in scored:
        assert 0 <= r.detection_score <= 1 and 0 <= r.fuzzing_score <= 1
        assert r.detection_n > 0 and r.fuzzing_n > 0 and r.simulation_n > 0
        assert -1 <= r.simulation_score <= 1
    mean = sum(r.detection_score for r in scored) / len(scored)
    assert mean > 0.6, f"maxact labels should beat chance clearly (mean detection {mean:.2f})"
    index, row = next((lat.index, r) for r in scored for lat in live
                      if lat.id == r.latent_id and lat.id not in (first_id, second_id))
    shown = json.loads(runner.invoke(app, ["feature", str(sae_id), str(index), "--json"],
                                     env=env).stdout)
    assert shown["explanation"] == row.text and len(shown["explanations"]) == 1
    assert shown["explanations"][0]["simulation_n"] == row.simulation_n
    _, job = _explain(env, sae_id, "--latents", "all", "--explainer", "maxact")
    assert job["result"]["explain"]["skipped"] == len(live)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """llama-cpp-python's OpenAI-compatible server on the embedded GGUF (a real third-party
    server), with an API key."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from training.data.models import embedded_gguf_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
             "--api_key", "test-key", "--n_threads", "2"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                request = urllib.request.Request(f"{url}/models",
                                                 headers={"Authorization": "Bearer test-key"})
                urllib.request.urlopen(request, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"llama_cpp.server exited: "
                                       f"{log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_openai_compatible_server_explains_and_scores(store_copy, llama_server) -> None:
    env, sessions, sae_id = store_copy
    env = {**env, "SAELAB_OPENAI_BASE_URL": llama_server, "SAELAB_OPENAI_API_KEY": "test-key",
           "SAELAB_OPENAI_MODEL": "smollm2-135m-gguf"}
    result, job = _explain(env, sae_id, "--latents", "10-11", "--explainer", "openai")
    assert result.exit_code == 0, result.output
    summary = job["result"]["explain"]
    assert job["state"] == "succeeded" and summary["explained"] == 2, job["message"]
    assert summary["explainer"] == "openai (smollm2-135m-gguf)"
    assert summary["usage"]["requests"] > 2 and summary["usage"]["input_tokens"] > 0
    with sessions() as session:
        rows = session.scalars(select(Explanation).where(
            Explanation.source == "smollm2-135m-gguf")).all()
    assert len(rows) == 2 and all(r.text.strip() for r in rows)
    assert all(r.usage["requests"] > 0 for r in rows)
    judged = [r.detection_n for r in rows if r.detection_n is not None]
    assert all(0 < n <= 10 for n in judged)


def test_a_wrong_key_for_the_openai_server_is_fatal(store_copy, llama_server) -> None:
    env, _, sae_id = store_copy
    env = {**env, "SAELAB_OPENAI_BASE_URL": llama_server, "SAELAB_OPENAI_API_KEY": "wrong",
           "SAELAB_OPENAI_MODEL": "m"}
    result, job = _explain(env, sae_id, "--latents", "10-13", "--explainer", "openai")
    assert result.exit_code == 1 and job["state"] == "failed"
    assert "authentication failed (401)" in job["message"]


def test_steer_eval_records_steerability_on_the_latents(store_copy, tmp_path) -> None:
    env, sessions, sae_id = store_copy
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Describe a quiet morning.\n\nWrite two lines about rain.\n")
    result = runner.invoke(app, ["steer-eval", str(sae_id), "--latents", "10,11",
                                 "--strengths", "1,6", "--prompts", str(prompts), "--now",
                                 "--json"], env=env)
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout.strip().splitlines()[-1])
    assert [r["index"] for r in records] == [10, 11]
    for record in records:
        assert record["prompts"] == 2 and 0 <= record["steerability"] <= 1
        assert [s["strength"] for s in record["strengths"]] == [1.0, 6.0]
        assert record["best_strength"] in (None, 1.0, 6.0)
        assert all(s["loss_baseline"] is not None for s in record["strengths"])
    with sessions() as session:
        stored = {lat.index: lat for lat in session.scalars(select(Latent).where(
            Latent.sae_id == sae_id, Latent.index.in_([10, 11])))}
    assert stored[10].steerability == records[0]["steerability"]
    assert stored[11].steer_eval["strengths"][1]["strength"] == 6.0
    listed = runner.invoke(app, ["features", str(sae_id), "--sort", "steerability",
                                 "--limit", "2", "--json"], env=env)
    assert {r["index"] for r in json.loads(listed.stdout)} == {10, 11}
    bad = runner.invoke(app, ["steer-eval", str(sae_id), "--strengths", "a,b", "--now"],
                        env=env)
    assert bad.exit_code == 2 and "strengths" in bad.output


def test_a_spend_cap_stops_the_job_and_keeps_what_it_paid_for(store_copy) -> None:
    env, sessions, sae_id = store_copy
    with FakeAnthropic(_answer) as api:
        env = {**env, "ANTHROPIC_API_KEY": "sk-test", "SAELAB_ANTHROPIC_BASE_URL": api.url,
               "SAELAB_CLAUDE_MODEL": "claude-capped", "SAELAB_EXPLAIN_MAX_USD": "0.00001"}
        result, job = _explain(env, sae_id, "--latents", "10-13")
    assert result.exit_code == 1 and job["state"] == "failed"
    assert "spend cap" in job["message"] and "after 1 latents" in job["message"]
    with sessions() as session:
        kept = session.scalars(select(Explanation).where(
            Explanation.source == "claude-capped")).all()
    assert len(kept) == 1 and kept[0].usage["cost_usd"] > 0
