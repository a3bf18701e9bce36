"""The app end to end in headless Chromium: upload → train → generate → export → reload.

Debian's ``chromium`` is driven by Playwright through ``executable_path`` (Playwright's own
browser download is not used). Screenshots of every tab go to ``test-artifacts/`` so a
person can look at the page. The app starts as `dorabooth-ui` would, on a free port, with the tiny
SDXL-architecture test model; training is 4 steps at 32 px.
"""

import json
import re
import struct
import time
from pathlib import Path

import pytest

from ui_fixtures import CHROMIUM, serve_app

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install chromium); CI installs it"),
]


@pytest.fixture
def app(tmp_path, tiny_model):
    """``dorabooth-ui`` on a free port with the tiny model (``ui_fixtures.serve_app``)."""
    pytest.importorskip("gradio")
    with serve_app(tmp_path, tiny_model) as served:
        yield served


def _tab(page, name: str):
    page.get_by_role("tab", name=re.compile(name)).click()


def _shot(page, name: str):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-{name}.png"), full_page=True)


def _not_clipped(page, selector: str):
    """Every element matching ``selector`` lies inside its <svg>'s box, as drawn."""
    outside = page.eval_on_selector_all(selector, """els => els.filter(e => {
        const r = e.getBoundingClientRect(), box = e.ownerSVGElement.getBoundingClientRect();
        return r.width === 0 || r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1
               || r.bottom > box.bottom + 1; }).map(e => e.textContent)""")
    assert page.locator(selector).count() and not outside, f"clipped or hidden: {outside}"


def _no_traceback(page):
    text = page.content()
    assert "Traceback" not in text and 'File "' not in text


