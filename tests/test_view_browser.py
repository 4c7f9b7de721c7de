"""`smcli view` in a real browser: headless Chromium (the Debian package) driven by Playwright.

One server (a subprocess, as a user runs it) and one browser serve every test here. Skipped when
/usr/bin/chromium or Playwright is absent; .ci/run installs both in its full venv and checks.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.view_support import GLASS, TISSUE, patch_coords, write_slide, write_table

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        "real-browser tests need /usr/bin/chromium (apt-get install chromium)", allow_module_level=True
    )

# the torch-free CI venv has Chromium but no Playwright; the full venv has both (.ci/run checks)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed in this venv")
sync_playwright = sync_api.sync_playwright

REFUSED_NAME = "rebind.example"  # resolves to 127.0.0.1 inside the browser: a DNS-rebinding attempt


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    coords = patch_coords()
    (folder / "sm").mkdir()
    (folder / "abmil").mkdir()
    return {
        "slide": write_slide(folder / "slide_a.tiff", coords),
        "sm": write_table(folder / "sm" / "slide_a.csv", coords, seed=1),
        "abmil": write_table(folder / "abmil" / "slide_a.csv", coords, seed=2),
        "tables": [folder / "sm" / "slide_a.csv", folder / "abmil" / "slide_a.csv"],
    }


@pytest.fixture(scope="module")
def url(files):
    command = [sys.executable, "-m", "smcli", "view", *map(str, files["tables"])]
    command += ["--slide", str(files["slide"]), "--no-browser"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    yield first
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert process.returncode == 0


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--no-sandbox", f"--host-resolver-rules=MAP {REFUSED_NAME} 127.0.0.1"],
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 700})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors


def wait_for(page, expression: str, timeout: float = 30.0):
    """Poll a JavaScript expression until truthy (the page's CSP forbids Playwright's
    wait_for_function, which evaluates strings)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = page.evaluate(expression)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {expression}")


def settle(page):
    """Wait until every layer is drawn and the view stopped moving."""
    wait_for(page, "window.smcliView && window.smcliView.loaded()")
    time.sleep(0.8)  # OpenSeadragon's animation (0.5 s) ends
    wait_for(page, "window.smcliView.loaded()")


def pixels(page, selector="#view-a .osd") -> np.ndarray:
    from io import BytesIO

    from PIL import Image

    return np.asarray(Image.open(BytesIO(page.locator(selector).screenshot())).convert("RGB")).astype(int)


def near(image: np.ndarray, colour, tolerance: int = 10) -> np.ndarray:
    return np.abs(image - np.asarray(colour)).max(axis=2) <= tolerance


def view_state(page, panel: int = 0) -> dict:
    return page.evaluate(
        f"""(() => {{ const v = window.smcliView.panels[{panel}].viewer.viewport;
        const c = v.getCenter(true); return {{x: c.x, y: c.y, zoom: v.getZoom(true)}}; }})()"""
    )


def test_page_shows_tissue_and_attention_and_the_slider_changes_them(page, url):
    page.goto(url + "#opacity=70")
    settle(page)
    shown = pixels(page)
    glass = near(shown, GLASS, 6)
    assert glass.mean() > 0.2  # the slide's glass around the tissue
    coloured = ~glass & ~near(shown, (255, 255, 255), 3)
    assert coloured.mean() > 0.1
    assert near(shown, TISSUE, 8)[coloured].mean() < 0.2  # tissue under attention colours

    slider = page.locator("#opacity")
    slider.focus()
    page.keyboard.press("Home")  # opacity 0: the slide alone
    assert page.locator("#opacity-value").inner_text() == "0 %"
    time.sleep(0.3)
    bare = pixels(page)
    assert near(bare, TISSUE, 12)[coloured].mean() > 0.9  # the tissue, as scanned
    assert np.abs(bare - shown)[coloured].mean() > 20


def test_top_patch_click_moves_the_view_and_hover_shows_the_tables_numbers(page, url, files):
    page.goto(url)
    settle(page)
    before = view_state(page)
    page.locator("#top li").first.click()
    settle(page)
    after = view_state(page)
    assert after["zoom"] > 2 * before["zoom"]
    assert (after["x"], after["y"]) != (before["x"], before["y"])

    box = page.locator("#view-a .osd").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)  # the view is centred on it
    wait_for(page, "document.querySelector('#hover tbody tr') !== null")
    shown = {
        row.get_attribute("data-name"): row.locator("td").nth(1).inner_text()
        for row in page.locator("#hover tbody tr").all()
    }
    table = files["sm"]
    top = table.loc[table.attention_logit.idxmax()]
    assert int(shown["instance"]) == top.instance
    assert (int(shown["x"]), int(shown["y"])) == (top.x, top.y)
    assert float(shown["attention_logit"]) == top.attention_logit
    assert float(shown["attention_weight"]) == top.attention_weight
    assert int(shown["label"]) == top.label
    assert float(shown["attention_percentile"]) == 100


def test_two_tables_side_by_side_stay_linked(page, url):
    page.goto(url + "#bag=0&compare=1")
    settle(page)
    assert page.locator("#view-b").is_visible()
    assert "abmil/slide_a.csv" in page.locator("#view-b .caption").inner_text()
    box = page.locator("#view-a .osd").bounding_box()
    start = view_state(page, 0)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -600)  # zoom in on panel A
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2 - 120, box["y"] + box["height"] / 2 - 60, steps=8)
    page.mouse.up()
    settle(page)
    left, right = view_state(page, 0), view_state(page, 1)
    assert left["zoom"] > start["zoom"]
    assert right["zoom"] == pytest.approx(left["zoom"], rel=1e-6)
    assert (right["x"], right["y"]) == pytest.approx((left["x"], left["y"]), abs=1e-6)
    assert not np.array_equal(pixels(page, "#view-a .osd"), pixels(page, "#view-b .osd"))  # two tables


def test_the_browser_is_refused_without_token_with_a_foreign_host_and_outside_the_routes(page, url):
    base, token = url.split("?token=")
    assert page.goto(base).status == 403
    port = base.rsplit(":", 1)[1].rstrip("/")
    assert page.goto(f"http://{REFUSED_NAME}:{port}/?token={token}").status == 403
    assert page.goto(url).status == 200  # sets the cookie
    assert page.goto(base + "static/%2e%2e/server.py").status == 404
    assert page.goto(base + "static/viewer.js").status == 200  # the cookie stands in for the token


@pytest.fixture(scope="module")
def grid_url(files):
    command = [sys.executable, "-m", "smcli", "view", str(files["tables"][0]), "--no-browser"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    yield process.stdout.readline().strip()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)
    assert process.returncode == 0


def test_without_a_slide_the_grid_is_the_image_with_the_same_controls(page, grid_url):
    from smcli.heatmap import colour_map, lookup_table

    page.goto(grid_url)
    settle(page)
    shown = pixels(page)
    checker = near(shown, (236, 236, 236), 2) | near(shown, (206, 206, 206), 2)
    assert checker.mean() > 0.05  # "no patch": the corners of the bag's bounding box
    top_colour = lookup_table(colour_map("inferno"))[-1]
    assert near(shown, top_colour, 4).any()  # opaque colours on the grid: the top patch at 100 %
    page.select_option("#cmap", "viridis")
    settle(page)
    assert near(pixels(page), lookup_table(colour_map("viridis"))[-1], 4).any()
    assert "cmap=viridis" in page.evaluate("location.hash")
