"""The optimizer choices: LoRA+ parameter groups, Prodigy's defaults and refusals, the EMA rule,
the flags that set them."""

import sys

import pytest
import torch

from dorabooth import cli
from dorabooth.config import TrainConfig
from dorabooth.ema import EMA, ema_decay
from dorabooth.optim import check_optimizer_available, make_optimizer, param_groups

BASE = {"images": "i", "class_noun": "dog", "out": "o"}


def _params():
    """Names as setup_method gives them: two DoRA layers (UNet, text encoder) and a bias."""
    shapes = {"unet.a.to_q.lora_A.weight": (4, 8), "unet.a.to_q.lora_B.weight": (8, 4),
              "unet.a.to_q.lora_magnitude_vector": (8,), "unet.b.bias": (8,),
              "text_encoder.q.lora_A.weight": (4, 8), "text_encoder.q.lora_B.weight": (8, 4),
              "text_encoder.q.lora_magnitude_vector": (8,)}
    return {n: torch.nn.Parameter(torch.randn(s)) for n, s in shapes.items()}


def _groups_by_name(params, config):
    names = {id(p): n for n, p in params.items()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(params, config) for p in g["params"]}


def test_loraplus_gives_the_up_matrices_ratio_times_the_lr():
    params = _params()
    plain = _groups_by_name(params, TrainConfig(**BASE, lr=1e-4, text_encoder_lr=5e-5))
    plus = _groups_by_name(params, TrainConfig(**BASE, lr=1e-4, text_encoder_lr=5e-5, loraplus_ratio=16))
    for name, (lr, decay) in plus.items():
        expected = plain[name][0] * (16 if ".lora_B." in name else 1)
        assert lr == pytest.approx(expected) and decay == plain[name][1], name
    assert plus["unet.a.to_q.lora_B.weight"] == (pytest.approx(1.6e-3), 1e-2)
    assert plus["text_encoder.q.lora_B.weight"][0] == pytest.approx(8e-4)
    assert plus["unet.a.to_q.lora_magnitude_vector"] == (1e-4, 0.0)            # the magnitude keeps lr, no decay
    assert len(param_groups(params, TrainConfig(**BASE, lr=1e-4, text_encoder_lr=1e-4))) == 4          # without LoRA+: as before


def test_prodigy_defaults_and_refusals():
    c = TrainConfig(**BASE, optimizer="prodigy").with_defaults({"lr": 1e-4, "rank": 4, "resolution": 64, "steps": 10,
                                                                "num_class_images": 2, "class_image_steps": 2,
                                                                "train_text_encoders": False})
    assert (c.lr, c.text_encoder_lr) == (1.0, 1.0)                                # Prodigy's lr, not the family's
    opt = make_optimizer(_params(), c)
    assert type(opt).__name__ == "Prodigy" and {g["lr"] for g in opt.param_groups} == {1.0}
    with pytest.raises(ValueError, match="Prodigy takes one learning rate.*drop --loraplus-ratio"):
        TrainConfig(**BASE, optimizer="prodigy", loraplus_ratio=16)
    with pytest.raises(ValueError, match="Prodigy takes one learning rate.*drop --text-encoder-lr"):
        TrainConfig(**BASE, optimizer="prodigy", lr=1.0, text_encoder_lr=0.5)
    with pytest.raises(ValueError, match="with --method full leave --loraplus-ratio off"):
        TrainConfig(**BASE, method="full", loraplus_ratio=16)
    with pytest.raises(ValueError, match=r"loraplus_ratio 0: use a number in \(0, 1000\]"):
        TrainConfig(**BASE, loraplus_ratio=0)
    for bad in (0.0, 1.0, float("nan")):
        with pytest.raises(ValueError, match="ema_decay .*: use a number in \\(0, 1\\) such as 0.999"):
            TrainConfig(**BASE, ema_decay=bad)
    with pytest.raises(ValueError, match="with --method full leave --ema-decay off"):
        TrainConfig(**BASE, method="full", ema_decay=0.999)


def test_missing_prodigyopt_is_one_line_with_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)                          # import fails as if not installed
    with pytest.raises(ValueError) as e:
        check_optimizer_available("prodigy")
    assert "\n" not in str(e.value) and "`pip install prodigyopt`" in str(e.value) and "dorabooth[prodigy]" in str(e.value)


def test_flags_reach_the_config():
    args = cli.build_parser().parse_args(["train", "--images", "i", "--class-noun", "dog", "--out", "o",
                                          "--optimizer", "prodigy", "--ema-decay", "0.999"])
    c = cli.train_config_from_args(args)
    assert (c.optimizer, c.ema_decay, c.loraplus_ratio, c.lr) == ("prodigy", 0.999, None, None)
    args = cli.build_parser().parse_args(["train", "--images", "i", "--class-noun", "dog", "--out", "o",
                                          "--loraplus-ratio", "16"])
    assert cli.train_config_from_args(args).loraplus_ratio == 16.0


def test_ema_rule_is_diffusers_emamodel_default():
    """decay(n) = min(D, n / (n + 9)), 0 at the first step: diffusers' EMAModel with its defaults."""
    from diffusers.training_utils import EMAModel

    p = torch.nn.Parameter(torch.zeros(3))
    theirs = EMAModel([p], decay=0.95)
    assert [ema_decay(n, 0.95) for n in range(1, 200)] == [theirs.get_decay(n) for n in range(1, 200)]
    ours = EMA({"p": p}, 0.95)
    for n in range(1, 30):
        with torch.no_grad():
            p.add_(torch.randn(3))
        ours.update(n)
        theirs.step([p])
    torch.testing.assert_close(ours.tensors["p"], theirs.shadow_params[0], rtol=0, atol=1e-6)
    raw = p.detach().clone()
    with ours.applied():
        assert torch.equal(p, ours.tensors["p"])
    assert torch.equal(p, raw)
