"""The training page (``/pipeline``) as users see it: in a real headless Chromium while a job trains.

The page loads without console errors or JavaScript exceptions, its six figures draw (a canvas
of nonzero size, every data source non-empty), and two looks one epoch apart show the figures
changing: more rounds in the loss plot, other pixels on its canvas, a new summary line. The
looks read the Bokeh document the browser holds (``Bokeh.documents`` and the views in
``Bokeh.index``), so they see what the browser received over the page's websocket, not what the
server meant to send.

Needs Chromium, its driver and Selenium; the test installs nothing and is skipped, with the
reason, without them. On Debian or Ubuntu: ``apt-get install chromium chromium-driver``.
Chromium starts headless with a fresh profile and every background service off; it only talks
to the dashboard on 127.0.0.1.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pipeline.config import TrainConfig
from pipeline.train import train

FIGURES = (
    "pipeline-loss",
    "pipeline-epochs",
    "pipeline-throughput",
    "pipeline-staleness",
    "pipeline-workers",
    "pipeline-time",
)
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER = ("chromedriver",)
APT = "apt-get install chromium chromium-driver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--window-size=1400,1000",
)

# Run before any script of the page: uncaught exceptions and rejected promises, kept on window.
CATCH_ERRORS = """
window.__pageErrors = [];
addEventListener("error", e => window.__pageErrors.push("exception: " + e.message));
addEventListener("unhandledrejection", e => window.__pageErrors.push("unhandled rejection: " + e.reason));
"""

# One look at the page: for each named figure its size on the page, its canvas, the rows of
# each renderer's data source and a hash of the canvas pixels; and the text of the summary.
LOOK = """
if (typeof Bokeh === "undefined" || Bokeh.documents.length === 0) return null;
const doc = Bokeh.documents[0];
function* walk(view) {
  yield view;
  for (const child of (view.child_views ?? [])) yield* walk(child);
}
function hash(text) {  // FNV-1a, enough to tell two images apart
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) h = Math.imul(h ^ text.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}
const figures = {};
for (const root of Object.values(Bokeh.index)) {
  for (const view of walk(root)) {
    const name = view.model.name;
    if (!name || !name.startsWith("pipeline-") || view.canvas_view === undefined) continue;
    const rect = view.el.getBoundingClientRect();
    const canvas = view.canvas_view.primary.canvas;
    figures[name] = {
      size: [rect.width, rect.height],
      canvas: [canvas.width, canvas.height],
      rows: view.model.renderers.map(r => r.data_source.get_length()),
      pixels: hash(canvas.toDataURL()),
    };
  }
}
const summary = [...doc.all_models].filter(m => m.type === "Div").map(m => m.text).join(" ");
return {figures: figures, summary: summary};
"""


def _find(names: tuple[str, ...]) -> str | None:
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, logging the page's console; skipped without one."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("Selenium is not installed; pip install -e '.[test]' installs it")
    chromium, driver_path = _find(CHROMIUM), _find(DRIVER)
    if chromium is None or driver_path is None:
        missing = "Chromium" if chromium is None else "chromedriver"
        pytest.skip(f"no {missing} on PATH; to run the browser test: {APT}")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=opts, service=Service(driver_path))
    except WebDriverException as exc:  # e.g. a snap wrapper in place of the browser
        first = (exc.msg or str(exc)).strip().splitlines()[0].split(";")[0]
        pytest.skip(f"{chromium} with {driver_path} does not start ({first}); to run the browser test: {APT}")
    try:
        driver.set_page_load_timeout(60)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ERRORS})
        yield driver
    finally:
        driver.quit()


def page_errors(driver: Any) -> list[str]:
    """Console errors and uncaught exceptions of the open page since the last call."""
    errors = [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    caught = driver.execute_script("const e = window.__pageErrors || []; window.__pageErrors = []; return e;")
    return errors + [str(e) for e in caught]


def look(driver: Any, until: Callable[[dict], bool], timeout: float = 60.0) -> tuple[dict | None, bool]:
    """Read the page until ``until(look)`` holds (True) or ``timeout`` passes (False, last look)."""
    deadline = time.monotonic() + timeout
    seen = None
    while True:
        seen = driver.execute_script(LOOK) or seen
        if seen is not None and until(seen):
            return seen, True
        if time.monotonic() > deadline:
            return seen, False
        time.sleep(0.25)


def drawn(seen: dict) -> bool:
    """Every figure on the page with a nonzero size and canvas and data in every renderer."""
    figs = seen["figures"]
    return set(FIGURES) <= set(figs) and all(
        min(figs[f]["size"]) > 0 and min(figs[f]["canvas"]) > 0 and figs[f]["rows"] and min(figs[f]["rows"]) > 0
        for f in FIGURES
    )


@pytest.fixture(scope="module")
def page_client() -> Iterator[object]:
    """A two-worker LocalCluster whose dashboard (with the training page) listens on loopback."""
    from pipeline.connect import cluster_client

    with cluster_client(workers=2, dashboard_address="127.0.0.1:0") as c:
        yield c
    # anything the page's server left unfinished (a coroutine never awaited) is reported here,
    # not wherever the garbage collector next happens to run
    gc.collect()


def test_console_errors_are_seen(browser):
    # the check below can fail: an exception and a console.error on a page are both reported
    browser.get("data:text/html,<script>console.error('logged-error'); throw new Error('thrown-error')</script>")
    errors = " | ".join(page_errors(browser))
    assert "logged-error" in errors and "thrown-error" in errors, errors


def test_training_page_draws_and_moves_while_a_job_trains(letter_stores, browser, page_client, tmp_path):
    url = page_client.dashboard_link.rsplit("/", 1)[0] + "/pipeline"
    looks: list[tuple[int, dict | None, bool]] = []
    errors: list[str] = []

    def on_epoch(rec: dict) -> None:
        # the driver waits here, between epochs, with the job running on the scheduler
        if rec["epoch"] == 0:
            browser.get(url)
            seen, ok = look(browser, drawn)
        elif rec["epoch"] == 1 and looks and looks[0][1] is not None:
            first = looks[0][1]
            seen, ok = look(browser, lambda s: drawn(s) and moved(first, s))
        else:
            return
        browser.save_screenshot(str(tmp_path / f"epoch-{rec['epoch']}.png"))
        errors.extend(page_errors(browser))
        looks.append((rec["epoch"], seen, ok))

    def moved(before: dict, after: dict) -> bool:
        """More rounds drawn in other pixels, and one more epoch (its record arrives on its own)."""
        loss0, loss1 = before["figures"]["pipeline-loss"], after["figures"]["pipeline-loss"]
        epochs0, epochs1 = before["figures"]["pipeline-epochs"], after["figures"]["pipeline-epochs"]
        return (
            loss1["rows"][0] > loss0["rows"][0]
            and loss1["pixels"] != loss0["pixels"]
            and epochs1["rows"][0] > epochs0["rows"][0]
        )

    try:
        cfg = TrainConfig(epochs=3, patience=0)
        train(letter_stores[0], cfg, tmp_path / "run", client=page_client, on_epoch=on_epoch)
    finally:
        # leave the page while its server runs: the websocket closes and the server drops the
        # session, instead of messages to a browser still connected when the cluster closes
        browser.get("about:blank")
        time.sleep(1.0)

    shots = f"(screenshots in {tmp_path})"
    assert not errors, f"the training page logged errors {shots}:\n" + "\n".join(errors)
    assert [e for e, _, _ in looks] == [0, 1], looks
    (_, first, drew), (_, second, changed) = looks
    assert first is not None, f"no Bokeh document on {url} {shots}"
    assert drew, f"figures not drawn after epoch 0 {shots}: {first['figures']}"
    assert "(running)" in first["summary"] and "(running)" in second["summary"], second["summary"]
    before, after = first["figures"]["pipeline-loss"], second["figures"]["pipeline-loss"]
    epochs = first["figures"]["pipeline-epochs"], second["figures"]["pipeline-epochs"]
    assert changed, (
        f"the plots did not change between two epochs {shots}: loss {before} then {after}, "
        f"epochs {epochs[0]} then {epochs[1]}"
    )
    assert second["summary"] != first["summary"]
