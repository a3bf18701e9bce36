"""Interop at real dimensions: the published SD 1.5, SD 2.1 and SDXL architectures (and
non-standard UNets), checked against how ComfyUI and A1111 name modules and which bases they
load, and against diffusers' own single-file conversion.

Key names and shapes run in CI on models built on the meta device from the published configs
(every module and shape of the real model, no memory, seconds). The consumer report's weight
errors run on full-width slices (a few modules per level at their real widths, random W0 like
the fixtures'): each module's error depends on that module alone, and 2.6 B weights in fp32 do
not fit a CI runner. Loading merged checkpoints needs the fixtures' weights and runs with
DORABOOTH_REALSCALE=1 (``python -m dorabooth.testing.fullsize build sd15 sdxl`` first).

ComfyUI and A1111 are reimplemented in tests/interop_keymaps.py (not vendored: GPL/AGPL).
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from interop_keymaps import (
    DIFFUSION,
    a1111_applied,
    a1111_layer_mapping,
    a1111_layer_name,
    a1111_load,
    adapter_over,
    comfy_detect_unet_config,
    comfy_key_map,
    comfy_load_lora,
    file_modules,
    meta_components,
    original_shapes,
)
from safetensors import safe_open

from dorabooth import describe
from dorabooth.export import export
from dorabooth.formats import adapter_files
from dorabooth.formats.consumers import comfy_key_map as report_comfy_key_map
from dorabooth.formats.files import SafetensorsReader, read_metadata
from dorabooth.formats.layout import UNetLayout
from dorabooth.formats.neutral import Adapter, ModuleAdapter
from dorabooth.formats.single_file import Mapper, image_spec, modelspec
from dorabooth.formats.tool_bases import a1111_base_problem, comfy_base_model
from dorabooth.inject import canonical_name
from dorabooth.testing import fullsize

REALSCALE = os.environ.get("DORABOOTH_REALSCALE") == "1"
CLIP = {("sd1", "text_encoder"): "clip_l", ("sd2", "text_encoder"): "clip_h",
        ("sdxl", "text_encoder"): "clip_l", ("sdxl", "text_encoder_2"): "clip_g"}
# Non-standard UNets at real widths: KOALA-700M's layout (SDXL with one resnet per level and
# 1/2/5 transformer layers; ComfyUI has a class for it) and SD 1.5 with one resnet per level.
VARIANTS = {"koala": ("sdxl", {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5]}),
            "sd15-lpb1": ("sd15", {"layers_per_block": 1})}

_built: dict = {}


def built(name: str):
    """(family, meta components, single-file key shapes) of a fixture or a variant, made once."""
    if name not in _built:
        base, overrides = VARIANTS.get(name, (name, None))
        comps = meta_components(base, overrides)
        family = fullsize.FAMILY[base]
        _built[name] = family, comps, original_shapes(family, comps)
    return _built[name]


def meta_pipe(comps):
    """What the consumer report reads off a pipeline: component configs."""
    return SimpleNamespace(**{c: m for c, m in comps.items() if c != "vae"})


def read_file(path):
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys if k.endswith(("lora_up.weight", "lora_down.weight"))}
    return keys, tensors


def expected_targets(family, comps, key):
    """(ComfyUI's model weight key, A1111's layer name) of the module a neutral adapter key names."""
    mapper = Mapper(family, comps["unet"].config, comps["vae"].config)
    component, path = key.split(".", 1)
    t = mapper.target(component, path + ".weight")
    comfy = "diffusion_model." + t.key[len(DIFFUSION):] if component == "unet" else \
        f"{CLIP[family, component]}.transformer.{path}.weight"
    return comfy, a1111_layer_name(family, t.key)


def check_names(family, comps, shapes, path, *, a1111=True):
    """Every module of the kohya file at ``path`` lands, in both tools' key maps, on the module it
    was made for, with its shape; ComfyUI reads every key. Returns (ComfyUI, A1111) counts."""
    keys, tensors = read_file(path)
    modules = file_modules(keys, tensors)
    adapter = adapter_files.read_adapter_file(path)
    assert set(adapter.file_names.values()) == set(modules)
    key_map, model = comfy_key_map(shapes, family)
    patched, loaded = comfy_load_lora(keys, key_map)
    assert loaded == set(keys), sorted(set(keys) - loaded)[:5]              # no "lora key not loaded"
    mapping = a1111_layer_mapping(family, shapes)
    applied = a1111_applied(a1111_load(modules, mapping), mapping)
    for key, name in adapter.file_names.items():
        comfy, layer = expected_targets(family, comps, key)
        assert patched.get(name) == comfy and model[comfy] == modules[name], (name, patched.get(name), comfy)
        if a1111:
            assert a1111_load([name], mapping)[name][1] == layer, name
            assert applied.get(name) == modules[name], name
    return len(patched), len(applied)


# ---- kohya names at full size --------------------------------------------------------------------
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_kohya_export_names_are_the_tools_own(tmp_path, name, axis):
    """A DoRA on every Linear of the UNet and q/k/v/out of every text-encoder layer, exported as
    kohya by ``dorabooth export`` without the base: each module name is one ComfyUI's and A1111's
    key maps produce for the real model, on the module it was trained on; the consumer report
    (given the real configs) says both apply every module."""
    family, comps, shapes = built(name)
    adapter = adapter_over(comps, family, axis)
    path = export(adapter, format="kohya", out=tmp_path / "k.safetensors").path
    comfy, a1111 = check_names(family, comps, shapes, path)
    n = len(adapter.modules)
    assert comfy == a1111 == n > 200
    written = adapter_files.read_adapter_file(path)
    report = {v.consumer: v for v in describe.consumer_report(written, family, meta_pipe(comps))}
    assert (report["ComfyUI"].applied, report["A1111"].applied) == (n, n)
    assert report["ComfyUI"].status == report["A1111"].status == ("exact" if axis == "in" else "approximate")
    assert UNetLayout.from_json(json.loads(written.metadata["dorabooth.unet_layout"])) == \
        UNetLayout.from_config(comps["unet"].config) == UNetLayout.from_original_keys(shapes)


def test_the_reports_comfyui_key_map_is_comfyuis_at_full_size():
    """consumers.comfy_key_map (what the report uses) gives, for every kohya UNet and text-encoder
    name, the module ComfyUI's own key map reaches (ComfyUI's config read off the checkpoint)."""
    for name in ("sd15", "sd21", "sdxl", "koala", "sd15-lpb1"):
        family, comps, shapes = built(name)
        te = {c: m.config.num_hidden_layers for c, m in comps.items() if c.startswith("text_encoder")}
        ours = report_comfy_key_map(family, comps["unet"].config, te)
        theirs, _ = comfy_key_map(shapes, family)
        mapper = Mapper(family, comps["unet"].config, comps["vae"].config)
        linear = {f"{c}.{canonical_name(m, c, n)}" for c, m in comps.items() if c != "vae"
                  for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)}
        checked = 0
        for file_name, key in ours.items():
            if not file_name.startswith(("lora_unet_", "lora_te")) or key not in linear:
                continue
            component, path = key.split(".", 1)
            comfy = theirs[file_name]
            want = "diffusion_model." + mapper.target(component, path + ".weight").key[len(DIFFUSION):] \
                if component == "unet" else f"{CLIP[family, component]}.transformer.{path}.weight"
            assert comfy == want, (name, file_name)
            checked += 1
        assert checked > len(linear), name            # each module under its sgm and its diffusers name


def test_comfyui_reads_the_published_configs_off_our_single_files():
    """ComfyUI's detect_unet_config on our single files' keys gives the published architectures
    (so its names for them are the standard ones) and the classes it loads them as."""
    want = {"sd15": ([2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0], 1, 768, "SD15"),
            "sd21": ([2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0], 1, 1024, "SD20"),
            "sdxl": ([2, 2, 2], [0, 0, 2, 2, 10, 10], 10, 2048, "SDXL"),
            "koala": ([1, 1, 1], [0, 2, 5], 5, 2048, "KOALA_700M"),
            "sd15-lpb1": ([1, 1, 1, 1], [1, 1, 1, 0], 1, 768, "SD15")}
    for name, (res, depth, middle, context, cls) in want.items():
        family, comps, shapes = built(name)
        cfg = comfy_detect_unet_config(shapes)
        assert (cfg["num_res_blocks"], cfg["transformer_depth"], cfg["transformer_depth_middle"],
                cfg["context_dim"], cfg["model_channels"]) == (res, depth, middle, context, 320), name
        assert comfy_base_model(comps["unet"].config) == cls, name
        assert (a1111_base_problem(family, comps["unet"].config) is None) == (name in ("sd15", "sd21", "sdxl")), name


# ---- the toy and other non-standard UNets ---------------------------------------------------------
@pytest.mark.parametrize("name", ["koala", "sd15-lpb1"])
def test_non_standard_unets_get_comfyuis_config_numbering_and_a1111_is_ruled_out(tmp_path, name):
    """One resnet per level at real widths: kohya names follow the config (the numbering ComfyUI
    computes and loads these bases with); A1111, whose configs and key conversion assume 2,
    cannot load the base, and the report says so."""
    family, comps, shapes = built(name)
    adapter = adapter_over(comps, family, "in")
    layout = UNetLayout.from_config(comps["unet"].config)
    path = adapter_files.write_kohya(adapter, tmp_path / "k.safetensors", family=family, layout=layout)
    comfy, _ = check_names(family, comps, shapes, path, a1111=False)
    assert comfy == len(adapter.modules)
    report = {v.consumer: v for v in describe.consumer_report(adapter_files.read_adapter_file(path), family,
                                                                meta_pipe(comps))}
    assert report["ComfyUI"].status == "exact" and report["ComfyUI"].applied == comfy
    assert report["A1111"].status == "fails to load" and report["A1111"].applied == 0
    assert "A1111 cannot load this base model at all" in report["A1111"].why
    assert "layers_per_block 1 (needs 2)" in report["A1111"].why


def test_toy_kohya_export_follows_its_config_with_or_without_the_base(tmp_path):
    """The embedded toy (layers_per_block 1): `dorabooth export --format kohya` numbers its
    blocks from the toy's own config whether or not --model is given (without it, from the base
    the adapter records); every name is where ComfyUI's config-derived map puts it; the report
    says neither ComfyUI nor A1111 can load the toy itself (no ComfyUI class matches its
    32-channel UNet; A1111 hard-codes layers_per_block 2)."""
    import dorabooth
    from dorabooth.models import load_pipeline

    base, _ = load_pipeline("toy")
    shapes = original_shapes("sdxl", {c: getattr(base, c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")})
    pipe, _ = load_pipeline("toy")
    dorabooth.attach(pipe, rank=2, text_encoders=True, magnitude_axis="in")
    src = dorabooth.save_adapter(pipe, tmp_path / "run")
    for kwargs in ({}, {"pipe": base}):
        result = export(src, format="kohya", out=tmp_path / f"k{len(kwargs)}.safetensors", **kwargs)
        keys, tensors = read_file(result.path)
        modules = file_modules(keys, tensors)
        key_map, model = comfy_key_map(shapes, "sdxl")
        patched, loaded = comfy_load_lora(keys, key_map)
        assert loaded == set(keys) and len(patched) == len(modules) == 88
        adapter = adapter_files.read_adapter_file(result.path)
        mapper = Mapper("sdxl", base.unet.config, base.vae.config)
        for key, file_name in adapter.file_names.items():
            if key.startswith("unet."):
                want = mapper.target("unet", key[len("unet."):] + ".weight").key
                assert patched[file_name] == "diffusion_model." + want[len(DIFFUSION):], file_name
                assert model[patched[file_name]] == modules[file_name]
        assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in modules     # 1 + 1·(1+1)
        report = {v.consumer: v for v in result.report}
        assert report["A1111"].status == report["ComfyUI"].status == "fails to load"
        assert "layers_per_block 1 (needs 2)" in report["A1111"].why
        assert "block_out_channels[0] 32 (needs 320)" in report["ComfyUI"].why


# ---- the report's weight errors at full width -----------------------------------------------------
SLICE = {"sd15": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                  "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
                  "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                  "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0"],
         "sdxl": ["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                  "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
                  "mid_block.attentions.0.transformer_blocks.4.attn2.to_v",
                  "up_blocks.0.attentions.2.transformer_blocks.9.attn1.to_out.0"]}


def _slice_adapter(comps, family, axis, g):
    """Full-width DoRA modules with ‖s·B·A‖ about 5 % of ‖W0‖ and magnitudes ±10 %, and their W0
    (N(0, 0.02²), as the fixtures' weights)."""
    skeleton = adapter_over(comps, family, axis, unet_targets=SLICE["sdxl" if family == "sdxl" else "sd15"],
                            te_layers=(0, -1))
    modules, weights = {}, {}
    for key, m in skeleton.modules.items():
        W0 = torch.randn(m.out_features, m.in_features, generator=g) * 0.02
        rank = 4
        down = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
        up = torch.randn(m.out_features, rank, generator=g) * 0.02 * 0.05 / rank ** 0.5
        V = W0 + up @ down
        norm = torch.linalg.vector_norm(V, dim=1 if axis == "out" else 0)
        modules[key] = ModuleAdapter(down, up, 1.0, norm * (1 + 0.1 * torch.randn(norm.shape, generator=g)), axis)
        weights[key] = W0
    return Adapter(modules=modules, family=family, format="test"), weights


def _rel(a, b):
    return float(torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double()))


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_report_errors_at_full_width(tmp_path, name, axis):
    """The report's per-tool weight errors on full-width modules, against each tool's formula
    written out here: ComfyUI (1, in) V·m/‖V‖_col, (out, 1) V·m/‖W0‖_row (PR #15458); A1111 always
    V·dora_scale/‖V‖_col; diffusers V (dora_scale dropped); DoRA itself V·m/‖V‖ along the axis."""
    family, comps, _ = built(name)
    adapter, weights = _slice_adapter(comps, family, axis, torch.Generator().manual_seed(1))
    path = export(adapter, format="kohya", out=tmp_path / "k.safetensors").path
    written = adapter_files.read_adapter_file(path)
    report = {v.consumer: v for v in describe.consumer_report(written, family, meta_pipe(comps), weights)}
    errors = {"ComfyUI": [], "A1111": [], "diffusers": []}
    for key, m in written.modules.items():
        W0 = weights[key]
        V = W0 + m.scale * m.up @ m.down
        col, row = torch.linalg.vector_norm(V, dim=0), torch.linalg.vector_norm(V, dim=1)
        W = V * (m.magnitude / row)[:, None] if axis == "out" else V * (m.magnitude / col)[None, :]
        ds = m.magnitude[:, None] if axis == "out" else m.magnitude[None, :]          # the stored dora_scale
        comfy = V * ds / torch.linalg.vector_norm(W0, dim=1, keepdim=True) if axis == "out" else V * ds / col
        errors["ComfyUI"].append(_rel(comfy, W))
        errors["A1111"].append(_rel(V * ds / col, W))
        errors["diffusers"].append(_rel(V, W))
    assert len(written.modules) == 4 + 8 * (2 if family == "sdxl" else 1)    # + layers 0 and -1 of each encoder
    for consumer, errs in errors.items():
        v = report[consumer]
        assert v.applied == v.total == len(written.modules)
        assert v.max_rel_error == pytest.approx(max(errs), rel=1e-3, abs=1e-6), consumer
    exact = {"ComfyUI": axis == "in", "A1111": axis == "in", "diffusers": False}
    for consumer, is_exact in exact.items():
        assert report[consumer].status == ("exact" if is_exact else "approximate"), consumer
        assert (max(errors[consumer]) < 1e-5) == is_exact, consumer


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_report_on_a_diffusers_lora_file_at_full_width(tmp_path, name):
    """The diffusers/PEFT file of the same adapter: ComfyUI reads only its text-encoder LoRA parts
    (scale 1, no alpha key; UNet keys and magnitudes unread), A1111 nothing."""
    family, comps, _ = built(name)
    adapter, weights = _slice_adapter(comps, family, "out", torch.Generator().manual_seed(2))
    path = export(adapter, format="diffusers-lora", out=tmp_path / "d").path
    written = adapter_files.read_adapter_file(path)
    report = {v.consumer: v for v in describe.consumer_report(written, family, meta_pipe(comps), weights)}
    te = [k for k in written.modules if not k.startswith("unet.")]
    errs = []
    for key, m in written.modules.items():              # UNet modules stay W0 in ComfyUI
        V = weights[key] + m.scale * m.up @ m.down
        W = V * (m.magnitude / torch.linalg.vector_norm(V, dim=1))[:, None]
        errs.append(_rel(weights[key] + m.up @ m.down if key in te else weights[key], W))
    assert report["ComfyUI"].status == "approximate" and report["ComfyUI"].applied == len(te) > 0
    assert report["ComfyUI"].max_rel_error == pytest.approx(max(errs), rel=1e-3)
    assert report["A1111"].status == "not applied" and report["A1111"].applied == 0


