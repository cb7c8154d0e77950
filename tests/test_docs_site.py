"""The documentation site builds with no warning, and its pages load in a browser with no console error.

The build is `make docs`' (``sphinx-build -E -W --keep-going -n``: a warning or a cross-reference
without a target fails it), into a temporary folder, offline; about a minute on two cores. The
browser test opens the landing page, an API page, a notebook page and the view page (which
embeds two live views) from ``file://`` in headless Chromium and reads the console.

Without Sphinx and its extensions (``pip install -e '.[docs]'``) the tests skip with that line;
``SINKSCOPE_REQUIRE_DOCS=1`` turns the skip into a failure. The browser is the view tests' fixture
(``tests/test_view_browser.py``), with the same skip and ``SINKSCOPE_REQUIRE_BROWSER``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import ROOT
from test_view_browser import browser  # noqa: F401 - the fixture: one way to start Chromium in the suite

pytestmark = pytest.mark.slow

EXTENSIONS = ("sphinx", "myst_parser", "myst_nb", "furo")
PAGES = {
    "index.html": "sinkscope",
    "api/generated/circuits.measure.html": "circuits.measure",
    "notebooks/wong_secondary_sinks.html": "Secondary Attention Sinks",
    "view.html": "The interactive view",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    missing = [name for name in EXTENSIONS if importlib.util.find_spec(name) is None]
    if missing:
        why = f"the documentation tools are not installed ({', '.join(missing)}): pip install -e '.[docs]'"
        if os.environ.get("SINKSCOPE_REQUIRE_DOCS") == "1":
            pytest.fail(f"{why}; SINKSCOPE_REQUIRE_DOCS=1 requires the site to be built")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "--keep-going", "-n", "-q", str(ROOT / "docs"), str(out / "html"),
         "-d", str(out / "doctrees")],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    return done, out / "html"


def test_the_site_builds_with_no_warning(site):
    done, html = site
    assert done.returncode == 0 and "WARNING" not in done.stderr and "ERROR" not in done.stderr, done.stderr[-5000:]
    for page in PAGES:
        assert (html / page).is_file(), page
    assert (html / "_static" / "views" / "measure.html").is_file(), "the view page embeds a live view"


@pytest.mark.browser
def test_pages_load_with_no_console_error(site, browser):  # noqa: F811 - the imported fixture
    from selenium.webdriver.common.by import By  # optional: a dev dependency, as in test_view_browser

    _, html = site
    browser.get_log("browser")  # drop what earlier pages logged
    for page, title in PAGES.items():
        browser.get((html / page).resolve().as_uri())
        assert title in browser.find_element(By.TAG_NAME, "h1").text, page
        if page == "view.html":  # the embedded views ran their script
            frame = browser.find_element(By.TAG_NAME, "iframe")
            browser.switch_to.frame(frame)
            assert browser.execute_script("return window.sinkscope.data.n_layers") == 30
            browser.switch_to.default_content()
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, f"{page}: {errors}"
