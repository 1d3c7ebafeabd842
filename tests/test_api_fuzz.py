"""The JSON API fuzzed by schemathesis from its own OpenAPI schema, against a real server
(uvicorn in a thread) on a copy of the analysed embedded SAE with the real model: every
operation, a bounded number of generated requests each, and not one 5xx. The run's
figures (operations, requests, statuses) go to ``test-artifacts/schemathesis.json``."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.settings import Settings
from app.web.engine import InferenceEngine
from app.web.main import create_app
from app.web.serve import serve_in_thread

pytestmark = pytest.mark.slow
EXAMPLES = 30
"""Generated requests per operation (CI time stays a couple of minutes)."""
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SEEN: Counter = Counter()


@pytest.fixture(scope="module")
def live_server(explorer_data, embedded_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    db = root / "store.db"
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), db)
    cfg = Settings(data_dir=root / "data", database_url=f"sqlite:///{db}",
                   broker_url=f"sqla+sqlite:///{root / 'broker.db'}")
    engine = InferenceEngine(cfg)
    engine.preload_model(embedded_model.name, embedded_model)
    with serve_in_thread(create_app(cfg, engine), "127.0.0.1", 0) as base:
        yield base
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "schemathesis.json").write_text(json.dumps({
        "operations": len({k.split(" ", 2)[1] + " " + k.split(" ", 2)[2]
                           for k in SEEN if k.startswith("op ")}),
        "requests": sum(n for k, n in SEEN.items() if k.startswith("op ")),
        "statuses": {k.removeprefix("status "): n for k, n in SEEN.items()
                     if k.startswith("status ")},
        "server_errors": sum(n for k, n in SEEN.items() if k.startswith("status 5"))},
        indent=2))


def test_no_request_gets_a_server_error(live_server) -> None:
    """Every operation of the schema, ``EXAMPLES`` generated requests each (hypothesis
    drives schemathesis' strategies directly: its pytest plugin does not follow pytest 9)."""
    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    failures: list[tuple] = []
    for operation in operations:
        _fuzz(operation, live_server, failures)
    assert not failures, failures[:5]


def _fuzz(operation, base_url: str, failures: list) -> None:
    """``EXAMPLES`` generated requests to one operation; 5xx answers go to ``failures``."""
    from hypothesis import given

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        _bounded(case)
        response = case.call(base_url=base_url, timeout=120)
        SEEN[f"op {case.method} {operation.path}"] += 1
        SEEN[f"status {response.status_code}"] += 1
        if response.status_code >= 500:
            failures.append((case.method, case.path, case.body, response.text[:300]))

    check()


def _bounded(case) -> None:
    """Steering decodes up to 512 new tokens a reply: 8 are enough to fuzz the route."""
    if case.path == "/api/v1/steer" and isinstance(case.body, dict):
        tokens = case.body.get("max_tokens")
        if isinstance(tokens, int) and tokens > 8:
            case.body["max_tokens"] = 8
