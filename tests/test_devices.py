"""The device resolver on described machines (CUDA with and without bf16, CPUs with and
without bf16/fp16 instructions, Apple GPUs), explicit choices winning, /proc/cpuinfo parsing."""

import pytest

from dorabooth.config import TrainConfig
from dorabooth.devices import DeviceInfo, DeviceSettings, cpu_flags, detect_device, resolve_device_settings

GiB = 2**30
BASE = dict(images="imgs", class_noun="dog", out="run")
A100 = DeviceInfo("cuda", "NVIDIA A100", 80 * GiB, bf16=True, fp16=True, adamw8bit_problem=None)
T4 = DeviceInfo("cuda", "Tesla T4", 15 * GiB, bf16=False, fp16=True, adamw8bit_problem=None)
T4_NO_BNB = DeviceInfo("cuda", "Tesla T4", 15 * GiB, fp16=True, adamw8bit_problem="bitsandbytes is not installed")
OLD_CPU = DeviceInfo("cpu", "CPU (AVX2 only)", 24 * GiB, bf16=False, fp16=False,
                     adamw8bit_problem="bitsandbytes' 8-bit AdamW needs a CUDA GPU")
BF16_CPU = DeviceInfo("cpu", "CPU (AVX512_BF16)", 24 * GiB, bf16=True, fp16=False,
                      adamw8bit_problem="bitsandbytes' 8-bit AdamW needs a CUDA GPU")
MAC = DeviceInfo("mps", "Apple GPU (MPS)", 32 * GiB, fp16=True, adamw8bit_problem="needs a CUDA GPU")


def resolve(device, preset="sd1", memory=None, **fields):
    return resolve_device_settings(TrainConfig(**BASE, **fields), preset, device, memory)


def test_cuda_with_bf16():
    s = resolve(A100)
    assert (s.mixed_precision, s.vae_dtype, s.optimizer, s.gradient_checkpointing, s.cache_latents) == \
        ("bf16", "fp32", "adamw8bit", False, True)
    assert s.auto == {"mixed_precision", "gradient_checkpointing", "optimizer"} and not s.warnings
    assert any("NVIDIA A100 supports bf16" in r for r in s.reasons)
    assert any("8-bit AdamW" in r for r in s.reasons)


def test_cuda_without_bf16_takes_fp16_with_an_fp32_vae_and_refuses_bf16():
    s = resolve(T4, preset="sdxl")
    assert (s.mixed_precision, s.vae_dtype) == ("fp16", "fp32")
    assert any("SDXL's VAE overflows in fp16" in r for r in s.reasons)
    with pytest.raises(ValueError, match="Tesla T4 has no bf16 support; use --mixed-precision fp16"):
        resolve(T4, mixed_precision="bf16")
    assert resolve(T4, mixed_precision="no").mixed_precision == "no"          # the user's choice wins


def test_optimizer_follows_bitsandbytes():
    assert resolve(T4_NO_BNB).optimizer == "adamw"
    assert any("bitsandbytes is not installed" in r for r in resolve(T4_NO_BNB).reasons)
    with pytest.raises(ValueError, match="use --optimizer adamw"):
        resolve(MAC, optimizer="adamw8bit")
    assert resolve(OLD_CPU).optimizer == "adamw"                              # auto: 8-bit on CUDA only


def test_adamw8bit_asked_for_on_a_cpu_runs_where_bitsandbytes_does():
    """Recent bitsandbytes has CPU optimizers: an explicit --optimizer adamw8bit on a CPU is tried
    (a step on a 4096-element tensor) and refused, with the reason, only when it fails."""
    from dorabooth.optim import bitsandbytes_problem

    problem = bitsandbytes_problem("cpu")
    if problem is None:
        assert resolve(OLD_CPU, optimizer="adamw8bit").optimizer == "adamw8bit"
    else:
        with pytest.raises(ValueError, match=f"optimizer adamw8bit: {problem[:40]}.*use --optimizer adamw"):
            resolve(OLD_CPU, optimizer="adamw8bit")
    assert resolve(A100, optimizer="adamw").optimizer == "adamw"             # explicit beats auto


@pytest.mark.parametrize("preset,on", [("sdxl", True), ("sd1", False), ("sd2", False), ("toy", False)])
def test_gradient_checkpointing_by_preset(preset, on):
    s = resolve(A100, preset=preset)
    assert s.gradient_checkpointing is on and "gradient_checkpointing" in s.auto
    assert resolve(A100, preset=preset, gradient_checkpointing=not on).gradient_checkpointing is (not on)


def test_gradient_checkpointing_when_the_estimate_does_not_fit():
    assert resolve(T4, memory=int(0.8 * 15 * GiB)).gradient_checkpointing is False
    s = resolve(T4, memory=14 * GiB)                                         # over 90 % of 15 GiB
    assert s.gradient_checkpointing is True and any("14.00 GiB) is over 90%" in r for r in s.reasons)
    assert resolve(T4, memory=14 * GiB, gradient_checkpointing=False).gradient_checkpointing is False


def test_cpu_defaults_to_fp32_and_warns_about_emulated_half_precision():
    s = resolve(OLD_CPU)
    assert (s.mixed_precision, s.optimizer, s.gradient_checkpointing) == ("no", "adamw", False)
    assert not s.warnings and any("no bf16/fp16 instructions" in r for r in s.reasons)
    for precision in ("bf16", "fp16"):
        warned = resolve(OLD_CPU, mixed_precision=precision)
        assert warned.mixed_precision == precision                           # it runs, as asked
        assert len(warned.warnings) == 1 and "emulated and slow" in warned.warnings[0]
        assert "--mixed-precision no" in warned.warnings[0]
    assert resolve(BF16_CPU, mixed_precision="bf16").warnings == ()           # AVX512_BF16: native
    assert "AVX512_FP16" in resolve(BF16_CPU, mixed_precision="fp16").warnings[0]
    assert any("bf16 may be faster" in r for r in resolve(BF16_CPU).reasons)


def test_apple_gpu():
    s = resolve(MAC)
    assert (s.mixed_precision, s.optimizer) == ("no", "adamw") and not s.warnings


def test_apply_writes_the_resolved_values_into_the_config():
    config = TrainConfig(**BASE, gradient_checkpointing=True)
    s = resolve_device_settings(config, "sdxl", T4)
    applied = s.apply(config)
    assert (applied.mixed_precision, applied.gradient_checkpointing, applied.optimizer) == ("fp16", True, "adamw8bit")
    assert s.auto == {"mixed_precision", "optimizer"}
    d = s.to_dict()
    assert d["device"] == "Tesla T4, 15 GiB" and d["auto"] == ["mixed_precision", "optimizer"]
    assert isinstance(s, DeviceSettings)


def test_cpu_flags_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu\n")
    flags, model = cpu_flags(info)
    assert model == "AMD EPYC 9R14" and "avx512_bf16" in flags and "amx_bf16" not in flags
    assert cpu_flags(tmp_path / "missing") == (frozenset(), "")


def test_this_machine_is_described():
    import torch

    device = detect_device()
    if torch.cuda.is_available():
        assert device.kind == "cuda" and device.memory
    else:
        flags, _ = cpu_flags()
        assert device.kind in ("cpu", "mps")
        if device.kind == "cpu":
            assert device.bf16 == bool({"avx512_bf16", "amx_bf16"} & flags) and device.adamw8bit_problem
    with pytest.raises(ValueError, match="device kind"):
        DeviceInfo("tpu", "x")
