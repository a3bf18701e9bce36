"""Target presets, wrapping, freezing, canonical names and detach (dorabooth/inject.py)."""

import pytest
import torch
from torch import nn

from dorabooth import inject
from dorabooth.dora import DoRALinear
from tiny_models import tiny_sd15_unet, tiny_sdxl_unet, tiny_text_encoder


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.fixture(params=["sd15", "sdxl"])
def unet(request):
    return tiny_sd15_unet() if request.param == "sd15" else tiny_sdxl_unet()


def test_attn_preset_is_q_k_v_out_of_self_and_cross_attention(unet):
    names = inject.resolve_targets(unet, "attn")
    blocks = {n.rsplit(".", 2 if n.endswith(".0") else 1)[0] for n in names}
    assert all(b.endswith(("attn1", "attn2")) for b in blocks)
    n_attn = sum(1 for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2")))
    assert len(names) == 4 * n_attn
    assert {n.split(".attn")[1][2:] for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}


def test_presets_select_what_design_4_says(unet):
    attn = set(inject.resolve_targets(unet, "attn"))
    cross = set(inject.resolve_targets(unet, "cross-attn"))
    ff = set(inject.resolve_targets(unet, "attn+ff"))
    every = inject.resolve_targets(unet, "all-linear")
    assert cross and cross < attn and all(".attn2." in n for n in cross)
    assert attn < ff and {n.split(".ff.")[1] for n in ff - attn} == {"net.0.proj", "net.2"}
    assert every == linear_names(unet)


def test_explicit_patterns_suffix_regex_and_comma_list(unet):
    assert inject.resolve_targets(unet, "to_q") == [n for n in linear_names(unet) if n.endswith(".to_q")]
    assert inject.resolve_targets(unet, "attn2.to_k, attn2.to_v") == [
        n for n in linear_names(unet) if n.endswith(("attn2.to_k", "attn2.to_v"))]
    regex = r"up_blocks\.\d+\..*attn1\.to_out\.0"
    hits = inject.resolve_targets(unet, [regex])
    assert hits and all(n.startswith("up_blocks.") and n.endswith("attn1.to_out.0") for n in hits)


def test_target_matching_nothing_names_the_model():
    te = tiny_text_encoder()
    with pytest.raises(ValueError, match=r"preset 'cross-attn' matched no nn.Linear module in CLIPTextModel"):
        inject.resolve_targets(te, "cross-attn")
    with pytest.raises(ValueError, match=r"target 'to_qq' matched no nn.Linear module in UNet2DConditionModel"):
        inject.resolve_targets(tiny_sd15_unet(), ["to_q", "to_qq"])
    with pytest.raises(ValueError, match="neither a module name nor a valid regular expression"):
        inject.resolve_targets(te, "q_proj(")
    with pytest.raises(ValueError, match="no target modules given"):
        inject.resolve_targets(te, " , ")


def test_rank_larger_than_min_in_out_is_an_error_and_changes_nothing():
    unet = tiny_sd15_unet()  # its attention layers are 16 and 32 wide; to_k of attn2 is (16, 32)
    before = dict(unet.named_modules())
    with pytest.raises(ValueError, match=r"rank 17 is larger than min\(in, out\).*use rank <= 16"):
        inject.inject(unet, "attn", rank=17, alpha=17)
    assert dict(unet.named_modules()) == before
    assert all(p.requires_grad for p in unet.parameters())


def test_inject_wraps_targets_and_freezes_everything_else():
    te = tiny_text_encoder()
    names = inject.inject(te, inject.TEXT_ENCODER_TARGETS, rank=4, alpha=8)
    assert len(names) == 4 * te.config.num_hidden_layers
    assert all(isinstance(te.get_submodule(n), DoRALinear) for n in names)
    trainable = {n for n, p in te.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in names for k in inject.LAYER_KEYS}
    assert inject.attached_targets(te) == inject.TEXT_ENCODER_TARGETS
    with pytest.raises(ValueError, match="already has dorabooth adapters"):
        inject.inject(te, "q_proj", rank=4, alpha=4)


def test_detach_restores_the_exact_original_modules_and_flags(unet):
    originals = {n: m for n, m in unet.named_modules() if isinstance(m, nn.Linear)}
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.conv_in.weight.requires_grad_(False)  # a flag that must survive attach/detach
    names = inject.inject(unet, "attn+ff", rank=2, alpha=2)
    for _, layer in inject.dora_modules(unet):
        nn.init.normal_(layer.lora_B.weight)
        layer.merge()
    detached = inject.detach(unet)
    assert detached == names
    for n, m in unet.named_modules():
        if n in originals:
            assert m is originals[n]
    assert not any(isinstance(m, DoRALinear) for m in unet.modules())
    sd = unet.state_dict()
    assert sd.keys() == weights.keys()
    assert all(torch.equal(sd[k], weights[k]) for k in sd)
    assert not unet.conv_in.weight.requires_grad
    assert all(p.requires_grad for n, p in unet.named_parameters() if n != "conv_in.weight")
    assert inject.attached_targets(unet) is None


def test_inject_exact_names_and_unknown_name():
    te = tiny_text_encoder()
    (v_proj,) = [n for n in linear_names(te) if n.endswith("layers.1.self_attn.v_proj")]
    names = inject.inject(te, ["my-targets"], names=[v_proj], rank=2, alpha=2)
    assert names == [v_proj] and inject.attached_targets(te) == ("my-targets",)
    inject.detach(te)
    with pytest.raises(ValueError, match="has no nn.Linear or nn.Conv2d named 'nope'"):
        inject.inject(te, ["x"], names=["nope"], rank=2, alpha=2)


def test_canonical_text_encoder_names_have_text_model_both_ways():
    for te in (tiny_text_encoder(), tiny_text_encoder(with_projection=True)):
        for name in linear_names(te):
            canonical = inject.canonical_name(te, "text_encoder", name)
            assert canonical.startswith("text_model.") or canonical == "text_projection"
            assert inject.module_name(te, "text_encoder", canonical) == name
    unet = tiny_sd15_unet()
    assert inject.canonical_name(unet, "unet", "mid_block.x") == "mid_block.x"


def test_peft_layers_are_refused():
    peft = pytest.importorskip("peft")
    unet = tiny_sd15_unet()
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="has PEFT adapter layers"):
        inject.inject(unet, "attn", rank=2, alpha=2)


def test_component_config_and_split_key():
    te = tiny_text_encoder()
    inject.inject(te, "q_proj", rank=3, alpha=6, magnitude_axis="in", rslora=True)
    assert inject.component_config(te) == {"rank": 3, "alpha": 6.0, "use_dora": True,
                                            "magnitude_axis": "in", "rslora": True, "vera_seed": None}
    assert inject.split_key("unet.a.to_q.lora_magnitude_vector") == ("unet.a.to_q", "lora_magnitude_vector")
    with pytest.raises(KeyError, match="not an adapter key"):
        inject.split_key("unet.a.to_q.weight")


def test_a_layer_refusing_its_arguments_changes_nothing():
    te = tiny_text_encoder()
    before = dict(te.named_modules())
    with pytest.raises(ValueError, match="alpha must be positive"):
        inject.inject(te, "q_proj", rank=2, alpha=0)
    assert dict(te.named_modules()) == before
    assert all(p.requires_grad for p in te.parameters())