def test_upload_train_generate_export_reload(app, page, photos, tmp_path):
    url, workspace = app
    t0 = time.monotonic()
    page.goto(url)
    page.get_by_text("No photos yet").wait_for(timeout=60_000)                # the page has loaded its state

    # ---- Subject: name, class noun, three photos through the file input --------------------
    name = page.locator("#db-subject input")
    name.fill("Rex the Dog")
    name.press("Enter")
    page.locator("#db-class-noun textarea, #db-class-noun input").first.fill("dog")
    page.locator("#db-token textarea, #db-token input").first.click()       # blur saves
    page.locator("#db-upload input[type=file]").set_input_files([str(p) for p in photos])
    page.wait_for_function("document.querySelector('#db-subject-summary')?.innerText.includes('3 photos')",
                           timeout=30_000)
    assert page.locator("#db-crops img").count() == 3
    assert "Ready" in page.locator("#db-subject-summary").inner_text()
    _shot(page, "1-subject")
    page.locator("#db-remove").click()                                       # nothing chosen: a message, no trace
    page.locator("#db-photo-note", has_text="choose a photo to remove").wait_for(timeout=10_000)
    _no_traceback(page)

    # ---- Train: 4 steps, no prior preservation, wait for the bar to finish ------------------
    _tab(page, "Train")
    device = page.locator("#db-device")                                     # the resolver's settings, shown
    assert re.search(r"Training on .+: .+ · VAE fp32 · gradient checkpointing off · .+ · estimated peak memory",
                     device.inner_text())
    page.get_by_text("Advanced settings").click()
    page.locator("#db-checkpointing label", has_text=re.compile(r"^\s*on\s*$")).click()    # override "auto (off)"
    page.wait_for_function("document.querySelector('#db-device [data-checkpointing]')?.dataset.checkpointing"
                           " == 'true'", timeout=10_000)
    assert "gradient checkpointing on" in device.inner_text()
    balanced = page.locator("#db-steps input").input_value()
    page.locator("#db-preset label", has_text="Quick").click()              # a preset fills in its steps
    page.wait_for_function(f"document.querySelector('#db-steps input').value != '{balanced}'", timeout=30_000)
    page.locator("#db-steps input").fill("4")
    page.locator("#db-steps input").press("Tab")
    page.locator("#db-prior input[type=checkbox]").uncheck()
    assert page.locator("#db-use input[value='Not sure']").is_checked()       # where it will be used: asked plainly
    assert "three of the four tools" in page.locator("#db-use-note").inner_text()
    page.locator("#db-start").click()
    page.wait_for_selector("#db-progress [data-state=finished]", timeout=120_000)
    assert "Finished: 4 steps" in page.locator("#db-progress").inner_text()
    page.wait_for_selector("#db-loss svg polyline", timeout=10_000)
    page.wait_for_selector("#db-previews img", timeout=10_000)
    assert "newest at step 4 of 4" in page.locator("#db-previews-title").inner_text()    # previews with their step
    assert "step 4" in page.locator("#db-previews").inner_text()
    _not_clipped(page, "#db-loss svg text")                                  # the axis labels, "loss" included
    ref = "rex-the-dog/001-dora-quick"
    assert ref in page.locator("#db-run input").input_value()
    saved = json.loads((workspace / "rex-the-dog" / "runs" / "001-dora-quick" / "config.json").read_text())
    assert saved["config"]["gradient_checkpointing"] is True                 # the override reached the run
    _shot(page, "2-train")

    # ---- Generate: one image appears in the gallery and on disk ----------------------------
    _tab(page, "Generate")
    page.wait_for_function("document.querySelector('#db-gen-run input')?.value.includes('rex-the-dog')",
                           timeout=10_000)
    page.wait_for_function("document.querySelector('#db-prompt textarea')?.value.includes('sks dog')",
                           timeout=10_000)                                  # the token is pre-filled
    mine = "a photo of sks dog on the moon"
    page.locator("#db-prompt textarea").fill(mine)
    page.locator("#db-generate").click()
    page.wait_for_selector("#db-gallery img", timeout=60_000)
    assert page.locator("#db-gallery img").count() == 2                    # default: 2 images
    run = workspace / "rex-the-dog" / "runs" / "001-dora-quick"
    assert len(list((run / "generated").glob("*.png"))) == 2
    _shot(page, "3-generate")

    # ---- Export: per tool, which file and why; a kohya file named after the subject ---------------
    _tab(page, "Export")
    page.wait_for_function("document.querySelector('#db-exp-run input')?.value.includes('rex-the-dog')",
                           timeout=10_000)
    page.wait_for_selector("#db-exp-hint tr[data-destination=Forge]", timeout=60_000)   # advice per destination
    assert "cannot load this base model" in page.locator("#db-exp-hint tr[data-destination=ComfyUI]").inner_text()
    assert page.locator("#db-format input[value=merged-diffusers]").is_checked()   # "Not sure", no ComfyUI base
    page.locator("#db-format label", has_text="ComfyUI / A1111 / Forge adapter").click()
    page.locator("#db-export").click()
    page.wait_for_selector("#db-exp-report table", timeout=60_000)
    report = page.locator("#db-exp-report").inner_text()
    assert "ComfyUI" in report and "Forge" in report and "PR #" not in report and "‖" not in report
    link = page.locator("#db-download a").first
    link.wait_for(timeout=10_000)
    with page.expect_download() as info:
        link.click()
    assert info.value.suggested_filename == "sks-dog_dora_kohya_fp32.safetensors"
    saved = tmp_path / "download.safetensors"
    info.value.save_as(saved)
    data = saved.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]                              # safetensors: u64 header size
    assert 0 < header < len(data) and b"dora_scale" in data[8:8 + header]              # a DoRA adapter …
    assert b'"modelspec.trigger_phrase":"sks dog"' in data[8:8 + header]              # … that names its subject
    _shot(page, "4-export")

    # ---- Analyze: was the subject learned (images), then the magnitude/direction plot ----------
    _tab(page, "Analyze")
    page.wait_for_function("document.querySelector('#db-ana-run input')?.value.includes('rex-the-dog')",
                           timeout=10_000)
    page.locator("#db-analyze").click()
    page.wait_for_selector("#db-check [data-scored]", timeout=90_000)     # the tiny base: no reader, by eye
    page.wait_for_selector("#db-check-class img", timeout=10_000)
    assert page.locator("#db-check-subject img").count() == 4 and page.locator("#db-check-class img").count() == 4
    page.get_by_text("How training changed each layer").click()
    page.wait_for_selector("#db-ana-plot img", timeout=60_000)
    assert "Slope" in page.locator("#db-ana-text").inner_text()
    _shot(page, "5-analyze")

    # ---- A second run finishes; back on Generate the run and prompt the user had are kept -----
    _tab(page, "Train")
    page.locator("#db-start").click()
    page.wait_for_function("document.querySelector('#db-run input')?.value.includes('002-')", timeout=30_000)
    second = workspace / "rex-the-dog" / "runs" / "002-dora-quick"
    deadline = time.monotonic() + 120
    while not (second / "adapter.safetensors").is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    page.wait_for_function("document.querySelector('#db-progress')?.innerText.includes('Finished')", timeout=30_000)
    _tab(page, "Generate")
    page.wait_for_timeout(1500)                                             # the tab's refresh has run
    assert page.locator("#db-prompt textarea").input_value() == mine
    assert ref in page.locator("#db-gen-run input").input_value()

    # ---- Reload: the run is still listed and still finished --------------------------------
    page.reload()
    page.wait_for_selector("#db-upload", timeout=60_000)
    _tab(page, "Train")
    newest = "rex-the-dog/002-dora-quick"                                    # the newest run is shown
    page.wait_for_function(f"document.querySelector('#db-run input')?.value.includes('{newest}')", timeout=20_000)
    page.wait_for_selector("#db-progress [data-state=finished]", timeout=20_000)
    _shot(page, "6-after-reload")
    _no_traceback(page)
    assert time.monotonic() - t0 < 180


