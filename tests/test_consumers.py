"""How other tools apply our files, checked against reimplementations and the real libraries.

* ComfyUI (reimplemented from comfy/lora.py, comfy/utils.py, comfy/weight_adapter/): every key
  of our kohya files is loaded; ``(1, in)`` applies exactly; ``(out, 1)`` applies
  V·m/‖W0‖_row. Neither ComfyUI nor A1111 can load the tiny bases themselves, and the report
  says so; its numbers for real bases are checked in test_interop_fullsize.py.
* diffusers (the real one): a kohya DoRA file loads as plain LoRA; our diffusers file's
  text-encoder magnitudes are dropped with transformers 5 — the report predicts both numbers.
* LyCORIS (the real lycoris-lora): files it writes import exactly on both axes; it loads our
  ``(out, 1)`` files exactly and fails on ``(1, in)``; its strength semantics differ from ours.
"""

import pytest
import torch
import transformers
from safetensors import safe_open

import dorabooth
from dorabooth import inject
from dorabooth.describe import adapter_info
from dorabooth.export import export
from dorabooth.merging import pipeline_weight
from dorabooth.formats.adapter_files import read_adapter_file
from dorabooth.formats.consumers import (
    comfy_key_map,
    comfy_loaded_keys,
    comfy_unet_config,
    comfy_unet_to_diffusers,
    comfy_weight,
)
from dorabooth.formats.neutral import adapted_weight
from export_helpers import FAMILY, adapted, rel_fro
from tiny_models import MAKERS

TF5 = int(transformers.__version__.split(".")[0]) >= 5