# ---- merged single files -------------------------------------------------------------------------
@pytest.mark.parametrize("name", fullsize.NAMES)
def test_single_file_keys_and_shapes_are_diffusers_own(name):
    """Every key our Mapper writes for the full-size model converts back through diffusers' own
    single-file converters to the same diffusers key and shape (SD 2.1: OpenCLIP-H, 23 layers)."""
    family, comps, shapes = built(name)
    original = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    assert sfu.infer_diffusers_model_type(original) == {"sd15": "v1", "sd21": "v2", "sdxl": "xl_base"}[name]
    back = {"unet": sfu.convert_ldm_unet_checkpoint(original, comps["unet"].config),
            "vae": sfu.convert_ldm_vae_checkpoint(original, comps["vae"].config)}
    if family == "sd1":
        back["text_encoder"] = sfu.convert_ldm_clip_checkpoint(original)
    elif family == "sd2":
        back["text_encoder"] = sfu.convert_open_clip_checkpoint(comps["text_encoder"], original,
                                                                prefix="cond_stage_model.model.")
    else:
        back["text_encoder"] = sfu.convert_ldm_clip_checkpoint(
            {k: v for k, v in original.items() if k.startswith("conditioner.embedders.0.")})
        back["text_encoder_2"] = sfu.convert_open_clip_checkpoint(comps["text_encoder_2"], original,
                                                                  prefix="conditioner.embedders.1.model.")
    for c, model in comps.items():
        sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        b = {k: v for k, v in back[c].items() if not k.endswith("position_ids")}
        if c.startswith("text_encoder") and not hasattr(model, "text_model"):
            b = {k.removeprefix("text_model."): v for k, v in b.items()}      # transformers 5 CLIPTextModel
        assert set(b) == set(sd), (c, sorted(set(b) ^ set(sd))[:4])
        assert all(tuple(b[k].shape) == tuple(v.shape) for k, v in sd.items()), c


