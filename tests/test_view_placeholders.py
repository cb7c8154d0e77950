"""The view shows whatever text it is given as text: no user text reaches a template placeholder,
and a token that holds part of a UTF-8 character reads as its bytes and the character they make.

Placeholders: ``circuits.view.render_html`` fills ``__CSS__``, ``__JS__``, ``__TITLE__`` and
``__DATA__`` in one pass, so a model folder named ``m__DATA__`` or a spec holding ``__TITLE__``
stays text (before, the title was filled first and the data JSON landed in ``<title>``: an empty
page). Partial characters: byte-level tokenizers split an emoji or a Hebrew letter over tokens;
:mod:`circuits.probes` writes the bytes that do not decode as ``\\xHH`` (never U+FFFD), and the page
merges them back in the sequence selector and names the character in the detail panel.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from types import SimpleNamespace

import pytest

from circuits.model_info import ModelInfo
from circuits.probes import tokenize
from circuits.view import _asset, merged_text, partial_chars, view
from synthetic import synthetic

PLACEHOLDERS = ("__DATA__", "__TITLE__", "__CSS__", "__JS__")


def embedded(page: str) -> dict:
    m = re.search(r'<script id="sinkscope-data" type="application/json">(.*?)</script>', page, re.S)
    assert m, "the page must carry its data in one JSON script block"
    return json.loads(m.group(1))


def _hostile_measurement(model: str):
    meas = synthetic((8, 6), secondary=(), model=model)
    meas.tokens[0][1] = " ".join(PLACEHOLDERS)
    meas.tokens[1][2] = "__DATA__</script>"
    return meas


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_a_model_name_holding_a_placeholder_stays_text(placeholder):
    meas = _hostile_measurement(f"m{placeholder}")
    v = view(meas)
    page = v.html
    assert embedded(page) == json.loads(json.dumps(v.data)), "the data block is the data, whole"
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert html.unescape(title) == f"m{placeholder}: attention sinks"
    assert page.count(_asset("view.js")) == 1 and page.count(_asset("view.css")) == 1
    assert page.count("<script") == 2 and page.count("</script>") == 2
    markup = page.split('<script id="sinkscope-data"')[0].split("</style>")[1]
    assert f'<h1 id="title">{html.escape(v.data["title"])}</h1>' in markup
    assert not re.search(r"__(CSS|JS|TITLE|DATA)__", markup.replace(html.escape(v.data["title"]), "")), \
        "every placeholder of the template is filled"


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_an_effect_spec_holding_a_placeholder_stays_text(placeholder):
    clean = _hostile_measurement("tiny")
    effect = SimpleNamespace(clean=clean, intervened=clean, spec=f"ablate-mlp:layer=1 {placeholder}", target=None,
                             summary={})
    v = view(effect)
    data = embedded(v.html)
    assert data["effect"]["spec"] == f"ablate-mlp:layer=1 {placeholder}" and data["title"] == f"tiny: ablate-mlp:layer=1 {placeholder}"
    assert data == json.loads(json.dumps(v.data))


def test_a_title_that_is_all_placeholders_stays_text():
    v = view(synthetic((6,)), title="__TITLE____DATA__ __JS__<b>")
    page = v.html
    assert "<title>__TITLE____DATA__ __JS__&lt;b&gt;</title>" in page
    assert embedded(page)["title"] == "__TITLE____DATA__ __JS__<b>"


# --------------------------------------------------------------------------- partial UTF-8 characters


def test_bytes_of_split_characters_are_merged_back_by_hand():
    tokens = ["I", " \\xf0\\x9f\\x98", "\\x80", " love", " \\xd7", "\\xa9", "ל", "\\xff", "x"]
    assert merged_text(tokens) == "I 😀 love של\\xffx"
    assert partial_chars(tokens) == {1: "😀", 2: "😀", 4: "ש", 5: "ש"}  # a stray byte makes no character
    # bytes separated by other text are not joined
    assert partial_chars(["\\xf0\\x9f", "a", "\\x98\\x80"]) == {}


def test_a_byte_tokenizer_shows_bytes_never_the_replacement_character(llama):
    batch = tokenize(llama, ["I 😀 שלום", "plain text"])
    tokens = batch.str_tokens[0]
    assert tokens[:6] == ["I", " ", "\\xf0", "\\x9f", "\\x98", "\\x80"]
    assert all("\ufffd" not in t for seq in batch.str_tokens for t in seq)
    assert merged_text(tokens) == "I 😀 שלום"


def test_the_view_merges_them_in_the_selector_and_names_them_per_token(llama):
    from circuits.measure import measure

    meas = measure(llama, tokenize(llama, ["I 😀 love", "שלום x"]), progress=False)
    data = view(meas).data
    first, second = data["sequences"]
    assert first["label"] == "I 😀 love" and second["label"] == "שלום x"
    assert first["chars"] == {"2": "😀", "3": "😀", "4": "😀", "5": "😀"}
    assert second["chars"] == {str(k): c for k, c in enumerate("ששללווםם")}
    assert first["tokens"][2] == "\\xf0"


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_the_packaged_tokenizers_show_emoji_and_right_to_left_text_readably(name):
    """The real tokenizers (read from the cache, no model loaded): no token reads as U+FFFD, and
    the tokens merge back into the text."""
    from circuits import models

    folder = models.cache_root() / name
    if models._cache_problem(folder) is not None:
        pytest.skip(f"the {name} cache is not built here")
    tok = models._cached_tokenizer(folder)
    stub = SimpleNamespace(tokenizer=tok, cfg=SimpleNamespace(n_ctx=1024, d_vocab=len(tok) + 1024),
                           _sinkscope_info=ModelInfo(name="stub", source="a stub", native_bos=False))
    text = "I 😀 love 🦜 שלום مرحبا 𝔘 ẞ"
    tokens = tokenize(stub, text).str_tokens[0]
    assert all("\ufffd" not in t for t in tokens), tokens
    assert merged_text(tokens) == text
    if name != "gemma3-270m":  # its vocabulary holds these emoji whole; the byte-level ones split them
        assert any(partial_chars(tokens).values())


# --------------------------------------------------------------------------- in a browser


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver  # optional: a dev dependency, absent from a plain install
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not binary or not shutil.which("chromedriver"):
        pytest.skip("chromium or chromedriver is not on PATH")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    yield driver
    driver.quit()


@pytest.mark.browser
def test_in_a_browser_the_page_of_m_data_renders_and_shows_split_characters(browser, llama, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains  # optional: see the browser fixture
    from selenium.webdriver.common.by import By  # optional: see the browser fixture

    from circuits.measure import measure

    meas = measure(llama, tokenize(llama, ["I 😀 __DATA__", "שלום __TITLE__"]), progress=False)
    meas.model = "m__DATA__"
    path = view(meas).save(tmp_path / "view.html")
    browser.get(path.resolve().as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    assert browser.title == "m__DATA__: attention sinks"
    assert browser.find_element(By.ID, "title").text == "m__DATA__: attention sinks"
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#seq option")]
    assert options == ["0: I 😀 __DATA__ (15 tokens)", "1: שלום __TITLE__ (18 tokens)"]
    span = browser.find_element(By.CSS_SELECTOR, '#text span[data-k="3"]')
    assert span.text == "\\x9f" and span.get_attribute("title") == "UTF-8 bytes of \u201c😀\u201d"
    ActionChains(browser).move_to_element(span).perform()
    assert browser.find_element(By.ID, "d-token").text == '"\\x9f"'
    badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, "#d-badges .badge")]
    assert "UTF-8 bytes of \u201c😀\u201d" in badges
    browser.save_screenshot(str(tmp_path / "split-characters.png"))
