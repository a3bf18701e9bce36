"""A run planned from configs alone: the base model's spec, trainable counts equal to a real
attach, the memory estimate's terms (they add up; each follows its formula), the published
full-size architectures on the meta device, --resume's "auto" fields."""

import json
from dataclasses import replace

import pytest
import torch

from dorabooth import families as fam
from dorabooth.config import TrainConfig
from dorabooth.devices import DeviceInfo, resolve_device_settings
from dorabooth.memory import (ACTIVATIONS, HALF_PRECISION_ACTIVATIONS, MEASURED_UNET, VAE_DECODE, _curve,
                              estimate_memory, fill_from_run, plan_run, unet_batch_items)
from dorabooth.specs import model_spec, trainable_parameters
from dorabooth.testing.fullsize import CONFIGS, PARAMS
from dorabooth.train import setup_method
from tiny_runs import MAKERS, save_model

GiB = 2**30
CPU = DeviceInfo("cpu", "CPU", 24 * GiB, adamw8bit_problem="needs CUDA")
A10 = DeviceInfo("cuda", "NVIDIA A10G", 24 * GiB, bf16=True, fp16=True, adamw8bit_problem=None)


def config(**kw):
    return TrainConfig(images="imgs", class_noun="dog", out="run", **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: str(save_model(kind, root / kind)) for kind in ("sd15", "sdxl", "sd2")}


def published(tmp_path, name):
    """A folder with a full-size model's published configs and no weights."""
    folder = tmp_path / name
    if (folder / "model_index.json").is_file():
        return str(folder)
    index = {"_class_name": CONFIGS[name]["model_index"]["_class_name"], **CONFIGS[name]["model_index"]}
    for component, spec in index.items():
        if isinstance(spec, list) and spec[0] is not None and component in CONFIGS[name]:
            file = "scheduler_config.json" if component == "scheduler" else "config.json"
            (folder / component).mkdir(parents=True, exist_ok=True)
            (folder / component / file).write_text(json.dumps(CONFIGS[name][component]))
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd2"])
def test_spec_from_configs_matches_the_loaded_pipeline(folders, kind):
    spec = model_spec(folders[kind])
    pipe = MAKERS[kind]()
    family = fam.detect_family(pipe)
    assert spec.family == family and spec.preset == fam.preset_name(family, pipe) == "toy"
    assert spec.defaults == fam.train_defaults(family, pipe) and spec.size_multiple == fam.size_multiple(pipe)
    real = {c: sum(p.numel() for p in getattr(pipe, c).parameters())
            for c in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}
    assert spec.parameters == real
    assert all(p.is_meta for m in spec.modules.values() for p in m.parameters())      # nothing allocated