def test_sd2_single_file_has_no_24th_block_or_projection_and_modelspec_follows_the_model():
    """diffusers' SD 2.x text encoder has 23 of OpenCLIP-H's 24 blocks and no text_projection (SD 2
    reads the penultimate layer), so a file written from a diffusers folder has neither; the
    header names the 768 v-prediction architecture from the pipeline, not the 512 one."""
    shapes = built("sd21")[2]
    p = "cond_stage_model.model."
    assert p + "transformer.resblocks.22.attn.in_proj_weight" in shapes
    assert p + "transformer.resblocks.23.attn.in_proj_weight" not in shapes and p + "text_projection" not in shapes
    config = fullsize.CONFIGS["sd21"]
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(**config["unet"])),
                           vae=SimpleNamespace(config=SimpleNamespace(**config["vae"])),
                           scheduler=SimpleNamespace(config=SimpleNamespace(**config["scheduler"])))
    spec = modelspec("sd2", "t", **image_spec(pipe))
    assert (spec["modelspec.architecture"], spec["modelspec.resolution"], spec["modelspec.prediction_type"]) == \
        ("stable-diffusion-v2-768-v", "768x768", "v")
    base = modelspec("sd2", "t", resolution=512, prediction_type="epsilon")
    assert (base["modelspec.architecture"], base["modelspec.resolution"]) == ("stable-diffusion-v2-512", "512x512")
    assert modelspec("sdxl", "t")["modelspec.resolution"] == "1024x1024"


