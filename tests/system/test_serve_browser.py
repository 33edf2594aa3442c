"""The clerk page end to end in a real headless Chromium (Debian's, driven by Playwright) against a real uvicorn:
type a request, see the suggestion, correct a field, submit, and find the correction in the export.

Skipped when /usr/bin/chromium is missing, unless SANSHI_REQUIRE_BROWSER=1 (as in CI), which fails. With
SANSHI_UPDATE_SCREENSHOT=1 the screenshot is also written to docs/clerk-page.png.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import httpx
import pytest

from serve.app import create_app
from tests.conftest import REPO
from tests.system.serve_support import API_KEY, LiveServer, make_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TITLE = "楼上邻居深夜噪音"
TEXT = "楼上邻居每天晚上十二点以后还在拖动家具、走路很重，吵得全家睡不着，上去沟通过两次都没有改善，电话13812345678。"


def save_small_png(source: Path, target: Path) -> None:
    """A palette PNG for the docs: a fraction of the size, and text stays sharp."""
    from PIL import Image

    target.parent.mkdir(exist_ok=True)
    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=96).save(target, optimize=True)


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} not found (scripts/system-deps.sh browser installs it)"
        if os.environ.get("SANSHI_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def test_a_clerk_gets_a_suggestion_corrects_it_and_the_correction_is_exported(chromium, demo_model_dir, tmp_path):
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'feedback.db'}"))
    with LiveServer(app) as server:
        page = chromium.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.goto(server.url + "/")
        page.get_by_test_id("model-status").filter(has_text="版本").wait_for()

        page.get_by_test_id("title").fill(TITLE)
        page.get_by_test_id("text").fill(TEXT)
        page.get_by_test_id("suggest").click()
        cards = page.get_by_test_id("card")
        cards.first.wait_for()
        assert cards.count() == 4
        suggestion = httpx.post(server.url + "/v1/suggest", json={"title": TITLE, "text": TEXT}).json()
        sanshi_card = page.locator('[data-target="sanshi"]')
        assert suggestion["fields"]["sanshi"]["label"] in sanshi_card.locator(".label").inner_text()
        colour = suggestion["fields"]["sanshi"]["sanshi"]["colour_hex"]
        border = sanshi_card.evaluate("el => getComputedStyle(el).borderLeftColor")
        assert border == "rgb({}, {}, {})".format(*(int(colour[i : i + 2], 16) for i in (1, 3, 5)))
        assert page.locator('[data-target="category"] .bar-fill').evaluate("el => el.style.width").endswith("%")
        assert page.locator('[data-target="sanshi"] .term').count() >= 1  # the reason terms are shown
        review_badges = page.locator(".card .badge.review:not([hidden])").count()
        assert review_badges == sum(f["needs_review"] for f in suggestion["fields"].values())

        # The clerk corrects the handling unit to one the model did not pick.
        suggested_unit = suggestion["fields"]["unit"]["label"]
        new_unit = "网格/人民调解" if suggested_unit != "网格/人民调解" else "社区居委会/村委会"
        page.get_by_test_id("choice-unit").select_option(new_unit)
        assert page.locator('[data-target="unit"] .badge.corrected').is_visible()

        # Without the key the server refuses, and the page says so.
        page.get_by_test_id("submit-feedback").click()
        page.get_by_test_id("message").filter(has_text="接口密钥").wait_for()
        page.get_by_test_id("api-key").fill(API_KEY)
        page.get_by_test_id("submit-feedback").click()
        page.get_by_test_id("message").filter(has_text="已保存").wait_for()
        assert "承办单位" in page.get_by_test_id("message").inner_text()

        screenshot = tmp_path / "clerk-page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        if os.environ.get("SANSHI_UPDATE_SCREENSHOT") == "1":
            save_small_png(screenshot, REPO / "docs" / "clerk-page.png")
        assert screenshot.stat().st_size > 10_000

        export = httpx.get(server.url + "/v1/feedback/export", headers={"X-API-Key": API_KEY})
        rows = list(csv.DictReader(io.StringIO(export.content.decode("utf-8-sig"))))
        page.close()
    assert len(rows) == 1
    row = rows[0]
    assert row["承办单位"] == new_unit and row["建议_承办单位"] == suggested_unit
    assert row["修改字段"] == "unit"
    assert row["三事"] == suggestion["fields"]["sanshi"]["label"]
    assert row["标题"] == TITLE and "13812345678" not in row["诉求内容"] and "PHONE" in row["诉求内容"]
    assert not [p for p in problems if "401" not in p], problems  # the refused submit logs a 401, nothing else


def test_the_api_docs_render_with_the_network_closed(chromium, demo_model_dir, tmp_path):
    """/docs (Swagger UI) and /redoc work on an intranet without internet access: every file they need comes from
    the server, nothing is asked of another host, and the Content-Security-Policy blocks nothing they do."""
    app = create_app(make_settings(demo_model_dir, f"sqlite:///{tmp_path / 'feedback.db'}"))
    with LiveServer(app) as server:
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        elsewhere: list[str] = []

        def only_the_server(route) -> None:  # the network is closed: only the server itself answers
            if route.request.url.startswith(server.url + "/"):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_server)
        page = context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)

        page.goto(server.url + "/docs")
        page.locator(".opblock").first.wait_for(timeout=20_000)
        assert page.locator(".opblock").count() >= 7  # every operation of the API
        assert "sanshi-ml intake server" in page.locator(".info .title").inner_text()

        page.goto(server.url + "/redoc")
        page.get_by_text("/v1/suggest/batch").first.wait_for(timeout=20_000)
        assert page.get_by_text("sanshi-ml intake server").count() >= 1
        context.close()
    assert not elsewhere, elsewhere
    # ReDoc 2.5 always tries to load its own logo from cdn.redoc.ly and hides it when that fails; the page's CSP
    # stops the request before it leaves the browser. Nothing else may be blocked or fail.
    logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
    assert not [p for p in problems if logo not in p], problems