@pytest.fixture
def comfy_app(tmp_path):
    """``dorabooth-ui`` on a base ComfyUI can load, its workspace holding one finished run trained
    for diffusers (axis "out", 1 step, as `dorabooth train` writes it)."""
    pytest.importorskip("gradio")
    from ui_fixtures import make_photos, save_comfy_loadable_model

    from dorabooth import TrainConfig, train

    model = str(save_comfy_loadable_model(tmp_path / "model"))
    workspace = tmp_path / "workspace"
    photos = workspace / "rex" / "images"
    make_photos(photos)
    (workspace / "rex" / "subject.json").write_text(json.dumps({"name": "rex", "token": "sks", "class_noun": "dog"}))
    train(TrainConfig(images=str(photos), class_noun="dog", out=str(workspace / "rex" / "runs" / "001-dora"),
                      model=model, steps=1, rank=4, prior_preservation=False, sample_every=0, magnitude_axis="out"))
    with serve_app(tmp_path, model) as served:
        yield served


def test_export_for_comfyui_offers_merged_checkpoint_or_retrain(comfy_app, page):
    """A run trained for diffusers, exported for ComfyUI / A1111 / Forge: the merged checkpoint
    is selected, and one click retrains with the same photos and settings for those tools."""
    url, workspace = comfy_app
    page.goto(url)
    page.wait_for_selector("#db-upload", timeout=60_000)
    _tab(page, "Export")
    page.wait_for_selector("#db-exp-hint tr[data-destination=diffusers]", timeout=60_000)
    assert page.locator("#db-exp-use input[value='diffusers / Python']").is_checked()    # what it was trained for
    assert not page.locator("#db-retrain").is_visible()
    page.locator("#db-exp-use label", has_text="ComfyUI / A1111 / Forge").click()
    page.wait_for_selector("#db-exp-hint [data-choice=retrain]", timeout=30_000)
    assert page.locator("#db-format input[value=merged-single-file]").is_checked()
    assert "only approximately" in page.locator("#db-exp-hint tr[data-destination=ComfyUI]").inner_text()
    _shot(page, "export-comfyui-choice")
    page.locator("#db-retrain").click()
    page.get_by_text("Started rex/002-dora-for-comfyui").wait_for(timeout=30_000)
    request = json.loads((workspace / "rex" / "runs" / "002-dora-for-comfyui" / "ui-request.json").read_text())
    assert request["config"]["magnitude_axis"] == "in" and request["config"]["images"] == str(workspace / "rex" /
                                                                                              "images")
    _no_traceback(page)
