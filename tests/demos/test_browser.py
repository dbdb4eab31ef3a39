"""The LVLM demo in a real browser: headless Debian Chromium driven by Playwright.

Uses the system Chromium (``apt-get install -y chromium``) through ``executable_path``; Playwright's own browser
downloads are never used. A missing Chromium is a test failure with the install command, not a skip.
Assertions wait on visible page state (gradio's testing guidance), not on network calls.
"""

from __future__ import annotations

import os
import re

import pytest

from mmattn.demos.attention_map import HEATMAP_SIZE

# Opt-in (`pytest -m browser`): Chromium is a system package that `pip install -e ".[dev]"` cannot bring.
pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("MMATTN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]
RUN_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not os.path.isfile(CHROMIUM):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y "
                    "chromium` (or set MMATTN_CHROMIUM to its path)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ModuleNotFoundError:
        pytest.fail("the Playwright Python package is missing: pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def test_lvlm_demo_compares_in_the_browser(browser, lvlm_server, tmp_path):
    from playwright.sync_api import expect

    _, url = lvlm_server
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    run = page.locator("#run")
    expect(run).to_be_visible(timeout=60_000)

    # Ticking a method rewrites the spec box; then ask for a stronger setting than the slider defaults.
    page.get_by_label("RoleBias").check()
    spec = page.locator("#method-spec textarea")
    expect(spec).to_have_value(re.compile(r"role_bias"))
    spec.fill("role_bias:image=3\nvhr")
    run.click()

    baseline = page.locator("#baseline-answer textarea")
    patched = page.locator("#patched-answer textarea")
    heatmaps = [page.locator(f"#{key}-heatmap img") for key in ("baseline", "patched")]
    for heatmap in heatmaps:
        expect(heatmap).to_be_visible(timeout=RUN_TIMEOUT_MS)
    expect(page.locator("#patched-objects")).to_contain_text("Hallucinated objects", timeout=RUN_TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "lvlm_demo.png"), full_page=True)

    assert baseline.input_value().strip() and patched.input_value().strip()
    for heatmap in heatmaps:
        heatmap.evaluate("img => img.decode()")  # wait until the PNG is decoded
        assert heatmap.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [HEATMAP_SIZE, HEATMAP_SIZE]
    expect(page.locator("#baseline-objects")).to_contain_text("ground truth")
    assert "Traceback" not in page.content()
    page.close()


def test_a_non_image_upload_gets_a_message_not_a_bare_error(browser, lvlm_server, tmp_path):
    """Gradio's own decoding would fail before the demo with a bare "Error"; the demo decodes and says why."""
    from playwright.sync_api import expect

    _, url = lvlm_server
    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#run")).to_be_visible(timeout=60_000)
    page.locator("#image input[type=file]").set_input_files(str(fake))
    expect(page.locator("#example input")).to_have_value("")  # an upload replaces the example
    page.locator("#run").click()
    expect(page.get_by_text("the uploaded file is not an image this demo can read")).to_be_visible(timeout=60_000)
    page.close()
