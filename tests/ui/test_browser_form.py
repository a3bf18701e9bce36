"""The form in headless Chromium: mistakes give one plain message beside the field (never
gradio's red "Error" badges or a stack of toasts), Start queues one run however often it is
clicked, a reload during training brings back that run's settings on the Train tab, runs
are renamed and deleted (not while they train), photo checks flag a blank and a cut-off
photo, and the Advanced settings reach the run. Same app and browser as test_browser.py;
the run trains a few seconds on the tiny model and is stopped. Screenshots:
``test-artifacts/ui-form-*.png``.
"""

import json
import re

import numpy as np
import pytest
from PIL import Image

from test_browser import _no_traceback, _shot, _tab
from test_browser import pytestmark  # noqa: F401  (the browser marker; skipped without chromium)
from ui_fixtures import make_photos, serve_app


@pytest.fixture
def app(tmp_path, tiny_model):
    """The app with one sample subject (--samples): three photos, a blank one and a wide one
    whose long subject the square crop cuts."""
    pytest.importorskip("gradio")
    sample = tmp_path / "samples" / "rex"
    make_photos(sample, n=3)
    Image.new("RGB", (96, 96), (250, 250, 250)).save(sample / "blank.png")
    wide = np.full((100, 200, 3), 235, np.uint8)
    wide[35:65, 20:180] = (30, 60, 200)
    Image.fromarray(wide).save(sample / "wide.png")
    (sample / "subject.json").write_text(json.dumps({"token": "sks", "class_noun": "dog"}))
    with serve_app(tmp_path, tiny_model, "--samples", str(tmp_path / "samples")) as served:
        yield served


def _visible(locator) -> int:
    return sum(locator.nth(i).is_visible() for i in range(locator.count()))


def _no_error_badges(page):
    """Gradio marks every output of a failed event "Error" and adds a toast titled "Error"."""
    badges, toasts = _visible(page.get_by_text("Error", exact=True)), _visible(page.locator(".toast-body"))
    if badges or toasts:
        _shot(page, "form-error-badges")
    assert badges == 0 and toasts == 0, [page.locator(".toast-body").nth(i).inner_text()
                                         for i in range(page.locator(".toast-body").count())]


