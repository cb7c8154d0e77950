"""Rebuild the screenshots of the interactive view that README and the site show (docs/figures/view/*.png).

Measures smollm2-135m on 8 built-in passages (64 tokens) and one intervention on the first,
opens both views in headless Chromium from ``file://``, pins a secondary sink and saves a
screenshot of each. Needs chromium, chromium-driver and selenium (the dev extra); about 30 s.

    python scripts/view_screenshots.py
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

from circuits import anatomy  # noqa: E402
from circuits.measure import measure  # noqa: E402
from circuits.models import load_model  # noqa: E402
from circuits.probes import probe_texts, tokenize  # noqa: E402
from circuits.view import write_view  # noqa: E402
from interventions.effect import measure_effect  # noqa: E402

OUT = ROOT / "docs" / "figures" / "view"


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,760", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def shoot(driver, page: Path, png: Path, *, layer: int, position: int, run: str | None = None) -> None:
    driver.get(page.as_uri())
    if run:
        driver.find_element(By.ID, f"run-{run}").click()
    driver.execute_script("window.sinkscope.setLayer(arguments[0]); window.sinkscope.pin(arguments[1]);", layer, position)
    driver.save_screenshot(str(png))
    print(f"wrote {png.relative_to(ROOT)}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model = load_model("smollm2-135m")
    batch = tokenize(model, probe_texts(8), prepend_bos=False, max_tokens=64)
    meas = measure(model, batch, progress=False)
    sec = anatomy.secondary_sinks(meas.select([0]))
    position = int(sec["position"].iloc[0]) if len(sec) else 1
    layer = int(sec["peak_layer"].iloc[0]) if len(sec) else 5
    effect = measure_effect(model, batch.select([0]), f"isolate:layers=0-3,queries={position + 8}", n_resamples=0, progress=False)
    driver = browser()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shoot(driver, write_view(meas, Path(tmp)), OUT / "measure.png", layer=layer, position=position)
            Path(tmp, "view.html").unlink()
            shoot(driver, write_view(effect, Path(tmp)), OUT / "effect.png", layer=layer, position=position + 8, run="delta")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
