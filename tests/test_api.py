"""The public API on pipelines: attach, set_strength, merge/unmerge, detach (dorabooth/__init__.py)."""

import pytest
import torch
from torch import nn

import dorabooth
from dorabooth import inject
from tiny_models import randomize_adapter_params, rel_err, text_encoder_names, text_encoder_output, unet_output


def adapted(pipe):
    for c in ["unet", *text_encoder_names(pipe)]:
        randomize_adapter_params(getattr(pipe, c), seed=3)


def test_attach_returns_prefixed_names_and_freezes_the_rest(pipe):
    names = dorabooth.attach(pipe, rank=4, text_encoders=True)
    tes = text_encoder_names(pipe)
    assert {n.split(".")[0] for n in names} == {"unet", *tes}
    for n in names:
        component, _, module = n.partition(".")
        assert isinstance(getattr(pipe, component).get_submodule(module), dorabooth.dora.DoRALinear)
    for c in ["unet", *tes, "vae"]:
        for name, p in getattr(pipe, c).named_parameters():
            assert p.requires_grad == any(k in name for k in ("lora_A", "lora_B", "lora_magnitude_vector")), name
    layer = pipe.unet.get_submodule(names[0].partition(".")[2])
    assert (layer.rank, layer.alpha, layer.use_dora, layer.magnitude_axis) == (4, 4.0, True, "out")


def test_attach_options_reach_the_layers(pipe):
    dorabooth.attach(pipe, method="lora", rank=2, alpha=3, unet_targets="cross-attn", rslora=True)
    layers = [m for _, m in inject.dora_modules(pipe.unet)]
    assert layers and all(not m.use_dora and m.alpha == 3 and m.rslora for m in layers)
    assert not any(inject.dora_modules(getattr(pipe, c)) for c in text_encoder_names(pipe))
    with pytest.raises(ValueError, match=r"already has dorabooth adapters on unet; call dorabooth.detach"):
        dorabooth.attach(pipe)


def test_attach_validates_arguments(pipe):
    with pytest.raises(ValueError, match="method must be one of dora, lora"):
        dorabooth.attach(pipe, method="full")
    with pytest.raises(ValueError, match="magnitude_axis must be 'out' or 'in'"):
        dorabooth.attach(pipe, magnitude_axis="row")
    with pytest.raises(ValueError, match="matched no nn.Linear module in UNet2DConditionModel"):
        dorabooth.attach(pipe, unet_targets="nothing_here")


def test_attach_is_all_or_nothing(pipe, monkeypatch):
    monkeypatch.setattr(inject, "TEXT_ENCODER_TARGETS", ("no_such_layer",))
    with pytest.raises(ValueError, match="matched no nn.Linear module in CLIPTextModel"):
        dorabooth.attach(pipe, rank=2, text_encoders=True)
    assert not inject.pipeline_dora_modules(pipe)
    assert all(p.requires_grad for p in pipe.unet.parameters())


def test_strength_merge_unmerge_detach(pipe):
    base_unet, base_te = unet_output(pipe), text_encoder_output(pipe)
    originals = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, nn.Linear)}
    w0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    dorabooth.attach(pipe, rank=4, alpha=8, text_encoders=True)
    adapted(pipe)
    full = unet_output(pipe)
    assert rel_err(full, base_unet) > 1e-2  # the adapter does something

    dorabooth.set_strength(pipe, 0.0)
    assert torch.equal(unet_output(pipe), base_unet)
    assert torch.equal(text_encoder_output(pipe), base_te)
    dorabooth.set_strength(pipe, 0.5)
    half = unet_output(pipe)
    dorabooth.merge(pipe)
    assert rel_err(unet_output(pipe), half) < 1e-5
    with pytest.raises(RuntimeError, match="unmerge"):
        dorabooth.set_strength(pipe, 1.0)
    dorabooth.unmerge(pipe)
    dorabooth.set_strength(pipe, 1.0)
    assert torch.equal(unet_output(pipe), full)

    dorabooth.merge(pipe)
    names = dorabooth.detach(pipe)  # detach unmerges: W0 comes back bit-exactly
    assert names and all(n.startswith(("unet.", "text_encoder")) for n in names)
    assert all(m is originals[n] for n, m in pipe.unet.named_modules() if n in originals)
    assert all(torch.equal(v, w0[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(unet_output(pipe), base_unet)
    assert all(p.requires_grad for c in ("unet", "vae") for p in getattr(pipe, c).parameters())


def test_strength_needs_adapters(pipe):
    with pytest.raises(ValueError, match="no dorabooth adapters; attach"):
        dorabooth.set_strength(pipe, 0.5)


def test_merge_is_all_or_nothing(pipe):
    dorabooth.attach(pipe, rank=2, text_encoders=True)
    adapted(pipe)
    w0 = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    layers = list(inject.iter_layers(pipe))
    with torch.no_grad():
        layers[-1].lora_B.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="not finite"):
        dorabooth.merge(pipe)
    assert not any(layer.merged for layer in layers)
    assert all(torch.equal(v, w0[k]) for k, v in pipe.unet.state_dict().items())
