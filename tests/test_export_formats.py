"""Adapter files between formats: kohya layout, round trips, other tools' names, refusals, bad files.

Exactness is checked on the merged weights each module gives (dorabooth's definition,
strength 1) against the live DoRALinear layers: max |Δ| / max |W| ≤ 1e-6 (fp32).
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dorabooth
from dorabooth import inject
from dorabooth.describe import adapter_info
from dorabooth.export import convert, export
from dorabooth.merging import pipeline_weight
from dorabooth.formats.adapter_files import read_adapter_file
from dorabooth.formats.neutral import adapted_weight
from export_helpers import FAMILY, adapted

TOL = 1e-6


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def assert_matches_layers(adapter, pipe):
    """Every module of ``adapter`` gives the live layer's merged weight; every layer is covered."""
    layers = inject.pipeline_dora_modules(pipe)
    assert set(adapter.modules) == set(layers)
    for key, mod in adapter.modules.items():
        W = adapted_weight(pipeline_weight(pipe, key), mod)
        ref = layers[key].merged_weight(1.0)
        assert ((W - ref).abs().max() / ref.abs().max()).item() <= TOL, key


ALL = [("sd15", "out"), ("sd15", "in"), ("sdxl", "out"), ("sdxl", "in")]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """adapters(kind, axis) → (adapted pipe, its diffusers-lora file, a scratch folder), made once each."""
    made = {}

    def get(kind, axis):
        if (kind, axis) not in made:
            pipe = adapted(kind, axis)
            d = tmp_path_factory.mktemp(f"{kind}-{axis}")
            made[kind, axis] = pipe, dorabooth.save_adapter(pipe, d), d
        return made[kind, axis]
    return get


@pytest.mark.parametrize("kind,axis", ALL)
def test_kohya_layout_and_round_trip(adapters, kind, axis):
    pipe, path, d = adapters(kind, axis)
    out = d / "kohya.safetensors"
    export(path, format="kohya", out=out, pipe=pipe)
    tensors, meta = read(out)
    names = {k.split(".")[0] for k in tensors}
    layers = inject.pipeline_dora_modules(pipe)
    assert len(names) == len(layers)
    for name in names:   # every module: down (r, in), up (out, r), alpha, 2-D dora_scale by axis
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert tensors[f"{name}.alpha"].item() == 8.0
        shape = (up.shape[0], 1) if axis == "out" else (1, down.shape[1])
        assert tuple(tensors[f"{name}.dora_scale"].shape) == shape
    te = sorted(n for n in names if n.startswith("lora_te"))
    if kind == "sdxl":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" not in names  # tiny: 1 layer/block
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_q" in names      # sgm: 1 + 1·(1+1) + 0
        assert "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0" in names
        assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te
        assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in te
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
        assert te[0].startswith("lora_te_text_model_encoder_layers_")
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert json.loads(meta["ss_network_args"])["wd_on_output"] == ("True" if axis == "out" else "False")
    assert meta["dorabooth.magnitude_axis"] == axis and meta["modelspec.sai_model_spec"] == "1.0.0"
    back = read_adapter_file(out)
    assert back.axis == axis and back.family == FAMILY[kind]
    assert_matches_layers(back, pipe)
    # and back to the diffusers layout (axis out) — loads with dorabooth and matches
    if axis == "out":
        again = convert(out, to="diffusers-lora", out=d / "again.safetensors", pipe=pipe)
        assert_matches_layers(read_adapter_file(again.path), pipe)
        fresh = adapted(kind, axis, seed=99)
        dorabooth.load_adapter(fresh, again.path)
        for key, layer in inject.pipeline_dora_modules(fresh).items():
            assert torch.equal(layer.lora_B.weight, inject.pipeline_dora_modules(pipe)[key].lora_B.weight)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_axis_in_refused_for_diffusers_lora(adapters, kind):
    pipe, path, d = adapters(kind, "in")
    kfile = export(path, format="kohya", out=d / "k.safetensors", pipe=pipe).path
    with pytest.raises(ValueError, match=r"per-input magnitude.*--format kohya.*merged"):
        convert(kfile, to="diffusers-lora", out=d / "nope.safetensors", pipe=pipe)
    assert not (d / "nope.safetensors").exists()


