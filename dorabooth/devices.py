"""What the machine can do, and the precision / checkpointing / optimizer a run gets on it.

One resolver for the trainer, ``dorabooth train --dry-run`` and the app:
:func:`resolve_device_settings` takes a config (``None`` fields = "auto"), the base model's
preset (``families.preset_name``: toy | sd1 | sd2 | sdxl) and a :class:`DeviceInfo`, and
returns :class:`DeviceSettings` with a reason in words for every choice. It is pure, so a
CUDA machine can be described and tested on a CPU box; :func:`detect_device` describes this
machine. Explicit choices always win; the rules for "auto" (also in docs/training.md):

- mixed precision: CUDA → ``bf16`` where the GPU supports it, else ``fp16``; CPU and Apple
  GPUs → ``no`` (fp32). A ``bf16``/``fp16`` request on a CPU without instructions for it
  (AVX512_BF16/AMX_BF16, AVX512_FP16/AMX_FP16 in /proc/cpuinfo) warns that it is emulated
  and slow; ``bf16`` on a GPU without bf16 is an error.
- VAE: always fp32 (``train.place`` keeps it so): SDXL's VAE overflows in fp16, and with
  cached latents it runs once per image.
- gradient checkpointing: on for the ``sdxl`` preset, and wherever the memory estimate
  without it (:mod:`dorabooth.memory`) exceeds 90 % of the device's memory; else off.
- optimizer: ``adamw8bit`` where bitsandbytes' 8-bit AdamW works (imports, CUDA), else
  ``adamw``.
- latents: cached (``cache_latents``, default on): the VAE encodes each image once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .config import TrainConfig

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")
CHECKPOINTING_PRESETS = ("sdxl",)
MEMORY_HEADROOM = 0.9             # gradient checkpointing turns on above this share of device memory


class EmulatedPrecisionWarning(UserWarning):
    """bf16/fp16 asked for on a CPU that has no instructions for it: it runs, slowly."""


@dataclass(frozen=True)
class DeviceInfo:
    """The device a run trains on, as far as the choices below need it."""

    kind: str                          # "cuda" | "mps" | "cpu"
    name: str                          # "NVIDIA A10G", "CPU (AMD EPYC)", …
    memory: int | None = None          # bytes: the GPU's total memory, or the machine's RAM for a CPU
    bf16: bool = False                 # bf16 in hardware: torch.cuda.is_bf16_supported(), or CPU flags
    fp16: bool = False                 # fp16 in hardware: every CUDA GPU; CPU flags
    adamw8bit_problem: str | None = "not checked"   # None: bitsandbytes' 8-bit AdamW works here; else why not

    def __post_init__(self):
        if self.kind not in ("cuda", "mps", "cpu"):
            raise ValueError(f"device kind {self.kind!r}: use cuda, mps or cpu")

    @property
    def label(self) -> str:
        memory = f", {self.memory / 2**30:.0f} GiB" if self.memory else ""
        return f"{self.name}{memory}"


def detect_device() -> DeviceInfo:
    """This machine's training device, as accelerate will pick it (CUDA, then MPS, then CPU)."""
    import torch

    from .optim import bitsandbytes_problem

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return DeviceInfo("cuda", props.name, props.total_memory, bf16=torch.cuda.is_bf16_supported(), fp16=True,
                          adamw8bit_problem=bitsandbytes_problem())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return DeviceInfo("mps", "Apple GPU (MPS)", _ram(), bf16=False, fp16=True,
                          adamw8bit_problem="bitsandbytes' 8-bit AdamW needs a CUDA GPU")
    flags, model = cpu_flags()
    return DeviceInfo("cpu", f"CPU ({model})" if model else "CPU", _ram(),
                      bf16=any(f in flags for f in CPU_BF16_FLAGS), fp16=any(f in flags for f in CPU_FP16_FLAGS),
                      adamw8bit_problem="bitsandbytes' 8-bit AdamW needs a CUDA GPU")


