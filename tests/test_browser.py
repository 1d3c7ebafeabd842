"""End to end in a real browser (Debian's Chromium driven by Playwright) against a live
explorer on the analysed embedded SAE, with a real worker process for the job form.
Screenshots of every page land in ``test-artifacts/screenshots/``."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings
from training.autointerp import maxact

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--enable-unsafe-swiftshader"]  # software WebGL for the feature map

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/setup.sh --dev "
                "does it as root)", allow_module_level=True)


@pytest.fixture(scope="module")
def live(explorer_data, embedded_model, tiny_llama_dir, tmp_path_factory):
    """A live explorer on a copy of the analysed store, and a worker on its broker."""
    from app.web.engine import InferenceEngine
    from app.web.main import create_app
    from app.web.serve import serve_in_thread

    root = tmp_path_factory.mktemp("live")
    shutil.copy(explorer_data["db_url"].removeprefix("sqlite:///"), root / "store.db")
    env = {"SAELAB_DATA_DIR": str(root / "data"),
           "SAELAB_DATABASE_URL": f"sqlite:///{root / 'store.db'}",
           "SAELAB_BROKER_URL": f"sqla+sqlite:///{root / 'broker.db'}",
           "SAELAB_HEARTBEAT_S": "0.5"}
    settings = Settings(data_dir=root / "data", database_url=env["SAELAB_DATABASE_URL"],
                        broker_url=env["SAELAB_BROKER_URL"],
                        allowed_paths=[str(tiny_llama_dir.parent)])  # the job form's model
    engine = InferenceEngine(settings)
    engine.preload_model(embedded_model.name, embedded_model)
    log = (root / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-c", "from app.cli import main; main()",
                               "worker"], cwd=REPO, env={**os.environ, **env}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with serve_in_thread(create_app(settings, engine), "127.0.0.1", 0) as url:
            yield {"url": url, **explorer_data, "env": env}
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_home_and_sae_page(page, live) -> None:
    page.goto(live["url"] + "/")
    assert page.locator("#sae-table tbody tr").count() == 1
    _shot(page, "home")
    page.goto(f"{live['url']}/saes/{live['sae_id']}")
    page.locator(".plot .main-svg").first.wait_for()
    rows = page.locator("#latent-list tbody tr:not(.more)")
    assert rows.count() == 50
    for width in (1280, 800, 420):  # the toolbar's controls never overlap, however narrow
        page.set_viewport_size({"width": width, "height": 900})
        boxes = [page.locator(sel).bounding_box() for sel in (
            ".toolbar input[name=q]", ".toolbar select[name=sort]", ".toolbar form.goto")]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert (a["x"] + a["width"] <= b["x"] + 0.5 or b["x"] + b["width"] <= a["x"] + 0.5
                        or a["y"] + a["height"] <= b["y"] + 0.5
                        or b["y"] + b["height"] <= a["y"] + 0.5), (width, a, b)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.locator("tr.more").scroll_into_view_if_needed()
    page.wait_for_function("document.querySelectorAll('#latent-list tbody tr').length > 60")
    page.fill("input[name=q]", "punctuation")
    page.wait_for_function("document.querySelectorAll('#latent-list tbody tr').length === 1")
    assert "punctuation marks" in page.locator("#latent-list").inner_text()
    _shot(page, "sae")


def test_feature_page_shows_highlighted_tokens(page, live) -> None:
    index = next(i for i, t in live["explained"].items() if "script" in t)
    page.goto(f"{live['url']}/saes/{live['sae_id']}/features/{index}")
    assert page.locator(".explanation").inner_text().startswith("“<script>")
    highlighted = page.locator("#top-examples .tok[style*='background-color']")
    assert highlighted.count() >= 20
    peak = page.locator("#top-examples .tok.peak").first
    assert float(peak.get_attribute("data-act")) > 0
    peak.hover()
    page.locator(".plot .main-svg").first.wait_for()
    _shot(page, "feature")


def test_probe_a_text(page, live) -> None:
    feature = next(iter(live["explained"]))
    page.goto(f"{live['url']}/saes/{live['sae_id']}/probe?feature={feature}")
    page.fill("textarea[name=text]", "for x in range(10):\n    print(x)  # <script>")
    page.click("button[type=submit]")
    page.locator("#top-features tbody tr").first.wait_for()
    assert page.locator("#top-features tbody tr").count() >= 5
    tokens = page.locator("[data-token-picker] button.pick")
    assert "<script>" not in page.content().split('id="result"')[1].split("</div>")[0]
    tokens.nth(3).click()
    panel = page.locator("#token-3")
    assert panel.is_visible() and panel.locator("li a").count() >= 1
    _shot(page, "probe")


def test_steer_streams_two_different_replies(page, live) -> None:
    feature = next(iter(live["explained"]))
    page.goto(f"{live['url']}/steer?sae={live['sae_id']}&feature={feature}")
    page.fill(f"#steer-set tr[data-index='{feature}'] input[name=value]", "30")
    page.fill("input[name=q]", "punctuation")
    found = page.locator("#search-results li", has_text="punctuation marks")
    found.locator("button.add-feature").click()
    assert page.locator("#steer-set tr.steer-row").count() == 2
    assert "punctuation marks" in page.locator("#steer-set").inner_text()
    page.fill("textarea[name=prompt]", "What is your favourite food?")
    page.fill("input[name=max_tokens]", "24")
    page.click("#send")
    page.wait_for_selector("#steer[data-state=done]", timeout=120_000)
    baseline = page.locator("#reply-baseline").inner_text()
    steered = page.locator("#reply-steered").inner_text()
    assert page.locator("#steer-error").is_hidden()
    assert baseline and steered and baseline != steered
    piece = page.locator("#reply-baseline span.piece").filter(has_text=re.compile(r"\w")).first
    piece.hover()
    alternatives = piece.get_attribute("title").split("\n")
    assert len(alternatives) == 5 and all(a.endswith("%") for a in alternatives)
    _shot(page, "steer")
    page.select_option("select[name=format]", "text")
    page.fill("textarea[name=prompt]", "Once upon a time")
    page.click("#send")
    page.wait_for_selector("#steer[data-state=done]", timeout=120_000)
    assert page.locator("#reply-baseline").inner_text() not in ("", baseline)


def test_submit_a_job_and_watch_it_finish(page, live, tiny_llama_dir) -> None:
    page.goto(live["url"] + "/jobs")
    page.fill("#job-form input[name=layer]", "-1")
    page.click("#job-form button[type=submit]")
    page.locator(".field-error[data-field=layer]").wait_for()
    form = page.locator("#job-form")
    form.locator("input[name=model]").fill(str(tiny_llama_dir))
    form.locator("input[name=layer]").fill("1")
    form.locator("input[name=tokens]").fill("16384")
    form.locator("input[name=latents]").fill("128")
    form.locator("input[name=k]").fill("8")
    form.locator("button[type=submit]").click()
    page.wait_for_url("**/jobs/*")
    page.locator(".progress").first.wait_for()
    page.wait_for_selector("#live:is([data-state=succeeded], [data-state=failed], "
                           "[data-state=cancelled])", timeout=240_000)
    assert page.locator("#job-state").inner_text() == "succeeded", page.locator(
        "#live").inner_text()
    assert page.get_by_role("link", name="open the SAE").is_visible()
    _shot(page, "job")
    page.get_by_role("link", name="open the SAE").click()
    page.wait_for_url("**/saes/*")
    assert page.locator("#latent-list tbody tr").count() >= 50


def test_offline_labels_and_their_scores_show(page, live) -> None:
    """Every live latent labelled offline, each score shown with its sample size."""
    from typer.testing import CliRunner

    from app.cli import app

    result = CliRunner().invoke(app, ["explain", str(live["sae_id"]), "--explainer",
                                      "maxact", "--latents", "0-40", "--now"],
                                env=live["env"])
    assert result.exit_code == 0, result.output
    page.goto(f"{live['url']}/saes/{live['sae_id']}")
    labels = page.locator("#latent-list tbody tr:not(.more) td:nth-child(2)")
    assert labels.nth(5).inner_text().strip(), "a live latent without a label"
    assert page.locator("#latent-list .snippet .tok.peak").count() >= 40
    page.locator("#latent-list a", has_text="7").first.click()
    page.wait_for_url("**/features/7")
    table = page.locator("#explanations")
    assert maxact.VERSION in table.inner_text() and "(n=" in table.inner_text()
    assert "Steerability not measured" in page.locator("#steerability").inner_text()
    _shot(page, "feature-scored")
    page.goto(f"{live['url']}/docs")
    page.locator(".swagger-ui .opblock").first.wait_for(timeout=30_000)
    _shot(page, "api-docs")


def test_feature_map_compare_lists_and_sweep(page, live, embedded_sae) -> None:
    from app.store.db import open_store
    from app.store.persist import save_feature_map
    from training.analysis.feature_map import decoder_map
    from training.sae.folder import load_sae

    sessions = open_store(live["env"]["SAELAB_DATABASE_URL"])
    save_feature_map(sessions, live["sae_id"], decoder_map(load_sae(embedded_sae["sae"])[0].w_dec))
    sessions.kw["bind"].dispose()
    page.goto(f"{live['url']}/saes/{live['sae_id']}/map")
    page.wait_for_selector("#feature-map[data-state=drawn]", timeout=60_000)
    assert page.locator("#feature-map canvas").count() >= 1
    assert page.locator("#map-count").inner_text() == "1024 latents"
    page.fill("#map-search", "punctuation")
    page.wait_for_function("document.getElementById('map-count').textContent.includes('1 of')")
    _shot(page, "feature-map")

    page.goto(f"{live['url']}/compare?a={live['sae_id']}&b={live['sae_id']}")
    assert "0.0%" in page.locator("#compare-summary").inner_text()  # an SAE matches itself
    page.locator("#compare-rows tbody tr").first.wait_for()
    _shot(page, "compare")

    page.goto(f"{live['url']}/lists")
    page.fill("#new-list input[name=name]", "first look")
    page.click("#new-list button[type=submit]")
    page.wait_for_url("**/lists/*")
    page.goto(f"{live['url']}/saes/{live['sae_id']}/features/3")
    page.click("#add-to-list-link")
    page.fill("#add-to-list input[name=note]", "worth a second look")
    page.click("#add-to-list button[type=submit]")
    page.wait_for_url("**/lists/*")
    assert "worth a second look" in page.locator("#list-items").inner_text()
    _shot(page, "list")

    page.goto(f"{live['url']}/steer/sweep?sae={live['sae_id']}&feature=3&strengths=0,4,16")
    page.fill("#sweep-form input[name=max_tokens]", "12")
    page.click("#sweep-send")
    page.wait_for_selector("#sweep-columns[data-state=done]", timeout=120_000)
    replies = page.locator("#sweep-columns pre.reply").all_inner_texts()
    assert len(replies) == 3 and all(replies) and len(set(replies)) > 1
    _shot(page, "sweep")