def _hand_built(kind, axis, style):
    """A kohya/LyCORIS/OneTrainer-style state dict from live layers, with the given naming style."""
    pipe = adapted(kind, axis, seed=5)
    sd = {}
    for key, layer in inject.pipeline_dora_modules(pipe).items():
        component, path = key.split(".", 1)
        if style == "lycoris":          # LyCORIS on diffusers models: diffusers names, te without text_model_
            prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if kind == "sdxl" else "lora_te",
                      "text_encoder_2": "lora_te2"}[component]
            p = path.removeprefix("text_model.") if component == "text_encoder" else path
            name = f"{prefix}_{p.replace('.', '_')}"
        elif style == "onetrainer":     # OneTrainer's internal dotted names
            prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if kind == "sdxl" else "lora_te",
                      "text_encoder_2": "lora_te2"}[component]
            name = f"{prefix}.{path}"
        else:                            # OneTrainer OMI: original UNet names, clip_l / clip_g
            from dorabooth.formats.layout import UNetLayout, unet_to_original
            if component == "unet":
                name = "unet." + unet_to_original(path, UNetLayout.from_config(pipe.unet.config))
            else:
                name = {"text_encoder": "clip_l.", "text_encoder_2": "clip_g."}[component] + path
        sd[f"{name}.lora_down.weight"] = layer.lora_A.weight.detach().clone()
        sd[f"{name}.lora_up.weight"] = layer.lora_B.weight.detach().clone()
        sd[f"{name}.alpha"] = torch.tensor(layer.alpha)
        m = layer.lora_magnitude_vector.detach()
        sd[f"{name}.dora_scale"] = m.reshape(-1, 1) if axis == "out" else m.reshape(1, -1)
    return pipe, sd


@pytest.mark.parametrize("style", ["lycoris", "onetrainer", "omi"])
@pytest.mark.parametrize("kind,axis", [("sd15", "in"), ("sdxl", "out"), ("sdxl", "in")])
def test_hand_built_files_import_exactly(tmp_path, kind, axis, style):
    pipe, sd = _hand_built(kind, axis, style)
    meta = {"dorabooth.unet_layout": json.dumps({"layers_per_block": 1, "down_attention":
                                                 [False, True] if kind == "sdxl" else [True, False],
                                                 "up_attention": [True, False] if kind == "sdxl" else [False, True]})}
    save_file(sd, str(tmp_path / "f.safetensors"), metadata=meta)
    ad = read_adapter_file(tmp_path / "f.safetensors")
    assert ad.axis == axis and not ad.unknown_keys
    assert_matches_layers(ad, pipe)


def test_text_model_level_present_or_absent_same_modules(tmp_path):
    pipe, sd = _hand_built("sdxl", "out", "lycoris")
    save_file(sd, str(tmp_path / "without.safetensors"))
    with_level = {k.replace("lora_te1_encoder_", "lora_te1_text_model_encoder_"): v for k, v in sd.items()}
    save_file(with_level, str(tmp_path / "with.safetensors"))
    a, b = read_adapter_file(tmp_path / "without.safetensors"), read_adapter_file(tmp_path / "with.safetensors")
    assert set(a.modules) == set(b.modules)
    both = {**sd, **{k: v.clone() for k, v in with_level.items()}}
    save_file(both, str(tmp_path / "both.safetensors"))
    with pytest.raises(ValueError, match="two modules in the file map to"):
        read_adapter_file(tmp_path / "both.safetensors")