def cpu_flags(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> tuple[frozenset[str], str]:
    """(instruction-set flags, model name) of the first CPU in ``/proc/cpuinfo``; empty where
    there is no such file (macOS, Windows: bf16/fp16 then count as emulated)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset(), ""
    flags, model = frozenset(), ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


def _ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class DeviceSettings:
    """What a run uses on its device; ``reasons`` says why, one sentence per choice."""

    device: str                          # the DeviceInfo label
    mixed_precision: str                 # no | fp16 | bf16
    vae_dtype: str                       # fp32 | fp16 | bf16
    gradient_checkpointing: bool
    optimizer: str                       # adamw | adamw8bit
    cache_latents: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    auto: frozenset[str] = field(default_factory=frozenset)   # the fields chosen here (not by the user)

    def apply(self, config: TrainConfig) -> TrainConfig:
        """``config`` with these values in its device-dependent fields (what config.json records)."""
        return replace(config, mixed_precision=self.mixed_precision, optimizer=self.optimizer,
                       gradient_checkpointing=self.gradient_checkpointing, cache_latents=self.cache_latents)

    def to_dict(self) -> dict:
        return {"device": self.device, "mixed_precision": self.mixed_precision, "vae_dtype": self.vae_dtype,
                "gradient_checkpointing": self.gradient_checkpointing, "optimizer": self.optimizer,
                "cache_latents": self.cache_latents, "reasons": list(self.reasons), "warnings": list(self.warnings),
                "auto": sorted(self.auto)}


def resolve_device_settings(config: TrainConfig, preset: str, device: DeviceInfo,
                            memory_without_checkpointing: int | None = None) -> DeviceSettings:
    """The device-dependent settings of a run (module docstring: the rules).

    ``preset``: ``families.preset_name`` of the base model (toy | sd1 | sd2 | sdxl).
    ``memory_without_checkpointing``: the peak estimate in bytes with gradient checkpointing
    off (``memory.estimate_memory``), if known; above 90 % of ``device.memory`` it turns on.
    Raises ValueError for a choice the device cannot run (bf16 on a GPU without it, 8-bit
    AdamW without bitsandbytes + CUDA), naming the flag to change.
    """
    reasons, warnings, auto = [], [], set()

    precision = config.mixed_precision
    if precision is None:
        auto.add("mixed_precision")
        precision, why = _auto_precision(device)
        reasons.append(why)
    else:
        reasons.append(f"mixed precision {precision}: your choice")
        problem = _precision_problem(precision, device)
        if problem:
            warnings.append(problem)

    vae = "fp32"                                        # train.place keeps it so, whatever the precision
    reasons.append("VAE in fp32" + (": SDXL's VAE overflows in fp16" if preset == "sdxl" else "")
                   + ("; with cached latents it encodes each image once (fp32 costs 0.17 GB over half precision)"
                      if config.cache_latents else ""))

    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        auto.add("gradient_checkpointing")
        checkpointing, why = _auto_checkpointing(preset, device, memory_without_checkpointing)
        reasons.append(why)
    else:
        reasons.append(f"gradient checkpointing {'on' if checkpointing else 'off'}: your choice")

    optimizer = config.optimizer
    if optimizer is None:
        auto.add("optimizer")
        if device.adamw8bit_problem is None:
            optimizer = "adamw8bit"
            reasons.append("8-bit AdamW: bitsandbytes works on this GPU (optimizer state 2 bytes a parameter "
                           "instead of 8)")
        else:
            optimizer = "adamw"
            reasons.append(f"AdamW (fp32 state): {device.adamw8bit_problem}")
    else:
        problem = _chosen_adamw8bit_problem(device) if optimizer == "adamw8bit" else None
        if problem is not None:
            raise ValueError(f"optimizer adamw8bit: {problem}; use --optimizer adamw on this machine "
                             f"(or install bitsandbytes on a CUDA machine)")
        reasons.append(f"optimizer {optimizer}: your choice")

    cache = config.cache_latents
    reasons.append("latents cached: the VAE encodes each image once" if cache
                   else "latents not cached (your choice): the VAE encodes every batch")
    if not config.train_text_encoders:
        reasons.append("prompt embeddings cached: the text encoders are frozen")
    return DeviceSettings(device.label, precision, vae, bool(checkpointing), optimizer, cache, tuple(reasons),
                          tuple(warnings), frozenset(auto))


def _chosen_adamw8bit_problem(device: DeviceInfo) -> str | None:
    """Why an explicit ``--optimizer adamw8bit`` cannot run: "auto" takes it on CUDA only, but
    asked for on a CPU it runs where bitsandbytes' CPU optimizers do (tried then, not before:
    importing bitsandbytes costs seconds)."""
    if device.kind == "cpu" and device.adamw8bit_problem is not None:
        from .optim import bitsandbytes_problem
        return bitsandbytes_problem("cpu")
    return device.adamw8bit_problem


def _auto_precision(device: DeviceInfo) -> tuple[str, str]:
    if device.kind == "cuda":
        if device.bf16:
            return "bf16", f"mixed precision bf16: {device.name} supports bf16"
        return "fp16", (f"mixed precision fp16: {device.name} has no bf16 (frozen weights fp16, trainable "
                        f"ones fp32, the VAE fp32)")
    if device.kind == "mps":
        return "no", ("full precision (fp32): mixed precision is not measured on Apple GPUs; "
                      "--mixed-precision fp16 to try it")
    hint = ("; it has bf16 instructions, --mixed-precision bf16 may be faster" if device.bf16
            else "; it has no bf16/fp16 instructions (both would be emulated)")
    return "no", f"full precision (fp32) on the CPU{hint}"


def _precision_problem(precision: str, device: DeviceInfo) -> str | None:
    """A warning for a precision the device emulates; raises for one it cannot run."""
    if precision == "no":
        return None
    if device.kind == "cuda" and precision == "bf16" and not device.bf16:
        raise ValueError(f"mixed precision bf16: {device.name} has no bf16 support; use --mixed-precision fp16 "
                         f"(the VAE stays fp32) or no")
    if device.kind == "cpu" and not (device.bf16 if precision == "bf16" else device.fp16):
        flags = " / ".join(f.upper() for f in (CPU_BF16_FLAGS if precision == "bf16" else CPU_FP16_FLAGS))
        return (f"{precision} on this CPU is emulated and slow: it has no {flags} instructions (one full-size "
                f"SDXL step in bf16 did not finish in 13 min on such a CPU); use --mixed-precision no")
    return None


def _auto_checkpointing(preset: str, device: DeviceInfo, without: int | None) -> tuple[bool, str]:
    if preset in CHECKPOINTING_PRESETS:
        return True, ("gradient checkpointing on: SDXL's activations at 1024 px are over twice as large without it "
                      "(the estimate shows both with --gradient-checkpointing / --no-gradient-checkpointing)")
    if without is not None and device.memory and without > MEMORY_HEADROOM * device.memory:
        return True, (f"gradient checkpointing on: the estimate without it ({without / 2**30:.2f} GiB) is over "
                      f"{MEMORY_HEADROOM:.0%} of {device.memory / 2**30:.0f} GiB")
    return False, "gradient checkpointing off: the run fits without it" + (
        "" if without is None or not device.memory else
        f" (estimate {without / 2**30:.2f} GiB of {device.memory / 2**30:.0f} GiB)")


DTYPE_BYTES = {"no": 4, "fp32": 4, "fp16": 2, "bf16": 2}
