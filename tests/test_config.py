"""TrainConfig: validation messages say what to change; JSON round trip; family defaults."""

import json
from dataclasses import replace

import pytest

from dorabooth import families as fam
from dorabooth.config import TrainConfig, default_prompts
from dorabooth.memory import fill_from_run
from dorabooth.rundir import read_config, write_config

BASE = dict(images="imgs", class_noun="dog", out="run")


@pytest.mark.parametrize("change,message", [
    (dict(method="qlora"), "method 'qlora': choose one of dora, lora, dvora, full"),
    (dict(resolution=500), "multiple of 8"),
    (dict(rank=0), "rank 0"),
    (dict(rank=1, half_rank=True), "at least 2"),
    (dict(lr=-1.0), "lr -1.0: use a positive number"),
    (dict(token="two words"), "one rare word"),
    (dict(class_noun=" "), "--class-noun"),
    (dict(magnitude_axis="row"), "magnitude_axis 'row'"),
    (dict(optimizer="sgd"), "adamw, adamw8bit"),
    (dict(mixed_precision="fp8"), "no, fp16, bf16"),
    (dict(batch_size=0), "batch_size 0"),
    # issue 13 #2: what the app's probe queued, and lr 0: each refused with the allowed range
    (dict(steps=10**9), r"steps 1000000000: train at most 100000 steps \(the range is 1–100000"),
    (dict(rank=10**6), r"rank 1000000: use a rank of at most 1024 \(the range is 1–1024"),
    (dict(num_class_images=10**7), r"num_class_images 10000000: .*the range is 1–10000"),
    (dict(lr=1e300), r"lr 1e\+300: use a positive number of at most 1 \(the range is \(0, 1\]"),
    (dict(lr=1e38), r"lr 1e\+38: .*\(0, 1\]"),
    (dict(lr=0.0), r"lr 0.0: use a positive number .*\(0, 1\]"),
    (dict(lr=float("inf")), "lr inf"),
    (dict(text_encoder_lr=2.0), r"text_encoder_lr 2.0: .*\(0, 1\]"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm nan: use a positive number"),
    (dict(resolution=8192), "resolution 8192: use at most 4096"),
    (dict(class_image_steps=10**6), "class_image_steps 1000000: .*at most 1000"),
    (dict(seed=-1), "seed -1: use a whole number from 0 to 4294967295"),
    (dict(noise_offset=float("inf")), "noise_offset"),
    # issue 14: DVoRA adapts Linear layers only; the conv presets say the way out
    (dict(method="dvora", targets="attn+conv"), "DVoRA adapts Linear layers only; use --targets attn"),
    (dict(method="dvora", targets="all"), "or --method dora for the convolutions"),
])
def test_validation_says_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{**BASE, **change})


def test_the_bounds_themselves_are_allowed():
    """The ends of each range are valid: the bounds refuse only what lies beyond them."""
    TrainConfig(**BASE, steps=100_000, rank=1024, num_class_images=10_000, lr=1.0, text_encoder_lr=1e-8,
                resolution=4096, class_image_steps=1000, seed=2**32 - 1)
    TrainConfig(**BASE, steps=1, rank=2, half_rank=True, num_class_images=1, seed=0)


def test_defaults_and_derived_values():
    c = TrainConfig(**BASE)
    assert c.method == "dora" and c.token == "sks" and c.prior_preservation
    assert c.resolved_instance_prompt == "a photo of sks dog" and c.resolved_class_prompt == "a photo of a dog"
    assert TrainConfig(**{**BASE, "class_noun": "owl"}).resolved_class_prompt == "a photo of an owl"
    r = c.with_defaults(dict(rank=16, resolution=512, steps=100, lr=1e-4, num_class_images=50, class_image_steps=30,
                             train_text_encoders=True))
    assert (r.rank, r.alpha, r.text_encoder_lr, r.checkpoint_every) == (16, 16.0, 1e-4, 25)
    assert r.validation_prompts == ("a photo of sks dog",) and r.train_text_encoders is True
    assert (r.instance_prompt, r.class_prompt) == ("a photo of sks dog", "a photo of a dog")   # written down
    full = TrainConfig(**BASE, method="full").with_defaults(
        dict(rank=16, resolution=512, steps=100, lr=1e-4, num_class_images=5, class_image_steps=5,
             train_text_encoders=True))
    assert full.train_text_encoders is True                    # the family default, for full as for adapters
    half = TrainConfig(**BASE, rank=16, half_rank=True).with_defaults(
        dict(resolution=512, steps=10, lr=1e-4, num_class_images=5, class_image_steps=5, train_text_encoders=False))
    assert (half.effective_rank, half.alpha) == (8, 8.0)       # DoRA†: half the rank, scale 1
    with pytest.raises(ValueError, match="no default for"):
        c.with_defaults({})