def test_mismatched_axis_header_and_bad_shape(tmp_path):
    pipe, sd = _hand_built("sd15", "out", "lycoris")
    save_file(sd, str(tmp_path / "a.safetensors"), metadata={"dorabooth.magnitude_axis": "in"})
    with pytest.raises(ValueError, match="header says magnitude axis 'in'"):
        read_adapter_file(tmp_path / "a.safetensors")
    name = next(k for k in sd if k.endswith(".dora_scale"))
    sd[name] = torch.ones(3, 5)
    save_file(sd, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"b\.safetensors.*dora_scale.*fits neither axis"):
        read_adapter_file(tmp_path / "b.safetensors")


def test_bad_files_name_the_file(tmp_path, adapters):
    pipe, path, d = adapters("sd15", "out")
    data = path.read_bytes()
    cases = {
        "truncated.safetensors": data[: len(data) // 2],
        "empty.safetensors": b"",
        "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
        "model.ckpt": b"PK\x03\x04 pickled zip",
        "pickled.safetensors": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    }
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises((ValueError, OSError)) as e:
            read_adapter_file(tmp_path / name)
        assert name in str(e.value)
        assert ("pickle" in str(e.value)) == name.startswith(("model", "pickled"))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        read_adapter_file(tmp_path / "missing.safetensors")
    incomplete, _ = read(export(path, format="kohya", out=tmp_path / "k.safetensors", pipe=pipe).path)
    drop = next(k for k in incomplete if k.endswith("lora_up.weight"))
    save_file({k: v for k, v in incomplete.items() if k != drop}, str(tmp_path / "incomplete.safetensors"))
    with pytest.raises(ValueError, match=r"incomplete\.safetensors.*no lora_up"):
        read_adapter_file(tmp_path / "incomplete.safetensors")
    save_file({"model.diffusion_model.out.2.weight": torch.ones(1)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(ValueError, match="base model checkpoint.*--model"):
        read_adapter_file(tmp_path / "base.safetensors")
    save_file({"x.hada_w1_a": torch.ones(2, 2), "x.lora_down.weight": torch.ones(2, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="LoHa"):
        read_adapter_file(tmp_path / "loha.safetensors")


@pytest.mark.parametrize("kind,axis", ALL)
def test_adapter_info_reports_the_file(adapters, kind, axis):
    pipe, path, d = adapters(kind, axis)
    out = export(path, format="kohya", out=d / "info.safetensors", pipe=pipe, overwrite=True).path
    for p, fmt in ((path, "diffusers/PEFT"), (out, "kohya (dorabooth)")):
        info = adapter_info(p)
        assert info["format"].startswith(fmt)
        assert info["family"] == FAMILY[kind] and info["method"] == "dora" and info["magnitude_axis"] == axis
        assert info["rank"] == [4] and info["alpha"] == [8.0] and info["unknown_keys"] == []
        assert info["modules"] == len(inject.pipeline_dora_modules(pipe))


def test_plain_lora_and_strength_baked_into_files(tmp_path):
    pipe = adapted("sd15", method="lora")
    path = dorabooth.save_adapter(pipe, tmp_path)
    k = export(path, format="kohya", out=tmp_path / "lora.safetensors", pipe=pipe).path
    tensors, _ = read(k)
    assert not any(x.endswith("dora_scale") for x in tensors)
    assert_matches_layers(read_adapter_file(k), pipe)
    # strength 0.5 written into a file == the live layer at strength 0.5 (DoRA: needs the base)
    dpipe = adapted("sd15", "in")
    dpath = dorabooth.save_adapter(dpipe, tmp_path / "d")
    half = export([(dpath, 0.5)], format="kohya", out=tmp_path / "half.safetensors", pipe=dpipe).path
    ad = read_adapter_file(half)
    for key, layer in inject.pipeline_dora_modules(dpipe).items():
        W = adapted_weight(pipeline_weight(dpipe, key), ad.modules[key])
        ref = layer.merged_weight(0.5)
        assert ((W - ref).abs().max() / ref.abs().max()).item() <= TOL
    with pytest.raises(ValueError, match="merged checkpoint"):
        export([(dpath, 1.0), (path, 1.0)], format="kohya", out=tmp_path / "two.safetensors", pipe=dpipe)


def test_unknown_keys_are_reported(tmp_path):
    pipe, sd = _hand_built("sd15", "in", "lycoris")
    sd["bundle_emb.sks.string_to_param.*"] = torch.ones(2, 32)
    save_file(sd, str(tmp_path / "f.safetensors"))
    info = adapter_info(tmp_path / "f.safetensors")
    assert info["unknown_keys"] == ["bundle_emb.sks.string_to_param.*"] and info["magnitude_axis"] == "in"


def test_peft_save_pretrained_files(tmp_path):
    peft = pytest.importorskip("peft")
    from tiny_models import MAKERS

    pipe = MAKERS["sd15"]()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(pipe.unet, config)
    model.save_pretrained(tmp_path)
    ad = read_adapter_file(tmp_path / "adapter_model.safetensors")
    wrapped = [n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_magnitude_vector")]
    assert ad.axis == "out" and len(ad.modules) == len(wrapped) == 16
    assert all(k.startswith("unet.") for k in ad.modules)
    with torch.no_grad():
        for key, mod in ad.modules.items():
            layer = model.base_model.model.get_submodule(key.split(".", 1)[1])
            W0 = layer.base_layer.weight
            ref = W0 + layer.get_delta_weight("default")
            assert ((adapted_weight(W0, mod) - ref).abs().max() / ref.abs().max()).item() <= 1e-5, key


@pytest.mark.parametrize("axis", ["in", "out"])
def test_kohya_file_attaches_as_live_layers(adapters, axis):
    """A kohya file → the canonical in-memory adapter → live DoRALinear layers: same outputs."""
    from dorabooth.formats.neutral import module_paths
    from export_helpers import BUILDERS
    from tiny_models import unet_output

    pipe, path, d = adapters("sdxl", axis)
    kfile = export(path, format="kohya", out=d / f"live-{axis}.safetensors", pipe=pipe).path
    ad = read_adapter_file(kfile)
    fresh = BUILDERS["sdxl"]()
    for component, keys in ad.by_component().items():
        model = getattr(fresh, component)
        config = ad.component_config(component)
        inject.inject(model, ad.component_targets(component),
                      names=[inject.module_name(model, component, c) for c in module_paths(keys)],
                      rank=config["rank"], alpha=config["alpha"], use_dora=config["use_dora"],
                      magnitude_axis=config["magnitude_axis"])
    inject.load_adapter_state_dict(fresh, ad.tensors, source=str(kfile))
    a, b = unet_output(fresh), unet_output(pipe)
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def _header(path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])


def test_files_written_twice_are_byte_identical(adapters, tmp_path, monkeypatch):
    """The same adapter written twice gives the same bytes (safetensors' own writer orders the header
    metadata at random): save_adapter, export to kohya and diffusers-lora, a merged single file.
    SOURCE_DATE_EPOCH fixes the one entry that records when (modelspec.date)."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    pipe, _, _ = adapters("sdxl", "out")
    saved = [dorabooth.save_adapter(pipe, tmp_path / str(i) / "saved.safetensors") for i in range(2)]
    pairs = {"save_adapter": saved}
    for fmt in ("kohya", "diffusers-lora", "merged-single-file"):      # (a kohya title is the file's name)
        pairs[fmt] = [export(saved[0], format=fmt, out=tmp_path / str(i) / f"{fmt}.safetensors", pipe=pipe).path
                      for i in range(2)]
    for what, (a, b) in pairs.items():
        assert a.read_bytes() == b.read_bytes(), what
        meta = _header(a)["__metadata__"]
        assert list(meta) == sorted(meta) and meta["modelspec.date"] == "2023-11-14T22:13:20", what
    assert read_adapter_file(saved[0]).tensors.keys() == read_adapter_file(pairs["diffusers-lora"][0]).tensors.keys()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ValueError, match=r"SOURCE_DATE_EPOCH='yesterday': not a number of seconds"):
        dorabooth.save_adapter(pipe, tmp_path / "never.safetensors")
