"""The Train tab's adapter choices, without a browser: the layers to adapt (Conv DoRA among
them), DVoRA next to DoRA/LoRA with its own default rank, and QDoRA's 4-bit base. Each
reaches the run's TrainConfig, changes the trained-parameter count and memory the tab shows,
survives a reload (the run's ui-request.json), and a combination the trainer refuses (DVoRA on
convolutions) comes back as the config's own message for the note beside the fields. Real
runs on the tiny model check that DVoRA and conv runs export as the advice says.
"""

import json

import pytest
from safetensors import safe_open
from ui_fixtures import make_photos, wait_for_run

from dorabooth import attach
from ui import handlers as h
from ui import runs, views
from ui.workspace import UserError

DVORA = "DVoRA (fewest parameters)"
REFUSAL = "DVoRA adapts Linear layers only"          # TrainConfig's own words (dorabooth/config.py)


@pytest.fixture
def ctx(tmp_path, tiny_model):
    ctx = h.make_context(tmp_path / "ws", tiny_model)
    h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
    yield ctx
    ctx.close()


def test_each_choice_reaches_the_train_config(ctx):
    run = ctx.workspace.new_run("rex", "check")
    for targets in h.TARGETS:
        assert h.build_config(ctx, "rex", h.TrainSettings(targets=targets), run).targets == targets
    assert h.build_config(ctx, "rex", h.TrainSettings(quantize_base="nf4"), run).quantize_base == "nf4"
    dvora = h.build_config(ctx, "rex", h.TrainSettings(method=DVORA), run)
    assert (dvora.method, dvora.rank) == ("dvora", ctx.info.defaults["dvora_rank"]) == ("dvora", 16)
    assert h.build_config(ctx, "rex", h.TrainSettings(method=DVORA, rank=4), run).rank == 4      # typed: kept
    assert h.build_config(ctx, "rex", h.TrainSettings(), run).rank == 8                        # DoRA's preset
    assert h.build_config(ctx, "rex", h.TrainSettings(), run).targets == "all-linear"          # the toy family's
    with pytest.raises(UserError, match="layers 'convs'"):
        h.build_config(ctx, "rex", h.TrainSettings(targets="convs"), run)
    with pytest.raises(UserError, match="frozen base weights 'int8'"):
        h.build_config(ctx, "rex", h.TrainSettings(quantize_base="int8"), run)


def test_dvora_on_convolutions_is_refused_with_the_configs_message(ctx):
    for targets in ("attn+conv", "all"):
        settings = h.TrainSettings(method=DVORA, targets=targets)
        view = h.device_view(ctx, settings)
        assert REFUSAL in view.refused and f"targets {targets}" in view.refused and view.estimate is None
        note = views.adapter_note_html(view)
        assert 'class="db-problem"' in note and REFUSAL in note         # the note beside the fields
        assert 'data-device-problem="refused"' in views.device_html(view) and REFUSAL not in views.device_html(view)
        with pytest.raises(ValueError, match=REFUSAL):
            h.start_training(ctx, "rex", settings)
    assert list(ctx.workspace.runs("rex")) == []                          # nothing was queued
    assert views.adapter_note_html(h.device_view(ctx, h.TrainSettings(targets="all"))) == ""     # DoRA: fine


def test_the_rank_box_follows_the_method_unless_the_user_typed_one(ctx):
    dora, lora = "DoRA (recommended)", "LoRA"
    assert h.default_rank(ctx, "balanced", DVORA) == 16 and h.default_rank(ctx, "balanced", dora) == 8
    assert h.rank_for_method(ctx, "balanced", dora, DVORA, 8) == 16       # DoRA's default: DVoRA's instead
    assert h.rank_for_method(ctx, "balanced", DVORA, dora, 16) == 8       # and back
    assert h.rank_for_method(ctx, "balanced", dora, DVORA, 5) == 5        # typed by the user: kept
    assert h.rank_for_method(ctx, "balanced", dora, lora, 8) == 8
    assert h.rank_for_method(ctx, "quick", dora, DVORA, None) == 16       # an empty box: the default


def test_the_settings_preview_counts_what_trains_and_its_memory(ctx, tiny_model):
    """The trained-parameter count the tab shows equals what the trainer attaches (the tiny
    pipeline with dorabooth.attach, counted), and memory follows conv targets and the NF4 base."""
    from diffusers import StableDiffusionXLPipeline

    views_ = {name: h.device_view(ctx, settings) for name, settings in {
        "dora": h.TrainSettings(targets="attn"), "conv": h.TrainSettings(targets="attn+conv"),
        "dvora": h.TrainSettings(method=DVORA, targets="attn"),
        "nf4": h.TrainSettings(quantize_base="nf4", targets="attn")}.items()}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    attach(pipe, method="dora", rank=8, unet_targets="attn+conv", magnitude_axis="in", text_encoders=True)
    attached = sum(p.numel() for c in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
                   for p in c.parameters() if p.requires_grad)
    assert views_["conv"].trainable == attached == 90_560
    assert views_["dora"].trainable == 48_128 and views_["dvora"].trainable == 6_912     # docs/training.md's
    peak = {k: v.estimate.peak for k, v in views_.items()}
    assert peak["conv"] > peak["dora"] > peak["nf4"] and peak["dvora"] < peak["dora"]
    html = views.device_html(views_["conv"])
    assert "<b>90,560</b> trained parameters" in html and 'data-trainable="90560"' in html


