"""The explorer against a stranger, without a model (fast: not ``slow``): CSRF, the admin
token and sign-in, the Host allow-list, request limits, the path allow-list of job
parameters, search input, and error messages without server paths."""

from __future__ import annotations

import os
import re
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.settings import Settings
from app.store.db import open_store
from app.store.models import Job, Latent, Model, Sae
from app.web.main import create_app
from app.web.security import ADMIN_COOKIE, admin_cookie_value

TOKEN = "s3cret-token"


def _settings(tmp_path, db_url=None, **extra) -> Settings:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    base = dict(data_dir=data, database_url=db_url or f"sqlite:///{tmp_path / 'store.db'}",
                broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    return Settings(**{**base, **extra})


@pytest.fixture
def settings(tmp_path) -> Settings:
    return _settings(tmp_path)


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _jobs(settings) -> int:
    sessions = open_store(settings.database_url)
    with sessions() as session:
        count = session.scalar(select(func.count()).select_from(Job))
    sessions.kw["bind"].dispose()
    return count


def _submit(client, params: dict, kind: str = "pipeline", **headers):
    return client.post("/api/v1/jobs", json={"kind": kind, "params": params}, headers=headers)


# -- the Host allow-list ------------------------------------------------------------------
def test_only_the_operators_host_names_are_answered(tmp_path) -> None:
    settings = _settings(tmp_path, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "[::1]:8000"}).status_code == 200
        evil = c.get("/healthz", headers={"Host": "attacker.example:8000"})
        assert evil.status_code == 400 and "SAELAB_ALLOWED_HOSTS" in evil.text
        assert c.get("/", headers={"Host": "127.0.0.1.attacker.example"}).status_code == 400
    assert Settings().allowed_hosts == os.environ["SAELAB_ALLOWED_HOSTS"].split(",")
    with TestClient(create_app(_settings(tmp_path, allowed_hosts=["*"]))) as c:
        assert c.get("/healthz", headers={"Host": "anything"}).status_code == 200


def test_the_default_host_list_is_loopback_only(monkeypatch) -> None:
    monkeypatch.delenv("SAELAB_ALLOWED_HOSTS")
    assert set(Settings().allowed_hosts) == {"127.0.0.1", "localhost", "::1", "[::1]"}


