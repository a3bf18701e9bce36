"""Merged exports: diffusers folders and original-layout single files.

* merged == un-merged forward (UNet and text encoders, fp32, max |Δ| / max |ref| ≤ 1e-5);
* ``from_single_file(path, config=folder)`` loads the single file and every weight equals
  the merged diffusers folder's (bit for bit, fp32);
* strength 0 == the base, bit for bit; several adapters == applied one after another;
* --dtype, the finiteness check, temp-then-rename, metadata, single-file bases keep their keys.
"""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import dorabooth
from dorabooth import inject
from dorabooth.export import export
from dorabooth.merging import MERGE_DEFINITION, merge_weights, pipeline_weight
from dorabooth.formats.adapter_files import read_adapter_file
from dorabooth.dora import axis_norm
from dorabooth.formats.neutral import adapted_weight
from export_helpers import BUILDERS, adapted
from tiny_models import text_encoder_output, unet_output

TOL = 1e-5
CLS = {"sd15": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl_wide": StableDiffusionXLPipeline}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", params=[("sd15", "out"), ("sd2", "in"), ("sdxl_wide", "in")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request, tmp_path_factory):
    kind, axis = request.param
    d = tmp_path_factory.mktemp(kind)
    base = d / "base"
    BUILDERS[kind]().save_pretrained(base)
    pipe = adapted(kind, axis)
    adapter = dorabooth.save_adapter(pipe, d / "adapter")
    return kind, axis, pipe, adapter, base, d


def test_merged_diffusers_equals_unmerged(case):
    kind, axis, pipe, adapter, base, d = case
    result = export(adapter, format="merged-diffusers", out=d / "merged", model=str(base))
    merged = CLS[kind].from_pretrained(result.path)
    assert rel(unet_output(merged), unet_output(pipe)) <= TOL
    for c in inject.pipeline_components(pipe):
        if c != "unet":
            assert rel(text_encoder_output(merged, c), text_encoder_output(pipe, c)) <= TOL
    meta = json.loads((result.path / "dorabooth_export.json").read_text())
    assert meta["dorabooth.adapters"][0]["strength"] == 1.0 and meta["dorabooth.merge"] == MERGE_DEFINITION
    assert meta["dorabooth.base_model"] == str(base)
    # the training pipeline was not touched: its layers are still un-merged adapters
    assert all(not layer.merged for layer in inject.iter_layers(pipe))


def test_merged_images_equal_unmerged_images(tmp_path):
    # one family is enough here: the UNet/text-encoder equality above covers every family
    kind, base = "sd15", tmp_path / "base"
    BUILDERS[kind]().save_pretrained(base)
    pipe = adapted(kind, "in")
    adapter = dorabooth.save_adapter(pipe, tmp_path / "adapter")
    d = tmp_path
    merged = CLS[kind].from_pretrained(export(adapter, format="merged-diffusers", out=d / "img", model=str(base)).path)

    def image(p):
        return p("a photo of sks dog", num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images

    a, b = image(pipe), image(merged)
    assert (a - b).abs().max().item() <= 1e-4, (a - b).abs().max().item()


def test_single_file_loads_with_from_single_file(case):
    kind, axis, pipe, adapter, base, d = case
    folder = export(adapter, format="merged-diffusers", out=d / "m2", model=str(base)).path
    single = export(adapter, format="merged-single-file", out=d / "merged.safetensors", model=str(base)).path
    a = CLS[kind].from_pretrained(folder)
    b = CLS[kind].from_single_file(str(single), config=str(base))
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, c, None) is None:
            continue
        sa, sb = getattr(a, c).state_dict(), getattr(b, c).state_dict()
        assert set(sa) == set(sb), c
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{c}.{k}"
    with safe_open(str(single), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    text_key = {"sdxl_wide": "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                "sd15": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"}[kind]
    assert text_key in keys and "model.diffusion_model.input_blocks.0.0.weight" in keys
    family = {"sd15": "sd1", "sd2": "sd2", "sdxl_wide": "sdxl"}[kind]
    assert meta["modelspec.architecture"] == {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512",
                                              "sdxl": "stable-diffusion-xl-v1-base"}[family]
    assert meta["dorabooth.family"] == family


def test_strength_zero_is_the_base_bit_for_bit(case):
    kind, axis, pipe, adapter, base, d = case
    out = export([(adapter, 0.0)], format="merged-diffusers", out=d / "zero", model=str(base)).path
    a, b = CLS[kind].from_pretrained(out), CLS[kind].from_pretrained(base)
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, c, None) is not None:
            sb = getattr(b, c).state_dict()
            assert all(torch.equal(v, sb[k]) for k, v in getattr(a, c).state_dict().items()), c
    single0 = export([(adapter, 0.0)], format="merged-single-file", out=d / "zero.safetensors", model=str(base)).path
    # a single-file base keeps every key and only the merged weights change
    single1 = export(adapter, format="merged-single-file", out=d / "from-single.safetensors",
                     model=str(single0), model_config=str(base)).path
    fresh = export(adapter, format="merged-single-file", out=d / "fresh.safetensors", model=str(base), overwrite=True).path
    s0, s1, sf = load_file(single0), load_file(single1), load_file(fresh)
    assert set(s0) == set(s1) == set(sf)
    assert all(torch.equal(s1[k], sf[k]) for k in s1)
    changed = {k for k in s0 if not torch.equal(s0[k], s1[k])}
    assert changed and all(("attn" in k) for k in changed)


def test_several_adapters_merge_one_after_another(case):
    kind, axis, pipe, adapter, base, d = case
    other = adapted(kind, "in" if axis == "out" else "out", seed=7)
    second = dorabooth.save_adapter(other, d / "second")
    a1, a2 = read_adapter_file(adapter), read_adapter_file(second)
    keys = sorted(set(a1.modules) | set(a2.modules))
    W0 = {k: pipeline_weight(pipe, k) for k in keys}
    both = merge_weights(W0, [(a1, 0.8), (a2, 0.6)])
    for k in keys:   # the documented definition, written out with the single-module formula
        W1 = adapted_weight(W0[k], a1.modules[k], 0.8)
        m2 = a2.modules[k]
        W2 = adapted_weight(W1, m2, 0.6, trained_norm=axis_norm(W0[k], m2.axis))
        assert torch.equal(both[k], W2)
    # one adapter alone == the live layer at that strength (DESIGN §3)
    layers = inject.pipeline_dora_modules(pipe)
    single = merge_weights(W0, [(a1, 0.8)])
    assert max(rel(single[k], layers[k].merged_weight(0.8)) for k in keys) <= 1e-6
    # and the export writes exactly that
    out = export([(adapter, 0.8), (second, 0.6)], format="merged-diffusers", out=d / "two", model=str(base)).path
    merged = CLS[kind].from_pretrained(out)
    for k in keys[:4]:
        comp, path = k.split(".", 1)
        m = getattr(merged, comp)
        w = m.get_submodule(inject.module_name(m, comp, path)).weight
        assert torch.equal(w, both[k])


def test_dtype_finiteness_and_atomic_write(case):
    kind, axis, pipe, adapter, base, d = case
    out = export(adapter, format="merged-single-file", out=d / "half.safetensors", model=str(base), dtype="fp16").path
    sd = load_file(out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    ref = load_file(export(adapter, format="merged-single-file", out=d / "full.safetensors", model=str(base)).path)
    assert all(torch.equal(sd[k], ref[k].half()) for k in sd)   # merged in fp32, then cast
    # a strength that blows a weight up to inf in fp16: refused, nothing written, no temp file left
    with pytest.raises(ValueError, match=r"not finite.*nothing was written"):
        export([(adapter, 1e6)], format="merged-single-file", out=d / "inf.safetensors", model=str(base), dtype="fp16")
    with pytest.raises(ValueError, match="not finite"):
        export([(adapter, 1e6)], format="merged-diffusers", out=d / "inf", model=str(base), dtype="fp16")
    assert not (d / "inf.safetensors").exists() and not (d / "inf").exists()
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(adapter, format="merged-single-file", out=d / "half.safetensors", model=str(base))
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export(adapter, format="merged-single-file", out=d / "x.ckpt", model=str(base))


def test_family_mismatch_is_refused(case, tmp_path):
    kind, axis, pipe, adapter, base, d = case
    other = "sdxl_wide" if kind != "sdxl_wide" else "sd15"
    BUILDERS[other]().save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="made for a .* model, but the base model is"):
        export(adapter, format="merged-diffusers", out=tmp_path / "x", model=str(tmp_path / "other"))


def test_export_from_the_live_training_pipeline(tmp_path):
    """Exporting from a pipeline with attached (even merged) adapters uses W0 and changes nothing."""
    pipe = adapted("sd15", "in")
    adapter = dorabooth.save_adapter(pipe, tmp_path / "a")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref = unet_output(pipe)
    dorabooth.merge(pipe)
    out = export(adapter, format="merged-diffusers", out=tmp_path / "m", pipe=pipe).path
    dorabooth.unmerge(pipe)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert rel(unet_output(StableDiffusionPipeline.from_pretrained(out)), ref) <= TOL
