"""The Advanced adapter choices in headless Chromium: Conv DoRA with DVoRA is refused in the
note beside the fields (the trainer's own words, no error badge), the rank box takes DVoRA's
default and gives it back, DoRA with attention + convolutions trains on the tiny model, and
a reload during training brings the choices back. Same app and browser as test_browser.py.
Screenshots: ``test-artifacts/ui-adapter-*.png``.
"""

import json
import re

from test_browser import (
    _no_traceback,
    _shot,
    _tab,
    app,  # noqa: F401  (the app on the tiny model)
    pytestmark,  # noqa: F401  (the browser marker; skipped without chromium)
)
from test_browser_form import _no_error_badges

NOTE = "#db-adapter-note .db-problem"


def _pick(page, radio: str, label: str):
    page.locator(f"#{radio} label", has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")).click()


def _rank(page) -> str:
    return page.locator("#db-rank input").input_value()


def test_conv_dora_and_dvora_choices_reach_a_run(app, page, photos):  # noqa: F811
    url, workspace = app
    page.goto(url)
    page.get_by_text("No photos yet").wait_for(timeout=60_000)
    name = page.locator("#db-subject input")
    name.fill("rex")
    name.press("Enter")
    page.locator("#db-class-noun textarea, #db-class-noun input").first.fill("dog")
    page.locator("#db-token textarea, #db-token input").first.click()
    page.locator("#db-upload input[type=file]").set_input_files([str(p) for p in photos])
    page.wait_for_function("document.querySelector('#db-subject-summary')?.innerText.includes('3 photos')",
                           timeout=30_000)

    # ---- DVoRA with Conv DoRA: refused beside the fields, in the trainer's words ---------------
    _tab(page, "Train")
    page.get_by_role("button", name=re.compile("Advanced settings")).click()
    dora_rank = _rank(page)
    _pick(page, "db-targets", "Attention + convolutions (Conv DoRA)")
    page.wait_for_function("document.querySelector('#db-device [data-trainable]')?.dataset.trainable > 48128",
                           timeout=10_000)                                   # conv layers counted
    _pick(page, "db-method", "DVoRA (fewest parameters)")
    page.locator(NOTE, has_text="DVoRA adapts Linear layers only").wait_for(timeout=10_000)
    page.wait_for_function(f"document.querySelector('#db-rank input').value != '{dora_rank}'", timeout=10_000)
    assert _rank(page) == "16"                                                # DVoRA's own default here
    assert "cannot train" in page.locator("#db-device").inner_text()
    _no_error_badges(page)
    _shot(page, "adapter-1-dvora-conv-refused")

    # ---- DoRA with attention + convolutions: the note clears, a run trains ---------------------
    _pick(page, "db-method", "DoRA (recommended)")
    page.wait_for_function(f"document.querySelector('#db-rank input').value == '{dora_rank}'", timeout=10_000)
    page.wait_for_function("!document.querySelector('#db-adapter-note .db-problem')", timeout=10_000)
    assert page.locator("#db-targets input:checked").get_attribute("value") == "attn+conv"
    page.locator("#db-steps input").fill("1000")
    page.locator("#db-steps input").press("Tab")
    page.locator("#db-prior input[type=checkbox]").uncheck()
    page.locator("#db-start").click()
    page.wait_for_selector("#db-progress [data-state=training]", timeout=60_000)
    page.wait_for_selector("#db-loss svg polyline", timeout=60_000)          # it steps: a loss curve
    run = workspace / "rex" / "runs" / "001-dora-balanced"
    config = json.loads((run / "ui-request.json").read_text())["config"]
    assert (config["method"], config["targets"], config["rank"]) == ("dora", "attn+conv", int(dora_rank))

    # ---- a reload during training: the choices come back ---------------------------------------
    page.reload()
    page.wait_for_selector("#db-progress [data-state=training]", timeout=60_000)
    page.wait_for_function("document.querySelector('#db-targets input:checked')?.value == 'attn+conv'",
                           timeout=10_000)
    assert page.locator("#db-quantize input:checked").get_attribute("value") == "none"
    page.get_by_text("layers: Attention + convolutions (Conv DoRA)").wait_for(timeout=10_000)   # the run's line
    _shot(page, "adapter-2-training-conv")
    page.locator("#db-stop").click()
    page.wait_for_selector("#db-progress [data-state=stopped]", timeout=60_000)
    _no_error_badges(page)
    _no_traceback(page)