@pytest.mark.parametrize("prediction, arch", [("v_prediction", "stable-diffusion-v2-768-v"),
                                              ("epsilon", "stable-diffusion-v2-512")])
def test_sd2_exports_name_the_architecture_the_base_predicts(tmp_path, prediction, arch):
    """A (tiny) SD 2.x base's scheduler decides the modelspec architecture of the merged single file
    and of the kohya file exported with the base."""
    from diffusers import DDIMScheduler
    from export_helpers import BUILDERS, adapted

    import dorabooth

    src = dorabooth.save_adapter(adapted("sd2", "out"), tmp_path / "a")
    base = BUILDERS["sd2"]()
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config, prediction_type=prediction)
    single = export(src, format="merged-single-file", out=tmp_path / "m.safetensors", pipe=base).path
    kohya = export(src, format="kohya", out=tmp_path / "k.safetensors", pipe=base).path
    side = base.unet.config.sample_size * 2 ** (len(base.vae.config.block_out_channels) - 1)
    for path, suffix in ((single, ""), (kohya, "/lora")):
        meta = read_metadata(path)[1]
        assert meta["modelspec.architecture"] == arch + suffix
        assert meta["modelspec.resolution"] == f"{side}x{side}"
        assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")


def _merged_adapter(name: str, axis: str, seed: int = 0) -> Adapter:
    """A DoRA on every attention projection and text-encoder q/k/v/out of the full-size model,
    with updates a few % of the fixtures' N(0, 0.02²) weights and magnitudes ±10 %."""
    family, comps, _ = built(name)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key, m in adapter_over(comps, family, axis, unet_targets="attn", rank=4, seed=seed).modules.items():
        down = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5
        up = torch.randn(m.out_features, 4, generator=g) * 1e-3
        n = m.out_features if axis == "out" else m.in_features
        other = m.in_features if axis == "out" else m.out_features
        magnitude = 0.02 * other ** 0.5 * (1 + 0.1 * torch.randn(n, generator=g))
        modules[key] = ModuleAdapter(down, up, 1.0, magnitude, axis)
    return Adapter(modules=modules, family=family, format="test")