def _box(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def test_the_form_never_hides_behind_errors_and_keeps_the_live_run(app, page):
    url, workspace = app
    page.goto(url)
    page.get_by_text("No photos yet").wait_for(timeout=60_000)

    # ---- Subject: tabbing out of the class noun opens no list over the form ------------------
    _box(page, "db-class-noun").click()
    page.keyboard.press("Tab")
    page.wait_for_timeout(500)
    assert _visible(page.get_by_role("listbox")) == 0

    # ---- an empty token: one message under the boxes, however often the boxes are left ------
    name = page.locator("#db-subject input")
    name.fill("rex")
    name.press("Enter")
    _box(page, "db-token").fill("")
    _box(page, "db-class-noun").click()                                    # blur: a save
    _box(page, "db-class-noun").fill("dog")
    page.keyboard.press("Tab")                                              # blur again: a second save
    note = page.locator("#db-subject-note .db-problem")
    note.wait_for(timeout=10_000)
    page.wait_for_timeout(1000)
    assert note.count() == 1 and "the token is empty" in note.inner_text()
    _no_error_badges(page)
    _shot(page, "form-1-token")
    _box(page, "db-token").fill("sks")
    page.keyboard.press("Tab")
    page.wait_for_function("!document.querySelector('#db-subject-note .db-problem')", timeout=10_000)

    # ---- photo checks: the sample's blank and cut-off photos are named -------------------------
    page.locator("#db-use-sample").click()
    summary = page.locator("#db-subject-summary")
    page.wait_for_function("document.querySelector('#db-subject-summary')?.innerText.includes('5 photos')",
                           timeout=30_000)
    text = summary.inner_text()
    assert re.search(r"blank\.png: looks blank", text) and re.search(r"wide\.png: the square crop cuts off about "
                                                                       r"3\d% of the subject", text)

    # ---- Generate, Export, Analyze with no run: a plain note under the button -------------------
    for tab, button, note_id in (("Generate", "db-generate", "db-gen-note"), ("Export", "db-export", "db-exp-note"),
                                 ("Analyze", "db-analyze", "db-ana-note")):
        _tab(page, tab)
        page.locator(f"#{button}").click()
        page.locator(f"#{note_id} .db-problem", has_text="no trained subject yet").wait_for(timeout=10_000)
        _no_error_badges(page)
    _shot(page, "form-2-analyze-no-run")

    # ---- Train: Advanced settings, a bad number, then a double click on Start ----------------
    _tab(page, "Train")
    page.get_by_role("button", name=re.compile("Advanced settings")).click()
    assert re.match(r"auto \(fp32\)", page.locator("#db-precision label").first.inner_text().strip())
    page.locator("#db-method label", has_text=re.compile(r"^\s*LoRA\s*$")).click()
    page.locator("#db-checkpointing label", has_text=re.compile(r"^\s*on\s*$")).click()
    page.locator("#db-optimizer label", has_text=re.compile(r"^\s*AdamW\s*$")).click()
    page.locator("#db-buckets input[type=checkbox]").check()
    page.locator("#db-prior input[type=checkbox]").uncheck()
    steps = page.locator("#db-steps input")
    steps.fill("0")
    steps.press("Tab")
    page.locator("#db-start").click()
    page.locator("#db-train-note .db-problem", has_text="steps 0: train at least 1 step").wait_for(timeout=10_000)
    _no_error_badges(page)
    steps.fill("1000")
    steps.press("Tab")
    page.locator("#db-start").dblclick()
    page.wait_for_selector("#db-progress [data-state=training]", timeout=60_000)
    page.locator("#db-start").click(force=True)                            # a third click, after it started
    page.wait_for_timeout(1500)
    runs = workspace / "rex" / "runs"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["001-lora-balanced"]
    start = page.locator("#db-start")
    page.wait_for_function("document.querySelector('#db-start')?.disabled", timeout=10_000)
    assert "Training" in start.inner_text()
    request = json.loads((runs / "001-lora-balanced" / "ui-request.json").read_text())["config"]
    assert (request["buckets"], request["gradient_checkpointing"], request["optimizer"], request["method"]) == \
        (True, True, "adamw", "lora")

    # ---- a reload: the Train tab, this run, its settings, Start not clickable ------------------
    page.reload()
    page.wait_for_selector("#db-progress [data-state=training]", timeout=60_000)
    assert page.get_by_role("tab", name=re.compile("Train")).get_attribute("aria-selected") == "true"
    assert "rex/001-lora-balanced" in page.locator("#db-run input").input_value()
    assert page.locator("#db-steps input").input_value() == "1000"
    assert page.locator("#db-buckets input[type=checkbox]").is_checked()
    assert page.locator("#db-prior input[type=checkbox]").is_checked() is False
    for radio, label in (("db-method", "LoRA"), ("db-checkpointing", "on"), ("db-optimizer", "AdamW")):
        assert page.locator(f"#{radio} input:checked").get_attribute("value") in (label, label.lower()), radio
    page.wait_for_function("document.querySelector('#db-start')?.disabled", timeout=10_000)
    assert "Training" in start.inner_text()
    _shot(page, "form-3-reloaded-while-training")

    # ---- a live run is neither deleted nor renamed; stopped, it is both ------------------------
    page.locator("#db-delete").click()
    page.locator("#db-run-note .db-problem", has_text="is training; press Stop").wait_for(timeout=10_000)
    assert not page.locator("#db-confirm").is_visible()
    page.locator("#db-stop").click()
    page.wait_for_selector("#db-progress [data-state=stopped]", timeout=60_000)
    _box(page, "db-new-name").fill("first try")
    page.locator("#db-rename").click()
    page.wait_for_function("document.querySelector('#db-run input')?.value.includes('rex/001-first-try')",
                           timeout=10_000)
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["001-first-try"]
    page.locator("#db-delete").click()
    page.locator("#db-confirm").wait_for(state="visible", timeout=10_000)
    assert "cannot be undone" in page.locator("#db-confirm").inner_text()
    _shot(page, "form-4-confirm-delete")
    page.locator("#db-confirm-delete").click()
    page.locator("#db-run-note", has_text="Deleted rex/001-first-try.").wait_for(timeout=10_000)
    assert [p.name for p in runs.iterdir()] == [".last-run"]               # its number is not given out again
    _no_error_badges(page)
    _no_traceback(page)