# -- request limits -----------------------------------------------------------------------
def test_bodies_over_the_limit_are_413(tmp_path) -> None:
    with TestClient(create_app(_settings(tmp_path, max_body_bytes=2000))) as c:
        big = c.post("/api/v1/jobs", content=b"x" * 5000,
                     headers={"Content-Type": "application/json"})
        assert big.status_code == 413

        def chunks():
            yield b'{"kind": "capture", "params": {"layer": 1, "x": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}}'

        streamed = c.post("/api/v1/jobs", content=chunks(),
                          headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413


@pytest.mark.parametrize("params, field", [
    ({"layer": 3, "tokens": 10**12}, "tokens"), ({"layer": 3, "latents": 1 << 30}, "latents"),
    ({"layer": 3, "context": 10**6}, "context"), ({"layer": 3, "batch": 1 << 30}, "batch"),
    ({"layer": 3, "nproc": 1000}, "nproc"), ({"layer": 3, "explain_count": 10**7},
                                             "explain_count"),
    ({"layer": 99}, "layer"), ({"layer": 3, "queue": "a b"}, "queue"),
    ({"layer": 3, "strengths": ",".join(["1"] * 20)}, "strengths"),
])
def test_every_job_size_has_an_upper_bound(client, settings, params, field) -> None:
    answer = _submit(client, params)
    assert answer.status_code == 422 and answer.json()["detail"].startswith(field), \
        answer.json()
    assert "Value error" not in answer.json()["detail"]
    assert _jobs(settings) == 0


def test_steer_and_probe_sizes_are_bounded(client) -> None:
    long_prompt = client.post("/api/v1/steer", json={"sae_id": 1, "prompt": "x" * 9000})
    assert long_prompt.status_code == 422 and "prompt" in long_prompt.json()["detail"]
    assert client.post("/api/v1/steer", json={"sae_id": 1, "prompt": "hi",
                                              "max_tokens": 100_000}).status_code == 422
    blank = client.post("/api/v1/steer", json={"sae_id": 1, "prompt": "   "})
    assert blank.json()["detail"] == "prompt: the prompt is empty"
    assert client.post("/api/v1/probe", json={"sae_id": 1, "text": "x" * 30_000}
                       ).status_code == 422


# -- paths in job parameters --------------------------------------------------------------
@pytest.mark.parametrize("params, field", [
    ({"layer": 3, "dataset": "/etc"}, "dataset"), ({"layer": 3, "dataset": "/root"}, "dataset"),
    ({"layer": 3, "dataset": "../../../../etc"}, "dataset"),
    ({"layer": 3, "model": "/etc"}, "model"),
    ({"layer": 3, "model": "someone/made-up-model"}, "model"),
    ({"layer": 3, "dataset": "someone/some-dataset"}, "dataset"),
    ({"layer": 3, "explain_count": 2, "explainer": "local", "explainer_model": "/etc"},
     "explainer_model"),
])
def test_paths_outside_the_allowed_roots_are_refused(client, settings, params, field) -> None:
    answer = _submit(client, params)
    assert answer.status_code == 422, answer.json()
    assert answer.json()["detail"].startswith(f"{field}:")
    assert _jobs(settings) == 0, "a refused job leaves no row"


@pytest.mark.parametrize("params, field", [({"acts": "/root"}, "acts"),
                                           ({"acts": "/etc"}, "acts")])
def test_train_and_analyze_inputs_must_be_allowed_and_real(client, settings, params,
                                                           field) -> None:
    assert _submit(client, params, "train").status_code == 422
    assert _submit(client, {"sae": "/etc"}, "analyze").json()["detail"].startswith("sae:")
    missing = _submit(client, {"acts": "no-such-capture"}, "train")
    assert missing.status_code == 422 and "not a capture" in missing.json()["detail"]
    assert _jobs(settings) == 0


def test_symlinks_are_resolved_before_the_check(client, settings) -> None:
    (settings.data_dir / "innocent").symlink_to("/etc")
    answer = _submit(client, {"layer": 3, "dataset": "innocent"})
    assert answer.status_code == 422 and "outside the data dir" in answer.json()["detail"]


def test_allowed_roots_and_hub_access_are_the_operators_choice(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text")
    settings = _settings(tmp_path, allowed_paths=[str(corpus)], hub_access=True)
    with TestClient(create_app(settings)) as c:
        ok = _submit(c, {"layer": 3, "dataset": str(corpus / "a.txt"), "queue": "nobody"})
        assert ok.status_code == 201, ok.json()
        assert ok.json()["params"]["dataset"] == str((corpus / "a.txt").resolve())
        hub = _submit(c, {"layer": 3, "dataset": "someone/some-dataset", "queue": "nobody"})
        assert hub.status_code == 201
        inside = _submit(c, {"layer": 3, "dataset": "corpus-here", "queue": "nobody"})
        assert inside.status_code == 201  # a name: a hub dataset, allowed here


# -- CSRF, the admin token, sign-in --------------------------------------------------------
def _csrf(client) -> str:
    page = client.get("/jobs")
    return re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)


def test_forms_need_the_csrf_token(client, settings) -> None:
    form = {"kind": "capture", "layer": "1", "queue": "nobody"}
    assert client.post("/jobs", data=form).status_code == 403
    token = _csrf(client)
    assert client.post("/jobs", data={**form, "csrf_token": token}).status_code in (200, 303)
    assert _jobs(settings) == 1


def test_mutations_need_the_admin_token_and_sign_in_is_limited(tmp_path) -> None:
    settings = _settings(tmp_path, admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        assert _submit(c, {"layer": 1, "queue": "nobody"}).status_code == 401
        ok = _submit(c, {"layer": 1, "queue": "nobody"}, Authorization=f"Bearer {TOKEN}")
        assert ok.status_code == 201
        csrf = _csrf(c)
        for _ in range(5):
            wrong = c.post("/signin", data={"token": "guess", "csrf_token": csrf})
            assert wrong.status_code == 401
        blocked = c.post("/signin", data={"token": TOKEN, "csrf_token": csrf})
        assert blocked.status_code == 429 and "too many failed attempts" in blocked.text


def test_the_sign_in_cookie_expires_and_dies_with_the_token(tmp_path) -> None:
    settings = _settings(tmp_path, admin_token=TOKEN, signin_ttl_s=60)
    with TestClient(create_app(settings)) as c:
        csrf = _csrf(c)
        signed = c.post("/signin", data={"token": TOKEN, "csrf_token": csrf},
                        follow_redirects=False)
        assert signed.status_code == 303
        cookie = c.cookies.get(ADMIN_COOKIE)
        assert TOKEN not in cookie
        assert _submit(c, {"layer": 1, "queue": "nobody"}).status_code == 201
        c.cookies.clear()
        c.cookies.set(ADMIN_COOKIE, admin_cookie_value(TOKEN, time.time() - 3600))
        assert _submit(c, {"layer": 1, "queue": "nobody"}).status_code == 401
    changed = _settings(tmp_path, admin_token="another-token")
    with TestClient(create_app(changed)) as c:
        c.cookies.set(ADMIN_COOKIE, cookie)
        assert _submit(c, {"layer": 1, "queue": "nobody"}).status_code == 401


def test_errors_hide_server_paths_from_strangers(tmp_path) -> None:
    settings = _settings(tmp_path, admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        answer = _submit(c, {"acts": str(settings.data_dir / "nothing")}, "train",
                         Authorization=f"Bearer {TOKEN}")
        assert str(settings.data_dir) in answer.json()["detail"]  # the operator sees it
        stranger = c.get(f"/saes/1/features/{10**6}")
        assert stranger.status_code == 404
    from app.web.guards import without_paths

    assert without_paths("no cfg.json in /root/.saelab/jobs/3/sae, see /tmp/x.log") == (
        "no cfg.json in <path>, see <path>")
    assert without_paths("http://host/a/b and 3/4") == "http://host/a/b and 3/4"


def test_serving_beyond_loopback_needs_a_token(tmp_path) -> None:
    from app.cli.web import check_bind

    check_bind("127.0.0.1", _settings(tmp_path))
    check_bind("::1", _settings(tmp_path))
    with pytest.raises(ValueError, match="SAELAB_ADMIN_TOKEN"):
        check_bind("0.0.0.0", _settings(tmp_path))
    check_bind("0.0.0.0", _settings(tmp_path, admin_token=TOKEN))


# -- search input ----------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def searchable(request, tmp_path):
    """An SAE with two explained latents in a fresh database of each kind."""
    from tests.conftest import empty_database

    with empty_database(request.param, tmp_path) as url:
        settings = _settings(tmp_path, db_url=url)
        sessions = open_store(url)
        with sessions.begin() as session:
            model = Model(name="m", d_model=4, n_layers=2)
            sae = Sae(model=model, name="s", path=str(tmp_path / "sae"), architecture="topk",
                      layer=1, d_in=4, n_latents=2, k=1)
            for index, text in enumerate(["laundry and soap", "python keywords"]):
                session.add(Latent(sae=sae, index=index, density=0.1, mean_activation=1,
                                   max_activation=2, explanation=text))
        sessions.kw["bind"].dispose()
        with TestClient(create_app(settings)) as client:
            yield client


@pytest.mark.parametrize("query", ["laundry", "\x00", "a\x00b", '"', "NEAR(a b)", "*",
                                   "AND OR NOT", "col:value", "^", "'; drop table x;--"])
def test_search_input_is_a_search_or_a_4xx_never_a_500(searchable, query) -> None:
    page = searchable.get("/saes/1", params={"q": query})  # a full page: bookmark, reload
    assert page.status_code in (200, 422), page.text
    api = searchable.get("/api/v1/saes/1/features", params={"search": query})
    assert api.status_code in (200, 422)
    if query == "laundry":
        assert "laundry and soap" in page.text
        assert [r["index"] for r in api.json()] == [0]
