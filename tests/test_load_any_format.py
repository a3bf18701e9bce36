"""`dorabooth.load_adapter` reads every adapter format into a live pipeline, on both axes."""

import pytest
import torch

import dorabooth
from dorabooth.export import convert
from dorabooth.inject import iter_layers
from export_helpers import BUILDERS, adapted
from tiny_models import rel_err, text_encoder_output, unet_output


@pytest.mark.parametrize("kind,axis", [("sdxl", "out"), ("sdxl", "in"), ("sd15", "in")])
def test_kohya_file_loads_live_and_matches(tmp_path, kind, axis):
    trained = adapted(kind, axis)
    with torch.no_grad():
        ref_unet, ref_te = unet_output(trained), text_encoder_output(trained)
    ours = dorabooth.save_adapter(trained, tmp_path / "adapter.safetensors")
    kohya = tmp_path / "kohya.safetensors"
    convert(ours, to="kohya", out=kohya)

    fresh = BUILDERS[kind]()                       # same seed: same base weights
    names = dorabooth.load_adapter(fresh, kohya)
    assert any(n.startswith("text_encoder.") for n in names) and any(n.startswith("unet.") for n in names)
    layers = list(iter_layers(fresh))
    assert {m.magnitude_axis for m in layers} == {axis}             # never reinterpreted
    with torch.no_grad():
        assert rel_err(unet_output(fresh), ref_unet) < 1e-5
        assert rel_err(text_encoder_output(fresh), ref_te) < 1e-5
