"""`axguard diagnose --html/--png` against the real server; the page driven in Chromium."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from axguard.cli import main
from conftest import EXAMPLES


@pytest.fixture(scope="module")
def viewer_files(demo_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer")
    code = main(["diagnose", str(EXAMPLES / "digit_3.png"), "--target", demo_server.target,
                 "--html", str(out / "gax.html"), "--png", str(out / "gax.png"),
                 "--snapshot-every", "5"])
    assert code == 0
    return out


def test_png_figure_is_written(viewer_files):
    with Image.open(viewer_files / "gax.png") as image:
        assert image.width > 1000 and image.height > 200


@pytest.mark.system
def test_slider_changes_the_displayed_step_and_co(viewer_files):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: `make test` installs it"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((viewer_files / "gax.html").as_uri())
            last_step = page.inner_text("#step-label")
            last_co = page.inner_text("#co-label")
            assert last_step.startswith("step ") and int(last_step.split()[1]) > 0
            assert "/ target" in last_co
            assert page.locator("canvas").count() == 4  # R, G, B and the input image
            captions = page.locator(".panel div").all_inner_texts()
            assert captions[0].startswith("R |max| = ") and captions[3] == "input image"
            page.focus("#slider")
            page.keyboard.press("Home")  # a user dragging the slider to the start
            first_step = page.inner_text("#step-label")
            first_co = page.inner_text("#co-label")
            assert first_step == "step 0"
            assert first_co != last_co
            page.keyboard.press("ArrowRight")
            assert page.inner_text("#step-label") == "step 5"
            marker_x = page.get_attribute("#marker", "cx")
            page.keyboard.press("End")
            assert page.inner_text("#step-label") == last_step
            assert page.get_attribute("#marker", "cx") != marker_x
            # the heatmap canvases hold colour, not a blank image
            coloured = page.evaluate("""() => {
                const c = document.querySelector('canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 2]) n++;
                return n; }""")
            assert coloured > 50
            assert errors == []
        finally:
            browser.close()
