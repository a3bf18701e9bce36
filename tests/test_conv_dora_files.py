"""Conv DoRA (LoCon) through the real code path: targets, pipeline merge/strength/unmerge, the
diffusers/PEFT file (stock ``load_lora_weights`` as the oracle), kohya LoCon keys and LyCORIS
LoCon/DoRA imports (LyCORIS' own forward as the oracle). Tolerance: max |Δ| / max |ref| ≤ 1e-5."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import MAKERS, randomize_adapter_params, rel_err, unet_output

import dorabooth
from dorabooth import inject
from dorabooth.adapters import _attached_adapter
from dorabooth.dora import DoRAConv2d
from dorabooth.formats.adapter_files import read_adapter_file, write_kohya
from dorabooth.formats.consumers import comfy_weight
from dorabooth.formats.layout import UNetLayout
from dorabooth.merging import merge_weights, pipeline_weight

TOL = 1e-5
CONV_LEAVES = ("conv1", "conv2", "conv_shortcut", "proj_in", "proj_out")


def conv_attached(kind, axis="out", method="dora", targets="attn+conv", seed=1):
    pipe = MAKERS[kind]()
    dorabooth.attach(pipe, rank=4, alpha=8, method=method, magnitude_axis=axis, unet_targets=targets,
                     text_encoders=False)
    randomize_adapter_params(pipe.unet, seed=seed)
    return pipe


def convs(model):
    return [(n, m) for n, m in inject.dora_modules(model) if isinstance(m, DoRAConv2d)]


# ---- targets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_conv_presets_select_resnet_convs_and_sd1_proj(kind):
    unet = MAKERS[kind]().unet
    names = inject.resolve_targets(unet, "attn+conv")
    conv_names = [n for n in names if isinstance(unet.get_submodule(n), torch.nn.Conv2d)]
    assert conv_names and all(n.rsplit(".", 1)[-1] in CONV_LEAVES for n in conv_names)
    assert {n.rsplit(".", 1)[-1] for n in conv_names} >= {"conv1", "conv2", "conv_shortcut"}
    proj = {n.rsplit(".", 1)[-1] for n in conv_names} & {"proj_in", "proj_out"}
    assert proj == ({"proj_in", "proj_out"} if kind == "sd15" else set())   # Linear in SDXL: not a conv target
    assert not any(n.endswith(("conv_in", "conv_out", ".conv")) for n in names)   # stem and resamplers stay
    assert set(inject.resolve_targets(unet, "attn")) < set(names)
    everything = set(inject.resolve_targets(unet, "all"))
    assert everything == set(inject.resolve_targets(unet, "all-linear")) | set(conv_names)
    assert inject.resolve_targets(unet, "conv1") == [n for n in conv_names if n.endswith("conv1")]


# ---- pipeline merge / strength / unmerge --------------------------------------------------------
@pytest.mark.parametrize("axis", ["out", "in"])
def test_pipeline_merge_strength_unmerge_exact(axis):
    pipe = conv_attached("sd15", axis)
    base = unet_output(MAKERS["sd15"]())
    w0 = {n: m.base_layer.weight.detach().clone() for n, m in convs(pipe.unet)}
    y = unet_output(pipe)
    assert rel_err(y, base) > 1e-2
    dorabooth.merge(pipe)
    assert rel_err(unet_output(pipe), y) <= TOL
    dorabooth.unmerge(pipe)
    assert all(torch.equal(m.base_layer.weight, w0[n]) for n, m in convs(pipe.unet))
    dorabooth.set_strength(pipe, 0.0)
    assert torch.equal(unet_output(pipe), base)
    dorabooth.set_strength(pipe, 0.5)
    y_half = unet_output(pipe)
    dorabooth.merge(pipe)
    assert rel_err(unet_output(pipe), y_half) <= TOL
    dorabooth.unmerge(pipe)
    # the export merge (pure function on file tensors) equals the live layer's merged weight
    dorabooth.set_strength(pipe, 1.0)
    adapter = _attached_adapter(pipe)
    merged = merge_weights({k: pipeline_weight(pipe, k) for k in adapter.modules}, [(adapter, 0.7)])
    for n, layer in convs(pipe.unet):
        torch.testing.assert_close(merged[f"unet.{n}"], layer.merged_weight(0.7), rtol=0, atol=1e-6)


# ---- diffusers / PEFT file ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_load_lora_weights_gives_our_unet_output(kind, method, tmp_path):
    pytest.importorskip("peft")
    ours = conv_attached(kind, method=method)
    path = dorabooth.save_adapter(ours, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        name = next(n for n, _ in convs(ours.unet) if n.endswith("conv1"))
        assert f.get_slice(f"unet.{name}.lora_A.weight").get_shape() == [4, *ours.unet.get_submodule(name).base_layer.weight.shape[1:]]
        if method == "dora":
            assert f.get_slice(f"unet.{name}.lora_magnitude_vector").get_shape()[::2] == [1, 1]   # (1, out, 1, 1)
    stock = MAKERS[kind]()
    stock.load_lora_weights(tmp_path)
    assert rel_err(unet_output(stock), unet_output(ours)) <= TOL
    assert stock.unet.peft_config["default_0"].use_dora == (method == "dora")


@pytest.mark.parametrize("axis", ["out", "in"])
def test_diffusers_file_round_trip_exact(axis, tmp_path):
    ours = conv_attached("sd15", axis)
    path = dorabooth.save_adapter(ours, tmp_path)
    again = MAKERS["sd15"]()
    dorabooth.load_adapter(again, path)
    a, b = inject.adapter_state_dict(ours), inject.adapter_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(unet_output(again), unet_output(ours))
    assert read_adapter_file(path).summary()["conv_modules"] == len(convs(ours.unet))


# ---- kohya LoCon --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, axis", [("sd15", "out"), ("sd15", "in"), ("sdxl", "in")])
def test_kohya_locon_keys_and_round_trip(kind, axis, tmp_path):
    ours = conv_attached(kind, axis)
    adapter = _attached_adapter(ours)
    path = write_kohya(adapter, tmp_path / "locon.safetensors", family={"sd15": "sd1"}.get(kind, kind),
                       layout=UNetLayout.default("sdxl" if kind == "sdxl" else "sd1"))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        name = ("lora_unet_down_blocks_0_resnets_0_conv1" if kind == "sd15"
                else "lora_unet_input_blocks_1_0_in_layers_2")          # SDXL: sgm names, as kohya writes
        down, up = f.get_tensor(f"{name}.lora_down.weight"), f.get_tensor(f"{name}.lora_up.weight")
        ds = f.get_tensor(f"{name}.dora_scale")
        assert f"{name}.alpha" in keys
    conv = ours.unet.get_submodule("down_blocks.0.resnets.0.conv1").base_layer
    out_c, in_c, kh, kw = conv.weight.shape
    assert tuple(down.shape) == (4, in_c, kh, kw) and tuple(up.shape) == (out_c, 4, 1, 1)
    assert tuple(ds.shape) == ((out_c, 1, 1, 1) if axis == "out" else (1, in_c, 1, 1))
    # ComfyUI's weight_decompose on these tensors (axis "in": the norm of V, as ours) gives our weight
    if axis == "in":
        with safe_open(str(path), framework="pt") as f:
            alpha = float(f.get_tensor(f"{name}.alpha"))
        torch.testing.assert_close(comfy_weight(conv.weight, up, down, alpha, ds),
                                   ours.unet.get_submodule("down_blocks.0.resnets.0.conv1").merged_weight(),
                                   rtol=1e-5, atol=1e-6)
    again = MAKERS[kind]()
    dorabooth.load_adapter(again, path)
    assert rel_err(unet_output(again), unet_output(ours)) <= TOL


@pytest.mark.parametrize("wd_on_out", [True, False])
def test_lycoris_locon_dora_file_imports_exactly(wd_on_out, tmp_path):
    """A LoCon/DoRA file as LyCORIS saves it (lora_down 4-D, lora_up 1×1, alpha, dora_scale
    (out, 1, 1, 1) or (1, in, 1, 1)) loads into dorabooth; the oracle is LyCORIS' own forward."""
    locon = pytest.importorskip("lycoris.modules.locon")
    pipe = MAKERS["sd15"]()
    reference = copy.deepcopy(pipe)
    targets = inject.resolve_targets(pipe.unet, "conv")
    g = torch.Generator().manual_seed(3)
    sd, modules = {}, []
    for name in targets:
        lora_name = "lora_unet_" + name.replace(".", "_")
        mod = locon.LoConModule(lora_name, reference.unet.get_submodule(name), 1.0, lora_dim=4, alpha=8,
                                weight_decompose=True, wd_on_out=wd_on_out)
        with torch.no_grad():
            mod.lora_up.weight.copy_(0.2 * torch.randn(mod.lora_up.weight.shape, generator=g))
            mod.dora_scale.mul_(1 + 0.1 * torch.randn(mod.dora_scale.shape, generator=g))
        mod.apply_to()
        modules.append(mod)
        sd.update({f"{lora_name}.{k}": v.detach().contiguous() for k, v in mod.custom_state_dict().items()})
    save_file(sd, str(tmp_path / "lycoris.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
    adapter = read_adapter_file(tmp_path / "lycoris.safetensors")
    assert adapter.axis == ("out" if wd_on_out else "in") and adapter.summary()["conv_modules"] == len(targets)
    assert "LyCORIS" in adapter.format
    dorabooth.load_adapter(pipe, tmp_path / "lycoris.safetensors")
    assert len(convs(pipe.unet)) == len(targets)
    y_ly = unet_output(reference)
    assert rel_err(y_ly, unet_output(MAKERS["sd15"]())) > 1e-3
    assert rel_err(unet_output(pipe), y_ly) <= TOL


def test_lycoris_tucker_conv_is_still_refused(tmp_path):
    sd = {"lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight": torch.zeros(4, 8, 1, 1),
          "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": torch.zeros(4, 4, 3, 3),
          "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight": torch.zeros(8, 4, 1, 1)}
    save_file(sd, str(tmp_path / "tucker.safetensors"))
    with pytest.raises(ValueError, match="Tucker"):
        read_adapter_file(tmp_path / "tucker.safetensors")


# ---- the command line ---------------------------------------------------------------------------
def test_cli_train_generate_export_info_with_conv_targets(tmp_path, capsys):
    from tiny_runs import make_subject, save_model

    from dorabooth import cli

    model = str(save_model("sdxl", tmp_path / "model"))
    run = tmp_path / "run"
    assert cli.main(["train", "--model", model, "--images", str(make_subject(tmp_path / "subject")), "--class-noun",
                     "dog", "--out", str(run), "--steps", "2", "--rank", "4", "--lr", "1e-3", "--num-class-images",
                     "2", "--class-image-steps", "2", "--targets", "attn+conv"]) == 0
    capsys.readouterr()
    adapter = read_adapter_file(run / "adapter.safetensors")
    n_conv = adapter.summary()["conv_modules"]
    assert n_conv > 0 and adapter.targets["unet"] == ["attn+conv"]
    assert cli.main(["adapter-info", str(run / "adapter.safetensors")]) == 0
    assert f"{n_conv} of them Conv2d (LoCon)" in capsys.readouterr().out
    assert cli.main(["generate", "--adapter", str(run), "--prompt", "a photo of sks dog", "--out",
                     str(tmp_path / "images"), "--n", "1", "--steps", "2"]) == 0
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    assert cli.main(["export", "--adapter", str(run), "--format", "kohya", "--out", str(tmp_path / "k")]) == 0
    capsys.readouterr()
    kohya_file = next((tmp_path / "k").glob("*.safetensors")) if (tmp_path / "k").is_dir() else tmp_path / "k"
    assert read_adapter_file(kohya_file).summary()["conv_modules"] == n_conv