def test_default_prompts_follow_the_family():
    """The toy model's captions never say "a photo of": its presets phrase prompts as they do;
    SD / SDXL keep DreamBooth's phrasing. A prompt the user gave is kept as given."""
    assert {n: p["prompt_style"] for n, p in fam.TRAIN_PRESETS.items()} == {
        "toy": "caption", "sd1": "photo", "sd2": "photo", "sdxl": "photo"}
    assert default_prompts("sks", "star", "caption") == ("a sks star", "a star")
    assert default_prompts("zwx", "owl", "caption") == ("a zwx owl", "an owl")
    assert default_prompts("sks", "dog") == default_prompts("sks", "dog", "photo") == ("a photo of sks dog",
                                                                                        "a photo of a dog")
    with pytest.raises(ValueError, match="choose one of photo, caption"):
        default_prompts("sks", "dog", "poem")
    star = TrainConfig(**{**BASE, "class_noun": "star"})
    toy = replace(star, pivotal_tokens=0).with_defaults(fam.TRAIN_PRESETS["toy"] | {"resolution": 32})
    assert (toy.instance_prompt, toy.class_prompt, toy.validation_prompts) == ("a sks star", "a star", ("a sks star",))
    toy = star.with_defaults(fam.TRAIN_PRESETS["toy"] | {"resolution": 32})    # its default: pivotal tokens
    assert (toy.instance_prompt, toy.class_prompt) == ("a <s0><s1> star", "a star")
    sdxl = star.with_defaults(fam.TRAIN_PRESETS["sdxl"])
    assert (sdxl.instance_prompt, sdxl.class_prompt) == ("a photo of sks star", "a photo of a star")
    mine = TrainConfig(**{**BASE, "instance_prompt": "sks dog, studio light"}).with_defaults(
        fam.TRAIN_PRESETS["toy"] | {"resolution": 32})
    assert (mine.instance_prompt, mine.class_prompt) == ("<s0><s1> dog, studio light", "a dog")


def test_the_unet_targets_are_a_family_default():
    """The toy model trains every Linear layer at 2e-3 (docs/robustness.md: 27/32 unseen-subject
    runs learned against 14/32 with attention at 1e-3); SD/SDXL keep attention; a choice given is
    kept, and defaults that name no targets (another caller's dict) mean attention."""
    c = TrainConfig(**BASE)
    assert c.targets is None
    toy = c.with_defaults(fam.TRAIN_PRESETS["toy"] | {"resolution": 32})
    assert (toy.targets, toy.lr, toy.text_encoder_lr) == ("all-linear", 2e-3, 2e-3)
    assert {n: c.with_defaults(p | {"resolution": 64}).targets for n, p in fam.TRAIN_PRESETS.items()} == {
        "toy": "all-linear", "sd1": "attn", "sd2": "attn", "sdxl": "attn"}
    mine = TrainConfig(**BASE, targets="attn+ff").with_defaults(fam.TRAIN_PRESETS["toy"] | {"resolution": 32})
    assert mine.targets == "attn+ff"
    other = {k: v for k, v in fam.TRAIN_PRESETS["sd1"].items() if k != "targets"}
    assert c.with_defaults(other).targets == "attn"


