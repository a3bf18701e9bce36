"""Merged exports of a full fine-tune (``--method full``, text encoders included): the
exported model holds the fine-tuned UNet and text encoder, at strength t the blend
W0 + t·(W − W0); adapter formats and combinations are refused with the way out."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from dorabooth.config import TrainConfig
from dorabooth.export import export
from dorabooth.models import load_pipeline
from dorabooth.train import train
from tiny_runs import make_subject, quick, save_model


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    base = save_model("sd15", d / "base")
    run = d / "run"
    train(TrainConfig(images=str(make_subject(d / "subject")), out=str(run), model=str(base), method="full",
                      **quick(prior_preservation=False, lr=1e-2, train_text_encoders=True)))
    return base, run, d


def _states(pipe):
    return {c: getattr(pipe, c).state_dict() for c in ("unet", "text_encoder")}


def test_merged_exports_hold_the_fine_tune(full_run):
    base, run, d = full_run
    tuned = {"unet": UNet2DConditionModel.from_pretrained(run / "unet").state_dict(),
             "text_encoder": CLIPTextModel.from_pretrained(run / "text_encoder").state_dict()}
    folder = export(run, format="merged-diffusers", out=d / "merged").path
    single = export(run, format="merged-single-file", out=d / "merged.safetensors").path
    a = _states(StableDiffusionPipeline.from_pretrained(folder))
    b = _states(StableDiffusionPipeline.from_single_file(str(single), config=str(base)))
    for c in tuned:
        for k, v in tuned[c].items():
            assert torch.equal(a[c][k], v), f"{c}.{k}"
            assert torch.equal(b[c][k], v), f"{c}.{k}"
    original = _states(load_pipeline(str(base))[0])
    assert any(not torch.equal(tuned["text_encoder"][k], original["text_encoder"][k]) for k in tuned["text_encoder"])


def test_strength_blends_and_the_callers_pipeline_is_restored(full_run):
    base, run, d = full_run
    pipe, _ = load_pipeline(str(base))
    before = {c: {k: v.clone() for k, v in sd.items()} for c, sd in _states(pipe).items()}
    tuned = UNet2DConditionModel.from_pretrained(run / "unet").state_dict()
    half = export([(run, 0.5)], format="merged-diffusers", out=d / "half", pipe=pipe).path
    got = StableDiffusionPipeline.from_pretrained(half).unet.state_dict()
    w0 = before["unet"]
    for k in tuned:
        want = w0[k] + 0.5 * (tuned[k] - w0[k])
        assert torch.allclose(got[k], want, atol=1e-6), k
    after = _states(pipe)
    assert all(torch.equal(after[c][k], v) for c, sd in before.items() for k, v in sd.items())
    zero = export([(run, 0.0)], format="merged-diffusers", out=d / "zero").path
    assert all(torch.equal(v, w0[k]) for k, v in StableDiffusionPipeline.from_pretrained(zero).unet.state_dict().items())


def test_adapter_formats_and_combinations_are_refused(full_run, tmp_path):
    _, run, _ = full_run
    with pytest.raises(ValueError, match="not an adapter; export it with --format merged-single-file"):
        export(run, format="diffusers-lora", out=tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="cannot be combined"):
        export([(run, 1.0), (run, 0.5)], format="merged-diffusers", out=tmp_path / "b")
