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
from app.store.models import Explanation, Job, Latent
from tests.fake_anthropic import FakeAnthropic, credit_too_low, user_text

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