def _folder_tensors(folder: Path, component: str):
    """(key, tensor) of a component's weights, one tensor at a time (SDXL's UNet is 5 GB in fp16)."""
    for f in sorted((folder / component).glob("*.safetensors")):
        yield from fullsize._read_tensors(f)


def _folder_readers(folder: Path, component: str) -> list[SafetensorsReader]:
    """A reader per weight file of a component (each header read once; tensors read when asked)."""
    return [SafetensorsReader(f) for f in sorted((folder / component).glob("*.safetensors"))]


@pytest.mark.skipif(not REALSCALE, reason="merges into the 2 GB SD 1.5 / 7 GB SDXL fixtures; set DORABOOTH_REALSCALE=1")
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_merged_single_file_loads_in_diffusers_bit_equal_to_the_merged_folder(tmp_path, name):
    """A full-size DoRA merged (fp16) into the fixture, as a diffusers folder and as a single file
    (from the folder base and from the single-file base): stock ``from_single_file(file,
    config=merged folder)`` loads every weight of both files bit-equal to the merged folder."""
    import diffusers

    from dorabooth.models import NO_SAFETY_CHECKER

    if not fullsize.is_built(name):
        pytest.skip(f"build the fixture first: python -m dorabooth.testing.fullsize build {name}")
    folder, single = fullsize.paths(name)
    adapter = _merged_adapter(name, "out")
    merged = export(adapter, format="merged-diffusers", out=tmp_path / "merged", model=str(folder), dtype="fp16").path
    from_folder = export(adapter, format="merged-single-file", out=tmp_path / "a.safetensors", model=str(folder),
                         dtype="fp16").path
    from_file = export(adapter, format="merged-single-file", out=tmp_path / "b.safetensors", model=str(single),
                       model_config=str(folder), dtype="fp16").path
    cls = getattr(diffusers, fullsize.CONFIGS[name]["model_index"]["_class_name"])
    extra = {} if name == "sdxl" else dict(NO_SAFETY_CHECKER)
    changed = 0
    for path in (from_folder, from_file):
        meta = read_metadata(path)[1]
        assert meta["modelspec.architecture"] == {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}[name]
        pipe = cls.from_single_file(str(path), config=str(merged), torch_dtype=torch.float16, **extra)
        for component in fullsize.weight_components(name):
            loaded = getattr(pipe, component).state_dict()
            readers = _folder_readers(folder, component) if path == from_folder else []
            base = {k: reader for reader in readers for k in reader}
            for k, v in _folder_tensors(merged, component):
                assert k in loaded, (component, k)
                assert torch.equal(loaded[k], v), (path.name, component, k)
                if readers:
                    changed += not torch.equal(base[k][k], v)
            for reader in readers:
                reader.close()
            del loaded
        del pipe
    assert changed == len(adapter.modules)                # exactly the adapted weights moved


