"""A real browser (Debian's Chromium, driven by Playwright) uses the app like a person would."""

import os
import re
import shutil

import pytest

import app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        pytest.fail("chromium is missing: .ci/run installs it with apt-get", pytrace=False)
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def browser_page():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        yield page
        browser.close()


def test_classify_and_text_search_in_a_real_browser(demo_library, launch_app, browser_page, tmp_path):
    library = demo_library
    url = launch_app(library)
    page = browser_page
    page.goto(url)
    page.get_by_role("tab", name="Classify").wait_for()

    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "images" / "coffee.png"))
    page.get_by_role("button", name="Classify", exact=True).click()
    top_label = page.locator("[data-testid=label-output-value]")
    top_label.wait_for(timeout=30_000)
    rows = page.locator("button.confidence-set")
    assert rows.count() == 5  # the top five of the ten default labels
    shown = [rows.nth(i).locator("dt").inner_text() for i in range(5)]
    percentages = [rows.nth(i).locator("dd").inner_text() for i in range(5)]
    assert set(shown) <= set(app.parse_labels(app.DEFAULT_LABELS)) and shown[0] == top_label.inner_text()
    assert all(p.endswith("%") for p in percentages)
    assert int(percentages[0][:-1]) >= int(percentages[-1][:-1])
    page.get_by_text("Already in the library as").wait_for(timeout=10_000)
    page.screenshot(path=str(tmp_path / "classify.png"))

    page.get_by_role("tab", name="Text search").click()
    query = page.get_by_label("Query (English)")
    query.fill("a rocket at night")
    query.press("Enter")
    images = page.locator(".gallery-item img, [data-testid=gallery] img, button.thumbnail-item img")
    images.first.wait_for(timeout=30_000)
    assert images.count() >= 4
    page_text = page.inner_text("body")
    assert all(name in page_text for name in library.files)  # captions: score · file name
    assert re.search(r"\d\.\d{3} · ", page_text)
    page.screenshot(path=str(tmp_path / "search.png"))
    shots = os.environ.get("SCREENSHOT_DIR")
    if shots:
        for name in ("classify.png", "search.png"):
            shutil.copy(tmp_path / name, os.path.join(shots, name))