def keys_of(path):
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def te_layers(pipe):
    return {c: getattr(pipe, c).config.num_hidden_layers for c in ("text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None}


def report(info, consumer):
    return next(v for v in info["consumers"] if v["consumer"] == consumer)


ALL = [("sd15", "out"), ("sd15", "in"), ("sdxl", "out"), ("sdxl", "in")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """files(kind, axis) → (adapted pipe, our kohya file, our diffusers-lora file), made once each."""
    made = {}

    def get(kind, axis):
        if (kind, axis) not in made:
            pipe = adapted(kind, axis)
            d = tmp_path_factory.mktemp(f"{kind}{axis}")
            src = dorabooth.save_adapter(pipe, d)
            made[kind, axis] = pipe, export(src, format="kohya", out=d / "k.safetensors", pipe=pipe).path, src
        return made[kind, axis]
    return get


def test_comfy_unet_map_matches_full_sdxl_names():
    cfg = {"layers_per_block": 2, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
           "transformer_layers_per_block": [1, 2, 10]}
    d2s = comfy_unet_to_diffusers(comfy_unet_config(cfg))
    assert d2s["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn2.to_q"
    assert d2s["mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"] == \
        "middle_block.1.transformer_blocks.9.attn1.to_out.0"
    assert d2s["up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2"] == "output_blocks.2.1.transformer_blocks.9.ff.net.2"
    assert d2s["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"


@pytest.mark.parametrize("kind,axis", ALL)
def test_comfyui_uses_every_key_and_applies_the_file(files, kind, axis):
    pipe, path, src = files(kind, axis)
    keys = keys_of(path)
    key_map = comfy_key_map(FAMILY[kind], pipe.unet.config, te_layers(pipe))
    modules, loaded = comfy_loaded_keys(keys, key_map)
    assert loaded == set(keys), sorted(set(keys) - loaded)[:5]           # every key of our file is used
    ad = read_adapter_file(path)
    assert set(modules.values()) == set(ad.modules)
    with safe_open(str(path), framework="pt") as f:
        errs = []
        for name, key in modules.items():
            W0 = pipeline_weight(pipe, key)
            Wc = comfy_weight(W0, f.get_tensor(f"{name}.lora_up.weight"), f.get_tensor(f"{name}.lora_down.weight"),
                              f.get_tensor(f"{name}.alpha").item(), f.get_tensor(f"{name}.dora_scale"))
            W = inject.pipeline_dora_modules(pipe)[key].merged_weight(1.0)
            errs.append(rel_fro(Wc, W))
            if axis == "out":   # ComfyUI's per-output branch: V · m / ‖W0‖_row
                m = ad.modules[key]
                V = W0.float() + m.scale * (m.up @ m.down)
                assert rel_fro(Wc, V * (m.magnitude / torch.linalg.vector_norm(W0.float(), dim=1))[:, None]) < 1e-6
    assert max(errs) < 1e-6 if axis == "in" else max(errs) > 1e-3
    # ComfyUI's checkpoint loader recognises no tiny UNet, and the report says so; its numbers for
    # bases ComfyUI loads are checked at full width in test_interop_fullsize.py
    comfy = report(adapter_info(path, consumers=True, pipe=MAKERS[kind]()), "ComfyUI")
    assert comfy["status"] == "fails to load" and "ComfyUI cannot load this base model" in comfy["why"]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_comfyui_ignores_diffusers_unet_keys_and_magnitudes(files, kind):
    pipe, path, src = files(kind, "out")
    keys = keys_of(src)
    modules, loaded = comfy_loaded_keys(keys, comfy_key_map(FAMILY[kind], pipe.unet.config, te_layers(pipe)))
    assert not [k for k in loaded if k.startswith("unet.") or "magnitude" in k]
    assert modules and all(v.startswith("text_encoder") for v in modules.values())
    info = adapter_info(src, consumers=True, pipe=MAKERS[kind]())        # (full width: test_interop_fullsize)
    assert report(info, "ComfyUI")["status"] == report(info, "A1111")["status"] == "fails to load"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a1111_cannot_load_the_tiny_bases(files, kind):
    # A1111 builds SD/SDXL from fixed configs (layers_per_block 2; the tiny models have 1): the
    # report says it cannot load the base; its names and formula are checked at full size in
    # test_interop_fullsize.py
    pipe, path, src = files(kind, "in")
    a1111 = report(adapter_info(path, consumers=True, pipe=MAKERS[kind]()), "A1111")
    assert a1111["status"] == "fails to load" and a1111["applied"] == 0
    assert "layers_per_block 1 (needs 2)" in a1111["why"]


def _fused(stock, key):
    component, path = key.split(".", 1)
    model = getattr(stock, component)
    layer = model.get_submodule(inject.module_name(model, component, path))
    return (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach()


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_stock_diffusers_drops_dora_scale_as_reported(files, kind):
    pipe, path, src = files(kind, "out")   # dora_scale of either shape is dropped alike
    stock = MAKERS[kind]()
    stock.load_lora_weights(str(path))
    stock.fuse_lora()
    ad = read_adapter_file(path)
    measured = 0.0
    for key, m in ad.modules.items():
        W0 = pipeline_weight(pipe, key)
        lora_only = W0.float() + m.scale * (m.up @ m.down)
        Wf = _fused(stock, key)
        assert rel_fro(Wf, lora_only) < 1e-5, key                      # plain LoRA: magnitude gone
        measured = max(measured, rel_fro(Wf, adapted_weight(W0, m)))
    d = report(adapter_info(path, consumers=True, pipe=MAKERS[kind]()), "diffusers")
    assert d["status"] == "approximate" and d["max_rel_error"] == pytest.approx(measured, rel=1e-3)


@pytest.mark.skipif(not TF5, reason="exact on transformers 4.57 (tests/compat)")
def test_stock_diffusers_text_encoder_magnitudes_as_reported(files):
    kind = "sd15"
    pipe, path, src = files(kind, "out")
    stock = MAKERS[kind]()
    stock.load_lora_weights(str(src))
    stock.fuse_lora()
    ad = read_adapter_file(src)
    measured = max(rel_fro(_fused(stock, k), adapted_weight(pipeline_weight(pipe, k), m)) for k, m in ad.modules.items())
    unet = max(rel_fro(_fused(stock, k), adapted_weight(pipeline_weight(pipe, k), m))
               for k, m in ad.modules.items() if k.startswith("unet."))
    assert unet < 1e-5
    d = report(adapter_info(src, consumers=True, pipe=MAKERS[kind]()), "diffusers")
    assert d["status"] == "approximate" and d["max_rel_error"] == pytest.approx(measured, rel=1e-3)


# ---- LyCORIS, the library itself ------------------------------------------------------------------
lycoris_kohya = pytest.importorskip("lycoris.kohya")


@pytest.fixture
def lycoris_preset():
    cls = lycoris_kohya.LycorisNetworkKohya
    names = ("UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "TEXT_ENCODER_TARGET_REPLACE_MODULE",
             "TEXT_ENCODER_TARGET_REPLACE_NAME", "ENABLE_CONV")
    saved = {n: getattr(cls, n) for n in names}
    cls.apply_preset({"unet_target_module": ["Attention"], "unet_target_name": [],
                      "text_encoder_target_module": ["CLIPAttention"], "text_encoder_target_name": [],
                      "enable_conv": False})
    yield cls
    for n, v in saved.items():
        setattr(cls, n, v)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["out", "in"])
def test_files_written_by_lycoris_import_exactly(tmp_path, lycoris_preset, kind, wd_on_out):
    pipe = MAKERS[kind]()
    te = [pipe.text_encoder, pipe.text_encoder_2] if kind == "sdxl" else pipe.text_encoder
    net = lycoris_preset(te, pipe.unet, multiplier=1.0, lora_dim=4, alpha=2.0, network_module="lora",
                         weight_decompose=True, wd_on_out=wd_on_out)
    net.apply_to(te, pipe.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in net.unet_loras + net.text_encoder_loras:
            lora.lora_up.weight.normal_(0, 0.05, generator=g)
            lora.lora_down.weight.normal_(0, 0.2, generator=g)
            lora.dora_scale.mul_(1 + 0.1 * torch.randn(lora.dora_scale.shape, generator=g))
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, {})
    ad = read_adapter_file(tmp_path / "lyco.safetensors")
    assert ad.axis == ("out" if wd_on_out else "in") and not ad.unknown_keys
    by_name = {lora.lora_name: lora for lora in net.unet_loras + net.text_encoder_loras}
    assert set(ad.file_names.values()) == set(by_name)
    with torch.no_grad():
        for key, mod in ad.modules.items():
            lora = by_name[ad.file_names[key]]
            W0 = lora.org_weight
            assert rel_fro(adapted_weight(W0, mod), lora.get_merged_weight(multiplier=1.0)[0]) < 1e-6, key
            # strength semantics differ: LyCORIS keeps ΔW in full and scales only (m/‖V‖ − 1)
            V = W0.float() + mod.scale * (mod.up @ mod.down)
            norm = torch.linalg.vector_norm(V, dim=1 if mod.axis == "out" else 0)
            g_ = mod.magnitude / norm
            g_ = g_[:, None] if mod.axis == "out" else g_[None, :]
            assert rel_fro(lora.get_merged_weight(multiplier=0.5)[0], V * (0.5 * (g_ - 1) + 1)) < 1e-5
            assert rel_fro(adapted_weight(W0, mod, 0.5), V * (0.5 * (g_ - 1) + 1)) > 1e-4


@pytest.mark.parametrize("kind,axis", ALL)
def test_lycoris_loads_our_files_as_reported(files, lycoris_preset, kind, axis):
    pipe, path, src = files(kind, axis)
    fresh = MAKERS[kind]()
    te = [fresh.text_encoder, fresh.text_encoder_2] if kind == "sdxl" else fresh.text_encoder
    rep = report(adapter_info(path, consumers=True, pipe=MAKERS[kind]()), "LyCORIS")
    if axis == "in":
        with pytest.raises(RuntimeError):
            lycoris_kohya.create_network_from_weights(1.0, str(path), None, te, fresh.unet)
        assert rep["status"] == "fails to load"
        return
    net, _ = lycoris_kohya.create_network_from_weights(1.0, str(path), None, te, fresh.unet)
    loaded = net.unet_loras + net.text_encoder_loras
    assert len(loaded) == rep["applied"]
    ad = read_adapter_file(path)
    by_name = {v: k for k, v in ad.file_names.items()}
    with torch.no_grad():
        for lora in loaded:
            key = by_name[lora.lora_name]
            assert rel_fro(lora.get_merged_weight(multiplier=1.0)[0], adapted_weight(pipeline_weight(pipe, key),
                                                                                      ad.modules[key])) < 1e-6