ATTACH = [dict(method="dora"), dict(method="dora", magnitude_axis="in", rank=3), dict(method="lora"),
          dict(method="dora", targets="attn+ff", train_text_encoders=True), dict(method="dora", half_rank=True),
          dict(method="full"), dict(method="full", train_text_encoders=True),
          dict(method="lora", targets="cross-attn", train_text_encoders=True)]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("fields", ATTACH, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_trainable_count_equals_a_real_attach(folders, kind, fields):
    spec = model_spec(folders[kind])
    c = config(**{"rank": 4, "train_text_encoders": False, **fields}).with_defaults(spec.defaults)
    params = setup_method(MAKERS[kind](), c)
    real: dict[str, int] = {}
    for name, p in params.items():
        component = name.split(".")[0]
        real[component] = real.get(component, 0) + p.numel()
    assert trainable_parameters(spec, c) == real


def test_target_and_rank_errors_come_before_any_weight(folders):
    spec = model_spec(folders["sd15"])
    with pytest.raises(ValueError, match=r"rank 40 is larger than min\(in, out\).*lower --rank"):
        trainable_parameters(spec, config(rank=40).with_defaults(spec.defaults))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        trainable_parameters(spec, config(rank=4, targets="nothing_here").with_defaults(spec.defaults))


def test_published_architectures_on_the_meta_device(tmp_path):
    for name in ("sd15", "sd21", "sdxl"):
        spec = model_spec(published(tmp_path, name))
        assert spec.parameters == PARAMS[name] and spec.published_architecture() == name
    sd15 = model_spec(published(tmp_path, "sd15"))
    lora4 = config(method="lora", rank=4, train_text_encoders=False).with_defaults(sd15.defaults)
    assert trainable_parameters(sd15, lora4) == {"unet": 797_184}     # the well-known SD 1.5 attn LoRA r=4 count
    dora16 = replace(lora4, method="dora", rank=16, alpha=16.0)
    assert trainable_parameters(sd15, dora16) == {"unet": 4 * 797_184 + 99_840}   # + one magnitude per out row


def curve(family, ckpt, x):
    a, b, c = ACTIVATIONS[family][ckpt]
    return a + b * x + c * x * x


def test_activation_curves_go_through_the_measurements():
    for family, by_ckpt in MEASURED_UNET.items():
        for ckpt, points in by_ckpt.items():
            for resolution, measured in points.items():
                assert curve(family, ckpt, (resolution // 8) ** 2) == pytest.approx(measured, rel=1e-9)
            assert curve(family, ckpt, 160 * 160) > max(points.values())           # grows with the size
    assert _curve({256: 100, 512: 400}) == pytest.approx((0.0, 300 / 3072, 0.0))    # two points: the line
    assert all(ckpt_on < ckpt_off for ckpt_on, ckpt_off in
               ((curve(f, True, 4096), curve(f, False, 4096)) for f in MEASURED_UNET))     # checkpointing saves


def test_estimate_terms_follow_the_formula(tmp_path):
    spec = model_spec(published(tmp_path, "sd15"))
    c = config().with_defaults(spec.defaults)                           # 512 px, DoRA r16, prior on
    settings = resolve_device_settings(c, spec.preset, CPU)
    e = estimate_memory(spec, settings.apply(c), settings, CPU.memory)
    terms = {t.name: t.bytes for t in e.terms}
    n = trainable_parameters(spec, c)["unet"]
    p = PARAMS["sd15"]
    assert terms["frozen weights"] == 4 * (p["unet"] + p["vae"] + p["text_encoder"])
    assert (terms["trainable (fp32)"], terms["gradients (fp32)"], terms["optimizer state"]) == (4 * n, 4 * n, 8 * n)
    assert unet_batch_items(c) == 2 and terms["activations"] == int(2 * curve("sd1", False, 64 * 64))
    assert e.total == sum(terms.values()) and "total" in e.table() and "of it" in e.table()
    va, vb, vc = VAE_DECODE                                            # sampling: the other peak
    decode = int(va + vb * 64 * 64 + vc * 64 * 64 * 64 * 64)
    assert e.sampling.bytes == terms["frozen weights"] + 12 * n + decode and e.peak == max(e.total, e.sampling.bytes)

    bf16 = resolve_device_settings(c, spec.preset, A10)                 # bf16, 8-bit AdamW
    half = {t.name: t.bytes for t in estimate_memory(spec, bf16.apply(c), bf16).terms}
    assert half["frozen weights"] == 2 * (p["unet"] + p["text_encoder"]) + 4 * p["vae"]       # VAE stays fp32
    assert half["optimizer state"] == 2 * n
    assert half["activations"] == int(2 * curve("sd1", False, 64 * 64) * HALF_PRECISION_ACTIVATIONS)


def test_activations_scale_with_batch_resolution_and_checkpointing(tmp_path):
    spec = model_spec(published(tmp_path, "sdxl"))

    def acts(**kw):
        c = config(**kw).with_defaults(spec.defaults)
        s = resolve_device_settings(c, spec.preset, CPU)
        return {t.name: t.bytes for t in estimate_memory(spec, s.apply(c), s).terms}["activations"]

    one = curve("sdxl", True, 128 * 128)                                # SDXL: checkpointing on by default
    assert acts(resolution=1024) == int(2 * one)
    assert acts(resolution=1024, prior_preservation=False) == int(one)
    assert acts(resolution=1024, batch_size=2, prior_preservation=False) == int(2 * one)
    assert acts(resolution=512, gradient_checkpointing=False) > acts(resolution=512)
    assert acts(resolution=512, train_text_encoders=True) > acts(resolution=512)


def test_plan_turns_checkpointing_on_when_the_estimate_does_not_fit(tmp_path):
    spec = model_spec(published(tmp_path, "sd15"))
    roomy = plan_run(config(), spec, A10)
    assert roomy.settings.gradient_checkpointing is False and roomy.config.mixed_precision == "bf16"
    small = DeviceInfo("cuda", "small GPU", int(roomy.estimate.total / 0.95), bf16=True, fp16=True)
    tight = plan_run(config(), spec, small)
    assert tight.settings.gradient_checkpointing is True and tight.estimate.total < roomy.estimate.total
    assert "is over 90%" in " ".join(tight.settings.reasons)
    xl = plan_run(config(), model_spec(published(tmp_path, "sdxl")), A10)
    assert xl.config.gradient_checkpointing is True and xl.config.resolution == 1024
    with pytest.raises(ValueError, match="not a multiple of 64"):
        plan_run(config(resolution=520), spec, A10)


def test_single_file_without_configs_uses_the_published_ones(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"               # keys say SD 1.x; no tensor is read for the spec
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}, str(path))
    spec = model_spec(str(path))
    assert spec.family.name == "sd1" and spec.parameters == PARAMS["sd15"] and "published SD1" in spec.source


def test_resume_keeps_the_runs_own_device_settings():
    old = config(mixed_precision="fp16", gradient_checkpointing=True, optimizer="adamw")
    filled = fill_from_run(config(resume=True), old)
    assert (filled.mixed_precision, filled.gradient_checkpointing, filled.optimizer) == ("fp16", True, "adamw")
    given = fill_from_run(config(resume=True, mixed_precision="no"), old)
    assert given.mixed_precision == "no" and given.optimizer == "adamw"   # a change of mechanics is the user's