def test_offline_single_file_without_a_config_names_model_config(tmp_path):
    """Without internet and without --model-config, loading a single file is an error that says
    to pass --model-config (a tiny SD 1.5 file in CI; the full-size one with DORABOOTH_REALSCALE=1)."""
    if REALSCALE and fullsize.is_built("sd15"):
        path = fullsize.paths("sd15")[1]
    else:
        from tiny_models import make_sd15_pipeline

        pipe = make_sd15_pipeline()
        mapper = Mapper("sd1", pipe.unet.config, pipe.vae.config)
        original = mapper.to_original({c: getattr(pipe, c).state_dict() for c in ("unet", "vae", "text_encoder")})
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    code = ("import sys\nfrom dorabooth.models import load_pipeline\n"
            "try:\n    load_pipeline(sys.argv[1])\nexcept OSError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, timeout=900, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ERROR")), "")
    assert str(path) in line and "--model-config" in line, out.stdout[-2000:] + out.stderr[-2000:]


# ---- ComfyUI's own code, when a checkout is at hand ---------------------------------------------
COMFYUI = os.environ.get("DORABOOTH_COMFYUI")


@pytest.mark.skipif(not COMFYUI, reason="set DORABOOTH_COMFYUI to a ComfyUI checkout (a PYTHONPATH: extra entries "
                                        "allowed) and DORABOOTH_COMFYUI_PYTHON to a Python that imports it")
