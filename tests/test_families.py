"""Model-family detection (dorabooth/families.py)."""

from types import SimpleNamespace

import pytest

from dorabooth.families import Family, check_family, detect_family


def test_tiny_pipelines(pipe, family_name):
    family = detect_family(pipe)
    assert family.name == {"sd15": "sd1", "sdxl": "sdxl"}[family_name]
    assert family.prediction_type == "epsilon"
    expected = ("text_encoder",) if family_name == "sd15" else ("text_encoder", "text_encoder_2")
    assert family.text_encoders == expected
    assert family.components == ("unet", *expected)


def fake_pipe(cross_attention_dim, hidden_act="quick_gelu", prediction="epsilon", addition=None):
    unet = SimpleNamespace(config={"cross_attention_dim": cross_attention_dim, "addition_embed_type": addition})
    te = SimpleNamespace(config=SimpleNamespace(hidden_act=hidden_act))
    return SimpleNamespace(unet=unet, text_encoder=te, scheduler=SimpleNamespace(config=SimpleNamespace(prediction_type=prediction)))


@pytest.mark.parametrize("dim, act, addition, name", [
    (768, "quick_gelu", None, "sd1"),
    (1024, "gelu", None, "sd2"),
    (64, "gelu", None, "sd2"),
    (2048, "quick_gelu", "text_time", "sdxl"),
])
def test_real_model_shapes(dim, act, addition, name):
    assert detect_family(fake_pipe(dim, act, "v_prediction", addition)).name == name
    assert detect_family(fake_pipe(dim, act, "v_prediction", addition)).prediction_type == "v_prediction"


def test_errors():
    with pytest.raises(TypeError, match="has no UNet"):
        detect_family(SimpleNamespace())
    with pytest.raises(ValueError, match="unknown model family 'sd3'"):
        Family("sd3", ())
    with pytest.raises(ValueError, match="trained on a sdxl model but the pipeline is sd1; load it onto a sdxl"):
        check_family("sdxl", Family("sd1", ("text_encoder",)), source="a.safetensors")