def test_a_reload_restores_the_adapter_choices(tmp_path, tiny_model):
    from test_handlers import FakeTrainer

    trainer = FakeTrainer()
    ctx = h.make_context(tmp_path / "ws", tiny_model, train=trainer)
    try:
        h.upload_photos(ctx, "rex", make_photos(tmp_path / "up"), "sks", "dog")
        asked = h.TrainSettings(method=DVORA, targets="all-linear", quantize_base="nf4", steps=3, pivotal=True,
                                prior_preservation=False)
        ref = h.start_training(ctx, "rex", asked)
        assert h.live_run(ctx) == ref and h.run_form(ctx, ref) == asked
        config = json.loads((ctx.workspace.run(ref) / "ui-request.json").read_text())["config"]
        assert (config["method"], config["targets"], config["quantize_base"], config["rank"]) == \
            ("dvora", "all-linear", "nf4", 16)
        trainer.release.set()
        wait_for_run(ctx, ref)
    finally:
        trainer.release.set()
        ctx.close()


def test_dvora_and_conv_runs_export_as_the_advice_says(ctx):
    """DVoRA runs have a magnitude axis like DoRA runs: a run for ComfyUI (axis "in") gets
    advice (no diffusers file tried), the diffusers file is refused in words, and a run for
    diffusers can be retrained for ComfyUI. A Conv DoRA run's kohya file holds 4-D conv keys."""
    base = {"steps": 1, "prior_preservation": False, "preset": "quick"}
    for_diffusers = h.start_training(ctx, "rex", h.TrainSettings(method=DVORA, use="diffusers / Python", **base))
    conv = h.start_training(ctx, "rex", h.TrainSettings(targets="attn+conv", seed=1, **base))
    assert wait_for_run(ctx, for_diffusers).finished and wait_for_run(ctx, conv).finished
    assert h.run_status(ctx, for_diffusers).method_name == "DVoRA"
    assert "DVoRA</b> for diffusers" in views.run_details_html(h.run_status(ctx, for_diffusers))

    fmt, _, advice = h.suggested_export(ctx, for_diffusers)
    assert (advice.method, advice.axis) == ("dvora", "out") and "diffusers-lora" in advice.reports
    assert h.export_run(ctx, for_diffusers, "diffusers-lora").path.is_file()
    for_comfy = h.retrain_for(ctx, for_diffusers, "comfy")                 # DVoRA, axis "in"
    request = json.loads((ctx.workspace.run(for_comfy) / "ui-request.json").read_text())["config"]
    assert (request["method"], request["magnitude_axis"]) == ("dvora", "in")
    assert wait_for_run(ctx, for_comfy).finished
    for use in ("comfy", "diffusers", "unsure"):       # (ComfyUI cannot load the tiny base: the advice says so)
        fmt, line, advice = h.suggested_export(ctx, for_comfy, use)
        assert line and set(advice.reports) == {"kohya"}                 # no diffusers file is tried
        assert fmt == {"comfy": "", "diffusers": "merged-diffusers", "unsure": "merged-diffusers"}[use]
    with pytest.raises(UserError, match="diffusers format cannot hold"):
        h.export_run(ctx, for_comfy, "diffusers-lora")

    assert "layers: Attention + convolutions (Conv DoRA)" in views.run_details_html(h.run_status(ctx, conv))
    out = h.export_run(ctx, conv, "kohya")
    with safe_open(str(out.path), "pt") as f:
        down = [k for k in f.keys() if k.endswith("lora_down.weight") and f.get_tensor(k).ndim == 4]  # noqa: SIM118
        assert down and all(k.startswith("lora_unet_") for k in down)       # the ResNet convolutions (LoCon)
        scale = f.get_tensor(down[0].replace("lora_down.weight", "dora_scale"))
        assert scale.shape[0] == 1 and scale.ndim == 4                    # (1, in, 1, 1): the app's axis "in"
    assert runs.read_status(ctx.workspace.run(conv)).settings["targets"] == "attn+conv"


def test_pivotal_tuning_trains_new_words_that_generate_and_export_uses(ctx):
    """The "Pivotal tuning" box: two new tokens replace the token in the run's prompts; the
    default generation prompt names them and generates; an adapter export downloads the file and
    its embeddings file together (a single-file tool needs both)."""
    import zipfile

    from dorabooth import pivotal
    from ui import exporting

    run = ctx.workspace.new_run("rex", "check")
    config = h.build_config(ctx, "rex", h.TrainSettings(pivotal=True), run)
    assert config.pivotal_tokens == h.PIVOTAL_TOKENS == 2 and config.identifier == "<s0><s1>"
    assert h.build_config(ctx, "rex", h.TrainSettings(pivotal=False), run).pivotal_tokens == 0
    default = h.build_config(ctx, "rex", h.TrainSettings(), run).pivotal_tokens     # the model's own choice
    assert default == (h.PIVOTAL_TOKENS if ctx.info.defaults.get("pivotal_tokens") else 0)

    ref = h.start_training(ctx, "rex", h.TrainSettings(pivotal=True, steps=1, prior_preservation=False,
                                                       preset="quick"))
    assert wait_for_run(ctx, ref).finished
    prompt = h.default_prompt(ctx, ref)
    assert "<s0><s1>" in prompt and "sks" not in prompt.split()
    assert len(h.generate_images(ctx, ref, prompt, steps=2).images) == 1
    out = exporting.export_run(ctx, ref, "kohya", "fp16")
    assert out.path.suffix == ".zip" and any("pivotal tuning" in n for n in out.notes)
    assert out.path.name.startswith("sks-dog_")                     # named by the word typed, not <s0><s1>
    with zipfile.ZipFile(out.path) as z:
        names = sorted(z.namelist())
    assert len(names) == 2 and names[1] == names[0].replace(".safetensors", pivotal.EXPORT_SUFFIX)
