"""The interactive view in a real browser (headless Chromium through Selenium), from ``file://``.

Each test loads a page, moves the layer slider with the keyboard, hovers or clicks a token or a
heat-map cell, reads what the page shows and compares it with ``sinks.json`` (or the effect), and
saves a screenshot under the test's tmp folder. Render times come from the page's own
``performance.now()`` marks (``window.sinkscope.timings``) and are recorded as test properties,
never asserted: speed is a benchmark figure (BENCHMARKS.md), not a property a loaded machine keeps.

Without Chromium, chromedriver or selenium the tests skip with one line saying how to get them;
``SINKSCOPE_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns that skip into a failure, so CI cannot
pass without having run them.
"""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from circuits.output import write_json
from circuits.view import write_view
from sinkscope.cli import main
from sinkscope.jobs import sinks_document
from synthetic import synthetic

pytestmark = pytest.mark.browser

HINT = "no headless browser: apt-get install chromium chromium-driver (Debian) and pip install selenium"


def _unavailable(why: str):
    if os.environ.get("SINKSCOPE_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{why}; SINKSCOPE_REQUIRE_BROWSER=1 requires the browser tests to run")
    pytest.skip(f"{why} ({HINT})")


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver  # optional: a dev dependency, absent from a plain install
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        _unavailable("chromium or chromedriver is not on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))  # an explicit driver: Selenium Manager never runs
    yield driver
    driver.quit()


class Page:
    """One loaded view, with the few reads and gestures the tests need."""

    def __init__(self, driver, path=None):
        """Load ``path``; without one, use the document the driver is on (an iframe it switched to)."""
        from selenium.webdriver.common.by import By  # optional: see the browser fixture

        self.d, self.By = driver, By
        if path is not None:
            driver.get(path.resolve().as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        self.timings = self.js("return window.sinkscope.timings")

    def js(self, script, *args):
        return self.d.execute_script(script, *args)

    def find(self, css):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def text(self, css):
        return self.find(css).text

    def token(self, k):
        return self.find(f'#text span[data-k="{k}"]')

    def slide(self, *keys):
        slider = self.find("#layer")
        slider.send_keys(*keys)
        return int(self.text("#layer-value"))

    def hover(self, element):
        from selenium.webdriver.common.action_chains import ActionChains  # optional: see the browser fixture

        ActionChains(self.d).move_to_element(element).perform()

    def click_heat(self, layer, position):
        """Click the middle of the heat-map cell of (layer, position)."""
        from selenium.webdriver.common.action_chains import ActionChains  # optional: see the browser fixture

        canvas = self.find("#heat")
        w, h = canvas.size["width"], canvas.size["height"]
        n, n_layers = self.js("return window.sinkscope.data.sequences[window.sinkscope.state.seq].tokens.length"), self.js(
            "return window.sinkscope.data.n_layers")
        x, y = (position + 0.5) / n * w, (layer + 0.5) / n_layers * h
        ActionChains(self.d).move_to_element_with_offset(canvas, int(x - w / 2), int(y - h / 2)).click().perform()

    def shot(self, path):
        self.d.save_screenshot(str(path))
        assert path.stat().st_size > 10_000
        return path


def _close(shown: str, truth: float) -> bool:
    return abs(float(shown) - truth) <= 5e-4 * abs(truth) + 1e-9


def _measurement_folder(tmp_path, meas):
    folder = tmp_path / "out"
    folder.mkdir()
    doc = sinks_document(meas)
    write_json(folder / "sinks.json", doc)
    write_view(meas, folder)
    return folder, json.loads((folder / "sinks.json").read_text())


def _check_token(page, doc, layer, k, run="measurement"):
    """The detail of token k at ``layer`` against sinks.json (one sequence: its means are its values)."""
    assert page.text("#d-pos") == str(k)
    assert _close(page.text(f'#d-values [data-field="score"][data-run="{run}"]'), doc["sink_score"][layer][k])
    alpha = json.loads(page.find("#d-alpha").get_attribute("data-values"))
    np.testing.assert_allclose(alpha, [doc["alpha"][layer][h][k] for h in range(doc["n_heads"])], rtol=5e-4)


def test_slider_hover_and_heat_map_show_the_numbers_of_sinks_json(browser, tmp_path, record_property):
    folder, doc = _measurement_folder(tmp_path, synthetic((64,), secondary=(5,)))
    page = Page(browser, folder / "view.html")
    assert page.js("return performance.getEntriesByType('resource').length") == 0, "the page fetches nothing"
    assert page.token(0).get_attribute("class") == "primary", "the first token is marked as the primary sink"
    assert "secondary" in page.token(5).get_attribute("class")

    from selenium.webdriver.common.keys import Keys  # optional: see the browser fixture

    assert page.slide(Keys.HOME) == 0
    assert page.slide(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT) == 4
    status = page.text("#status")
    assert status.startswith("Layer 4, first token (primary sink): sink score ")
    page.hover(page.token(5))
    _check_token(page, doc, 4, 5)
    (row,) = [r for r in doc["secondary"] if r["position"] == 5]
    for field in ("kind", "start_layer", "lifetime"):
        assert page.text(f'#d-secondary [data-field="{field}"]') == str(row[field])
    assert page.token(5).value_of_css_property("background-color") != page.token(1).value_of_css_property("background-color")
    points = page.find('#d-line polyline[data-run="measurement"]').get_attribute("points").split()
    assert len(points) == doc["n_layers"], "the line has the token's score at every layer"

    page.click_heat(layer=12, position=20)  # a heat-map cell selects its layer and token
    assert page.text("#layer-value") == "12" and page.js("return window.sinkscope.state.pinned") == 20
    page.hover(page.find("#status"))  # leave the text: the pinned token stays
    _check_token(page, doc, 12, 20)
    assert "sel" in page.token(20).get_attribute("class")
    page.shot(tmp_path / "view.png")
    record_property("load_ms_64_tokens", round(page.timings["load_ms"]))


def test_8k_tokens_load_and_move_the_slider_fast(browser, tmp_path, record_property):
    meas = synthetic((8192,), secondary=(5, 4000))
    path = write_view(meas, tmp_path)
    page = Page(browser, path)

    from selenium.webdriver.common.keys import Keys  # optional: see the browser fixture

    for _ in range(6):
        page.slide(Keys.ARROW_RIGHT)
    timings = page.js("return window.sinkscope.timings")
    updates = timings["update_ms"][1:]  # the first is the initial render
    assert len(updates) == 6
    assert len(page.d.find_elements(page.By.CSS_SELECTOR, "#text span")) == 1024, "only a window of tokens is in the page"
    page.click_heat(layer=5, position=4000)  # the window follows the heat map
    pinned, per_pixel = page.js("return [window.sinkscope.state.pinned, 8192 / document.getElementById('heat').width]")
    assert abs(pinned - 4000) <= 2 * per_pixel, "a pixel column stands for several positions: the click picks its largest"
    assert page.token(pinned).is_displayed()
    page.shot(tmp_path / "view-8k.png")
    record_property("view_bytes_8k", path.stat().st_size)
    record_property("load_ms_8k", round(timings["load_ms"]))
    record_property("slider_update_ms_8k_max", round(max(updates), 1))
    print(f"8k tokens: {path.stat().st_size / 1e6:.2f} MB, load {timings['load_ms']:.0f} ms "
          f"(script {timings['init_ms']:.0f} ms, JSON parse {timings['parse_ms']:.0f} ms), slider update max {max(updates):.1f} ms")
    assert timings["load_ms"] > 0 and all(u >= 0 for u in updates), "the page recorded its own timings"


def test_the_effect_view_switches_between_clean_intervened_and_delta(browser, tmp_path):
    clean = synthetic((30,), secondary=())
    intervened = synthetic((30,), secondary=(12,), seed=1)
    effect = SimpleNamespace(clean=clean, intervened=intervened, spec="isolate:layers=0-3,queries=12", metadata={},
                             target=SimpleNamespace(to_dict=lambda: {"layers": [0, 1, 2, 3], "positions": [12], "rule": "r"}))
    page = Page(browser, write_view(effect, tmp_path))
    assert "target: layers 0-3, positions 12" in page.text("#subtitle")
    assert "target" in page.token(12).get_attribute("class")
    before = page.token(12).value_of_css_property("background-color")
    page.find("#run-delta").click()
    assert page.token(12).value_of_css_property("background-color") != before
    page.hover(page.token(12))
    layer = int(page.text("#layer-value"))
    c, v = clean.sink_score[0, layer, 12], intervened.sink_score[0, layer, 12]
    assert _close(page.text('#d-values [data-field="score"][data-run="clean"]'), c)
    assert _close(page.text('#d-values [data-field="score"][data-run="intervened"]'), v)
    assert abs(float(page.text('#d-values [data-field="score"][data-run="delta"]')) - (v - c)) < 1e-3 * abs(v - c) + 1e-6
    assert page.text('#d-secondary [data-field="kind"][data-run="intervened"]') == "secondary"
    page.shot(tmp_path / "effect-delta.png")


@pytest.mark.real
def test_smollm2_measure_out_view_matches_its_sinks_json(browser, tmp_path):
    out = tmp_path / "out"
    text = ("The cat sat on the mat. It was warm, and the dog barked at the door. "
            "Then the rain began, and the children ran inside to the kitchen.")
    assert main(["measure", "--model", "smollm2-135m", "--text", text, "--out", str(out)]) == 0
    doc = json.loads((out / "sinks.json").read_text())
    page = Page(browser, out / "view.html")

    from selenium.webdriver.common.keys import Keys  # optional: see the browser fixture

    layer = page.slide(Keys.HOME, *[Keys.ARROW_RIGHT] * 6)
    assert layer == 6
    for k in (0, 4, 9):
        page.hover(page.token(k))
        _check_token(page, doc, layer, k)
    assert page.token(0).get_attribute("class").startswith("primary")
    for row in doc["secondary"]:  # the page marks the same secondary sinks as sinks.json
        assert "secondary" in page.token(row["position"]).get_attribute("class")
    page.shot(tmp_path / "smollm2.png")


def test_the_jupyter_output_runs_in_its_sandboxed_iframe(browser, tmp_path):
    from circuits.view import view

    v = view(synthetic((40,), secondary=(5,)))
    host = tmp_path / "notebook.html"  # what a notebook front end puts in the page: the cell's text/html output
    host.write_text(f"<!DOCTYPE html><html><body><p>Out[1]:</p>{v._repr_html_()}</body></html>", encoding="utf-8")
    browser.get(host.as_uri())
    browser.switch_to.frame(browser.find_element("css selector", "iframe"))
    try:
        page = Page(browser)
        assert page.text("#status").startswith("Layer ")
        page.hover(page.token(5))
        assert page.text("#d-pos") == "5" and page.text('#d-secondary [data-field="kind"]') == "secondary"
        assert page.js("return performance.getEntriesByType('resource').length") == 0
    finally:
        browser.switch_to.default_content()
