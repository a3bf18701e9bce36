"""The app's "Where will you use it?", its export advice and its Analyze check, without a browser.

* Train: the answer (plain words, "Not sure" by default) trains the axis that makes the small
  file exact there.
* Export: a run trained for diffusers, exported for ComfyUI / A1111 / Forge, gets the choice
  merged checkpoint or retrain (one click: a new run with the same photos and settings, axis
  "in"); the advice before the export and the report after it come from the same consumer
  report; downloads are named after the subject. The base here is one ComfyUI can load (the
  tiny test models are not), so the ComfyUI verdicts are real ones.
* Analyze: leads with whether the subject was learned and the class kept (scored on the toy
  model; shown to judge by eye elsewhere).
"""

import json
import re

import pytest

from dorabooth import TrainConfig, rundir, train
from ui import handlers as h
from ui import views
from ui.workspace import UserError
from ui_fixtures import make_photos, save_comfy_loadable_model, wait_for_run

JARGON = re.compile(r"PR #|‖|--[a-z]|_row|_col|dora_scale|lora_magnitude|wd_on")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A workspace on a ComfyUI-loadable base with one run trained for diffusers (axis "out"),
    written by the trainer as `dorabooth train` would (no app request): 1 step, no samples."""
    root = tmp_path_factory.mktemp("comfy")
    model = str(save_comfy_loadable_model(root / "model"))
    ctx = h.make_context(root / "ws", model)
    h.upload_photos(ctx, "rex", make_photos(root / "up"), "sks", "dog")
    run = ctx.workspace.root / "rex" / "runs" / "001-dora"
    train(TrainConfig(images=str(ctx.workspace.subject("rex").images), class_noun="dog", out=str(run), model=model,
                      steps=1, rank=4, prior_preservation=False, sample_every=0, magnitude_axis="out",
                      pivotal_tokens=0))      # as on a real SD model (the tiny one takes the toy's preset)
    yield ctx, "rex/001-dora"
    ctx.close()


def test_where_will_you_use_it_trains_the_recommended_axis(tmp_path, tiny_model):
    ctx = h.make_context(tmp_path / "ws", tiny_model)
    try:
        h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
        run = ctx.workspace.new_run("rex", "check")
        axis = {use: h.build_config(ctx, "rex", h.TrainSettings(use=use), run).magnitude_axis for use in h.USES}
        assert axis == {"ComfyUI / A1111 / Forge": "in", "diffusers / Python": "out", "Not sure": "in"}
        assert h.TrainSettings().use == "Not sure"
        for use in h.USES:
            assert not JARGON.search(h.use_advice(use)), use
        assert "every tool" in h.use_advice("Not sure", "lora")
        with pytest.raises(UserError, match="choose where"):
            h.use_advice("ComfyUI or A1111")
    finally:
        ctx.close()


def test_a_run_for_diffusers_exported_for_comfyui_gets_merged_or_retrain(comfy):
    ctx, ref = comfy
    assert h.run_use(ctx.workspace.run(ref)) == "diffusers"                  # from its axis: no app request
    fmt, line, advice = h.suggested_export(ctx, ref)
    diffusers = {v["consumer"]: v for v in advice.reports["diffusers-lora"]}["diffusers"]
    if diffusers["status"] == "exact":
        assert fmt == "diffusers-lora"
    else:           # transformers 5 drops the text encoders' magnitudes: the hint says so, as the report does
        assert fmt == "merged-diffusers" and f"{100 * diffusers['max_rel_error']:.3g}%" in line
    fmt, line, advice = h.suggested_export(ctx, ref, "comfy")
    assert fmt == "merged-single-file" and h.retrain_offer(advice, "comfy")
    picks = {p.destination: p for p in advice.picks}
    assert picks["ComfyUI"].retrain and "only approximately" in picks["ComfyUI"].reason
    assert picks["A1111"].format == "" and "cannot load this base model" in picks["A1111"].reason
    assert h.suggested_export(ctx, ref, "unsure")[0] == "merged-single-file"
    hint = views.advice_html(advice.picks, "comfy")
    assert not JARGON.search(hint) and hint.count("data-destination") == 4

    outcome = h.export_run(ctx, ref, "kohya", "fp16")             # the report of the file itself …
    assert outcome.path.name == "sks-dog_dora_kohya_fp16.safetensors"
    assert outcome.picks == advice.picks                           # … gives the advice the hint gave
    html = views.export_report_html(outcome)
    assert not JARGON.search(html) and "ComfyUI applies it only approximately" in html
    assert h.export_run(ctx, ref, "diffusers-lora", "fp16").path.name == \
        "sks-dog_dora_diffusers-lora_fp32.safetensors"            # always written in fp32: named so


def test_retrain_for_comfyui_reuses_the_photos_and_settings(comfy):
    ctx, ref = comfy
    new = h.retrain_for(ctx, ref)
    assert new == "rex/002-dora-for-comfyui" and h.retrain_for(ctx, ref) == new       # a second click: same run
    old_config = rundir.read_config(ctx.workspace.run(ref))[0].to_dict()
    request = json.loads((ctx.workspace.run(new) / "ui-request.json").read_text())
    assert request["retrain_of"] == ref and request["use"] == "ComfyUI / A1111 / Forge"
    differ = {k for k in old_config if old_config[k] != request["config"][k]}
    assert differ == {"out", "magnitude_axis"} and request["config"]["magnitude_axis"] == "in"
    assert wait_for_run(ctx, new, timeout=300.0).finished
    with pytest.raises(UserError, match="trained for ComfyUI / A1111 / Forge already"):
        h.retrain_for(ctx, new)
    fmt, line, advice = h.suggested_export(ctx, new)                 # asked for ComfyUI: its small file is exact
    assert fmt == "kohya" and "ComfyUI applies it exactly" in line and not h.retrain_offer(advice, "comfy")


def test_analyze_says_whether_the_subject_was_learned_on_the_toy_model(tmp_path):
    ctx = h.make_context(tmp_path / "ws")                          # the embedded toy model
    try:
        view = h.use_sample(ctx, h.sample_subjects(ctx)[0])
        ref = h.start_training(ctx, view.name, h.TrainSettings(steps=2, prior_preservation=False))
        assert wait_for_run(ctx, ref, timeout=300.0).finished
        check = h.check_run(ctx, ref, steps=2)
        assert check.scorer == "toy" and len(check.subject_images) == len(check.class_images) == 4
        assert 0 <= check.learned <= 1 and check.class_kept is not None and 0 <= check.leak <= 1
        html = views.check_html(check)
        assert "Subject " in html and "Class prompt" in html and check.class_prompt in html
    finally:
        ctx.close()


def test_analyze_shows_the_images_to_judge_on_other_bases(comfy):
    ctx, ref = comfy
    check = h.check_run(ctx, ref, seeds=(0, 1), steps=1)
    assert check.scorer is None and len(check.subject_images) == len(check.class_images) == 2
    assert all(p.endswith(".png") for p, _ in check.subject_images)
    assert "No automatic reading" in views.check_html(check)
