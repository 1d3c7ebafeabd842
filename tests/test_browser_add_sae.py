"""The Add-an-SAE form in a real browser (Debian's Chromium driven by Playwright) against a
live explorer on an empty store: from the home page's link, a refused path shows its
problem inline, then a dictionary_learning folder lands on its queued analyze job's page.
No model is loaded and no worker runs (the job stays queued). Screenshots land in
``test-artifacts/screenshots/`` with the other browser tests'."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings
from tests import dictlearn_lib as dl

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/setup.sh --dev "
                "does it as root)", allow_module_level=True)


@pytest.fixture
def live(tmp_path, tiny_llama_dir):
    """A live explorer whose allowed roots hold the tiny model and one trainSAE run."""
    from app.web.main import create_app
    from app.web.serve import serve_in_thread

    folder = dl.saved("BatchTopKSAE", tmp_path / "runs" / "trainer_0",
                      model=str(tiny_llama_dir), layer=1)
    settings = Settings(data_dir=tmp_path / "data",
                        database_url=f"sqlite:///{tmp_path / 'store.db'}",
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
                        allowed_paths=[str(tiny_llama_dir), str(tmp_path / "runs")])
    with serve_in_thread(create_app(settings), "127.0.0.1", 0) as url:
        yield {"url": url, "folder": folder}


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
    assert not errors, f"JavaScript errors: {errors}"


def test_add_an_sae_from_the_home_page(page, live) -> None:
    page.goto(live["url"] + "/")
    page.click("a#add-sae")
    page.wait_for_url("**/saes/add")
    form = page.locator("#add-form")
    form.locator("input[name=sae]").fill("/etc")
    form.locator("button[type=submit]").click()
    problem = page.locator(".field-error[data-field=sae]")
    problem.wait_for()
    assert "outside the data dir and the allowed roots" in problem.inner_text()
    _shot(page, "add-sae-refused")
    form.locator("input[name=sae]").fill(str(live["folder"]))
    form.locator("input[name=tokens]").fill("4096")
    _shot(page, "add-sae")
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/jobs/*")
    text = page.locator("main").inner_text()
    assert "analyze" in text and "queued" in text and str(live["folder"]) in text
    _shot(page, "add-sae-job")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