def test_min_snr_is_a_family_default(tmp_path):
    """The toy model trains with plain MSE (pivotal tuning + plain MSE learned 31/36 robustness
    trainings over three seeds against Min-SNR γ 5's 27/36, docs/robustness.md); SD/SDXL keep
    Min-SNR γ 5. 0 is plain MSE, a γ given is kept, defaults that name none mean γ 5, a resumed run
    keeps its own loss, and a config.json written before the change reads as what it trained with
    (null was plain MSE, no field at all γ 5)."""
    c = TrainConfig(**BASE)
    assert c.min_snr_gamma is None
    assert {n: c.with_defaults(p | {"resolution": 64}).min_snr_gamma for n, p in fam.TRAIN_PRESETS.items()} == {
        "toy": 0.0, "sd1": 5.0, "sd2": 5.0, "sdxl": 5.0}
    toy = fam.TRAIN_PRESETS["toy"] | {"resolution": 32}
    assert TrainConfig(**BASE, min_snr_gamma=3.0).with_defaults(toy).min_snr_gamma == 3.0
    other = {k: v for k, v in fam.TRAIN_PRESETS["sd1"].items() if k != "min_snr_gamma"}
    assert c.with_defaults(other).min_snr_gamma == 5.0
    with pytest.raises(ValueError, match=r"min_snr_gamma -1.0: use 0 \(plain MSE\) or a positive"):
        TrainConfig(**BASE, min_snr_gamma=-1.0)

    run = TrainConfig(**BASE, min_snr_gamma=5.0).with_defaults(toy)    # a toy run from before: γ 5
    resumed = fill_from_run(TrainConfig(**BASE, resume=True), run).with_defaults(toy)
    assert resumed.min_snr_gamma == 5.0 and run.recipe_differences(resumed) == []
    assert fill_from_run(TrainConfig(**BASE, resume=True, min_snr_gamma=0.0), run).min_snr_gamma == 0.0

    write_config(tmp_path, run, {"family": "sdxl"})
    config_json = tmp_path / "config.json"
    data = json.loads(config_json.read_text())
    for recorded, read in ((None, 0.0), ("absent", 5.0), (2.0, 2.0)):
        data["config"]["min_snr_gamma"] = recorded
        if recorded == "absent":
            del data["config"]["min_snr_gamma"]
        config_json.write_text(json.dumps(data))
        assert read_config(tmp_path)[0].min_snr_gamma == read, recorded


def test_resume_keeps_the_prompts_a_run_was_trained_with():
    """A run made before the prompts were written into config.json (None there) was trained with
    the "photo" phrasing; resuming it with the toy's new defaults neither refuses nor changes them."""
    toy = fam.TRAIN_PRESETS["toy"] | {"resolution": 32}
    old = replace(TrainConfig(**BASE, pivotal_tokens=0).with_defaults(toy), instance_prompt=None,
                  class_prompt=None)                                # its config.json (from before pivotal tuning too)
    resumed = fill_from_run(TrainConfig(**BASE, resume=True), old).with_defaults(toy)
    assert (resumed.instance_prompt, resumed.class_prompt) == ("a photo of sks dog", "a photo of a dog")
    assert old.recipe_differences(resumed) == []
    assert old.recipe_differences(replace(resumed, instance_prompt="a sks dog")) == ["instance_prompt"]


def test_json_round_trip(tmp_path):
    c = TrainConfig(**BASE, validation_prompts=["a", "b"], adam_betas=[0.9, 0.99], rank=4).with_defaults(
        fam.TRAIN_PRESETS["sdxl"])                      # what a run records: the resolved config
    write_config(tmp_path, c, {"dorabooth_version": "x", "family": "sdxl"})
    again, extra = read_config(tmp_path)
    assert again == c and extra["family"] == "sdxl"
    assert again.validation_prompts == ("a", "b")
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_dict({**BASE, "learning_rate": 1})
    with pytest.raises(FileNotFoundError, match="not a dorabooth run folder"):
        read_config(tmp_path / "nothing")


def test_recipe_differences_ignore_run_mechanics_and_resume_overrides():
    a = TrainConfig(**BASE, steps=10)
    assert a.recipe_differences(TrainConfig(**BASE, steps=20, resume=True, checkpoint_every=5)) == []
    assert a.recipe_differences(TrainConfig(**BASE, steps=10, lr=1e-3, text_encoder_lr=1e-5, max_grad_norm=0.5)) == []
    assert a.recipe_differences(TrainConfig(**BASE, steps=10, rank=8, seed=3)) == ["rank", "seed"]


def test_device_fields_default_to_auto_and_round_trip(tmp_path):
    c = TrainConfig(**BASE)
    assert (c.mixed_precision, c.gradient_checkpointing, c.optimizer, c.cache_latents) == (None, None, None, True)
    assert TrainConfig.from_dict(c.to_dict()) == c                     # a queued request keeps "auto"
    old = {**BASE, "mixed_precision": "no", "gradient_checkpointing": False, "optimizer": "adamw",   # runs before auto
           "min_snr_gamma": 5.0}
    write_config(tmp_path, TrainConfig(**old), {"family": "sd1"})
    again, _ = read_config(tmp_path)
    assert (again.mixed_precision, again.gradient_checkpointing, again.optimizer) == ("no", False, "adamw")
    assert again.recipe_differences(TrainConfig(**old, resume=True)) == []