def test_comfyuis_own_code_loads_every_module_of_our_files(tmp_path):
    """tests/compat/comfyui_keys.py runs ComfyUI's model detection, ``model_lora_keys_unet/_clip``
    and ``load_lora`` on our kohya files (meta tensors): no key is left unloaded, every module
    lands where it was trained, and ComfyUI picks the model class tool_bases predicts (none for
    the toy). SD 2.1 from a diffusers folder: ComfyUI misses only the 24th OpenCLIP block and the
    projection (unused: SD 2 reads the penultimate layer; ComfyUI logs "clip missing")."""
    from dorabooth.models import load_pipeline

    models, expected = {}, {}
    toy, _ = load_pipeline("toy")
    toy_comps = {c: getattr(toy, c) for c in ("unet", "vae")}
    for name in ("sd15", "sd21", "sdxl", "koala", "sd15-lpb1", "toy"):
        family, comps, shapes = ("sdxl", toy_comps, original_shapes("sdxl", toy_comps)) if name == "toy" else built(name)
        adapter = adapter_over(comps, family, "in", unet_targets="attn" if name == "toy" else "all-linear")
        path = adapter_files.write_kohya(adapter, tmp_path / f"{name}.safetensors", family=family,
                                         layout=UNetLayout.from_config(comps["unet"].config))
        models[name] = {"family": family, "shapes": {k: list(s) for k, s in shapes.items()}, "file": path.name}
        written = adapter_files.read_adapter_file(path)
        expected[name] = {file_name: expected_targets(family, comps, key)[0]
                          for key, file_name in written.file_names.items()}
    (tmp_path / "models.json").write_text(json.dumps(models))
    env = {**os.environ, "PYTHONPATH": COMFYUI}
    python = os.environ.get("DORABOOTH_COMFYUI_PYTHON", sys.executable)
    harness = Path(__file__).parent / "compat" / "comfyui_keys.py"
    out = subprocess.run([python, str(harness), str(tmp_path)], env=env, cwd=COMFYUI.split(os.pathsep)[0],
                         capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    classes = {"sd15": "SD15", "sd21": "SD20", "sdxl": "SDXL", "koala": "KOALA_700M", "sd15-lpb1": "SD15", "toy": None}
    for name, got in result.items():
        assert got["not_loaded"] == [], (name, got["not_loaded"][:3])
        assert got["patched"] == expected[name], name
        assert got["class"] == classes[name]
        family, comps, _ = ("sdxl", toy_comps, None) if name == "toy" else built(name)
        assert comfy_base_model(comps["unet"].config) == classes[name]
    missing = result["sd21"]["clip_missing"]
    assert missing and all(".layers.23." in k or k.endswith("text_projection.weight") for k in missing)
    assert any(k.endswith("text_projection.weight") for k in missing)
    for name in ("sd15", "sdxl"):                    # what ComfyUI would warn about ("clip missing: …")
        assert [k for k in result[name]["clip_missing"] if not k.endswith(".transformer.text_projection.weight")
                and "position_ids" not in k] == [], name
