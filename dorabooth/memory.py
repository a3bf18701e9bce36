"""A run planned before any weight is loaded, and its peak accelerator memory.

:func:`plan_run` takes a config, the base model's :class:`~dorabooth.specs.ModelSpec` (its
configs) and a :class:`~dorabooth.devices.DeviceInfo`, fills in the family defaults and the
device settings and estimates the peak memory of one training step; the trainer,
``dorabooth train --dry-run`` and the app's Train tab all go through it.

The estimate (:func:`estimate_memory`; also in docs/training.md), in bytes:

    frozen weights      Σ_components P_c · bytes(dtype_c)     UNet and text encoders in the weight dtype
                                                              (fp32, or fp16/bf16 with mixed precision; the
                                                              trained ones fp32 with --method full), VAE fp32;
                                                              with --quantize-base nf4 the adapted Linears'
                                                              weights NF4_BYTES each (QDoRA)
    trainable (fp32)    4 · N                                 N = trainable parameters: per adapted Linear
                                                              (out, in): r·(in + out) + out (DoRA, axis out)
                                                              or + in (axis in); LoRA r·(in + out); full: all
    gradients (fp32)    4 · N
    optimizer state     8 · N  (AdamW: m and v in fp32)  or  2 · N  (8-bit AdamW)
    activations         B · (a + b·x + c·x²) · f  +  B · Σ_te c_te · f   (the second term only when
                                                              text encoders train)

with ``B`` = UNet batch items per micro-batch (``batch_size``, doubled by prior
preservation), ``x`` = latent pixels ((resolution / 8)²), ``a``, ``b``, ``c`` from the curve
through three measured resolutions per family, with and without gradient checkpointing
(``MEASURED_UNET`` → ``ACTIVATIONS``), ``c_te`` per text encoder
(``TEXT_ENCODER_ACTIVATIONS``), and ``f`` = 1 in fp32 or the measured half-precision ratio
(``HALF_PRECISION_ACTIVATIONS``). Not included: the CUDA context and allocator slack (about
0.5–1 GB on a GPU) and cached latents (they stay on the CPU). Sampling (class images before
training, previews during it) is the other peak, reported beside the step's: frozen weights
+ trainable + optimizer state + the fp32 VAE decoding one image (``VAE_DECODE``, measured).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from .config import DEVICE_FIELDS, TrainConfig
from .devices import DTYPE_BYTES, DeviceInfo, DeviceSettings, resolve_device_settings
from .specs import PUBLISHED, ModelSpec, adapted_weights, trainable_parameters

# ---- measured activation terms (bench/activation_memory.py; docs/training.md has the table) ---
# Activation bytes of one UNet training step, one batch item, fp32, DoRA r=16 on "attn", without /
# with gradient checkpointing, by resolution: peak RSS − RSS before the step (freed pages handed
# back first) − gradient bytes, on the full-size fixtures (torch 2.13 CPU, SDPA attention),
# 2026-11-30. The curve through the three points of each row gives a, b, c of a + b·x + c·x²,
# x = latent pixels: with checkpointing the growth is faster than linear (a line through 256 and
# 512 px fell 15 % short of SDXL at 1024 px and 18 % of SD 2.1 at 768 px).
MEASURED_UNET: dict[str, dict[bool, dict[int, int]]] = {
    "sd1": {False: {256: 687_507_456, 512: 2_082_727_936, 640: 3_233_495_040},
            True: {256: 420_739_072, 512: 1_221_199_872, 640: 1_785_497_600}},
    "sd2": {False: {256: 673_708_032, 512: 2_011_326_464, 768: 4_541_528_064},
            True: {256: 422_746_112, 512: 1_004_550_144, 768: 2_411_743_232}},
    "sdxl": {False: {256: 1_049_075_712, 512: 3_635_748_864, 768: 7_803_883_520},
             True: {256: 631_902_208, 512: 1_506_304_000, 1024: 5_906_800_640}},
}

# Bytes of optimizer state per trainable parameter.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
_OPTIMIZER_STATE_WHAT = {"adamw8bit": "8-bit AdamW", "prodigy": "Prodigy: m, v, s, x0 in fp32"}


def _curve(points: dict[int, int]) -> tuple[float, float, float]:
    """(a, b, c) of the polynomial a + b·x + c·x² (x = latent pixels, (px / 8)²) through three
    (resolution → bytes) points; through two points, the line (c = 0)."""
    xs = [(r // 8) ** 2 for r in sorted(points)]
    ys = [points[r] for r in sorted(points)]
    if len(xs) == 2:
        b = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return ys[0] - b * xs[0], b, 0.0
    (x0, x1, x2), (y0, y1, y2) = xs, ys                  # Newton's divided differences
    d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
    c = (d12 - d01) / (x2 - x0)
    b = d01 - c * (x0 + x1)
    return y0 - b * x0 - c * x0 * x0, b, c


ACTIVATIONS: dict[str, dict[bool, tuple[float, float, float]]] = {
    family: {ckpt: _curve(points) for ckpt, points in by_ckpt.items()} for family, by_ckpt in MEASURED_UNET.items()}
# A text encoder's activations while it trains (DoRA r=16 on q/k/v/out_proj), 77 tokens, fp32,
# measured the same way with a batch of 4 (sd15's CLIP-L, sd21's OpenCLIP-H, sdxl's bigG), without /
# with gradient checkpointing; per batch item = bytes / 4.
MEASURED_TEXT_ENCODERS: dict[str, dict[bool, int]] = {
    "clip-l": {False: 271_761_408, True: 160_940_032},
    "openclip-h": {False: 450_506_752, True: 286_355_456},
    "openclip-bigg": {False: 761_421_824, True: 434_032_640},
}
TEXT_ENCODER_ACTIVATIONS: dict[str, dict[bool, float]] = {
    name: {ckpt: n / 4 for ckpt, n in by_ckpt.items()} for name, by_ckpt in MEASURED_TEXT_ENCODERS.items()}
# The VAE decoding one image without gradients in fp32 (class images and previews), measured the
# same way on sd15's VAE (SD 1.x, 2.x and SDXL share its architecture), by image side; scaled by
# parameter count for other VAEs.
MEASURED_VAE_DECODE = {512: 1_234_747_392, 1024: 4_241_514_496}
VAE_DECODE = _curve(MEASURED_VAE_DECODE)
_MEASURED_VAE_PARAMETERS = 83_653_863
# QDoRA (--quantize-base nf4): per weight a 4-bit code, an int8 block scale per 64 and a float
# factor per group of up to 256 scales (dorabooth.quantize; measured 0.258 × bf16 on SD 320 × 640).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# bf16 (CPU autocast, frozen weights bf16) / fp32 activations on SD 1.5 at 512 px: 0.520 without and
# 0.494 with gradient checkpointing; fp16 is taken to be the same (same element size).
HALF_PRECISION_ACTIVATIONS = 0.51
_TEXT_ENCODERS = {"clip-l": (768, 12), "openclip-h": (1024, 23), "openclip-bigg": (1280, 32)}


# =============================================================================================
# The estimate
# =============================================================================================
@dataclass(frozen=True)
class MemoryTerm:
    name: str
    bytes: int
    formula: str                   # how the number was made, in the words of the module docstring


@dataclass(frozen=True)
class MemoryEstimate:
    terms: tuple[MemoryTerm, ...]           # of one training step; they add up to ``total``
    device_memory: int | None = None
    notes: tuple[str, ...] = ()
    sampling: MemoryTerm | None = None      # the other peak: decoding a class/preview image
    advice: str = ""                        # what to change when the peak is over the device's memory

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def peak(self) -> int:
        """The larger of the training step and sampling."""
        return max(self.total, self.sampling.bytes if self.sampling else 0)

    def table(self) -> str:
        """The terms as an aligned text table (what --dry-run prints)."""
        width = max(len(t.name) for t in self.terms)
        lines = [f"  {t.name:<{width}}  {_gib(t.bytes):>10}  {t.formula}" for t in self.terms]
        lines.append(f"  {'total':<{width}}  {_gib(self.total):>10}  one training step")
        if self.sampling:
            lines.append(f"  {self.sampling.name:<{width}}  {_gib(self.sampling.bytes):>10}  {self.sampling.formula}")
        if self.device_memory:
            share = self.peak / self.device_memory
            lines.append(f"  {'device':<{width}}  {_gib(self.device_memory):>10}  "
                         f"{share:.0%} of it" + (f"  ← over: {self.advice}" if share > 1 else ""))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"terms": {t.name: t.bytes for t in self.terms}, "total": self.total,
                "sampling": self.sampling.bytes if self.sampling else None, "peak": self.peak,
                "device_memory": self.device_memory, "notes": list(self.notes)}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def estimate_memory(spec: ModelSpec, config: TrainConfig, settings: DeviceSettings,
                    device_memory: int | None = None) -> MemoryEstimate:
    """Peak memory of one training step for a resolved ``config`` on ``settings`` (module
    docstring: the formula)."""
    trainable = trainable_parameters(spec, config)
    n = sum(trainable.values())
    weight_bytes = DTYPE_BYTES[settings.mixed_precision]
    frozen, parts = 0, []
    nf4 = adapted_weights(spec, config) if config.quantize_base == "nf4" else {}
    for component, count in spec.parameters.items():
        if component == "vae":
            size, dtype = DTYPE_BYTES[settings.vae_dtype], settings.vae_dtype
        elif config.method == "full" and component in trainable:
            continue                                   # all trainable: counted below in fp32
        else:
            size, dtype = weight_bytes, {"no": "fp32"}.get(settings.mixed_precision, settings.mixed_precision)
        q = nf4.get(component, 0)
        frozen += (count - q) * size + int(q * NF4_BYTES)
        parts.append(f"{component} {_count(count)} × {dtype}" + (f" ({_count(q)} of them NF4)" if q else ""))
    state = OPTIMIZER_STATE_BYTES.get(settings.optimizer, 8) + (4 if config.ema_decay else 0)   # + the EMA copy
    acts, act_formula, notes = _activations(spec, config, settings)
    terms = (
        MemoryTerm("frozen weights", frozen, " + ".join(parts)),
        MemoryTerm("trainable (fp32)", 4 * n, f"4 B × {n:,} parameters"),
        MemoryTerm("gradients (fp32)", 4 * n, f"4 B × {n:,}"),
        MemoryTerm("optimizer state", state * n,
                   f"{state} B × {n:,} ({_OPTIMIZER_STATE_WHAT.get(settings.optimizer, 'AdamW m, v in fp32')}"
                   f"{' + EMA in fp32' if config.ema_decay else ''})"),
        MemoryTerm("activations", acts, act_formula),
    )
    a, b, c = VAE_DECODE
    x = (config.resolution // 8) ** 2
    decode = int(max(0.0, a + b * x + c * x * x) * (spec.parameters["vae"] / _MEASURED_VAE_PARAMETERS))
    sampling = MemoryTerm("sampling", frozen + 4 * n + state * n + decode,
                          f"frozen + trainable + optimizer state + {_gib(decode)} to decode one {config.resolution} px "
                          f"image with the fp32 VAE (class images, previews): a separate peak")
    advice = ", ".join(([] if settings.gradient_checkpointing else ["turn on --gradient-checkpointing"])
                       + ([] if settings.mixed_precision != "no" else ["use --mixed-precision bf16 or fp16"])
                       + ["lower --resolution or --batch-size"]
                       + (["train without --train-text-encoders"] if config.train_text_encoders else []))
    return MemoryEstimate(terms, device_memory, notes, sampling, advice)


def unet_batch_items(config: TrainConfig) -> int:
    """Images in one UNet forward: the subject batch, doubled by prior preservation."""
    return config.batch_size * (2 if config.prior_preservation else 1)


def _activations(spec: ModelSpec, config: TrainConfig, settings: DeviceSettings) -> tuple[int, str, tuple[str, ...]]:
    family, ckpt = spec.family.name, settings.gradient_checkpointing
    a, b, c = ACTIVATIONS[family][ckpt]
    measured, notes = MEASURED_UNET[family][ckpt], []
    if spec.published_architecture() is None:
        from .testing.fullsize import CONFIGS

        ref = PUBLISHED[family]
        ratio = spec.configs["unet"]["block_out_channels"][0] / CONFIGS[ref]["unet"]["block_out_channels"][0]
        a, b, c = a * ratio, b * ratio, c * ratio
        notes.append(f"activations: this UNet is not the published {family.upper()} architecture; its "
                     f"coefficients are {ref}'s scaled by the first block's width ({ratio:g}×): approximate")
    elif not min(measured) <= config.resolution <= max(measured):
        notes.append(f"activations: {config.resolution} px is outside the measured {min(measured)}–{max(measured)} px "
                     f"for {family.upper()}{' with checkpointing' if ckpt else ''}: extrapolated")
    side = config.resolution // spec.vae_scale
    x = side * side                                              # latent pixels
    items = unet_batch_items(config)
    f = 1.0 if settings.mixed_precision == "no" else HALF_PRECISION_ACTIVATIONS
    total = items * max(0.0, a + b * x + c * x * x) * f
    formula = (f"{items} × ({_gib(a)} + {b / 2**10:.0f} KiB·x + {c:.1f} B·x²; x = {side}×{side} latent px)"
               + (f" × {f:.2f} ({settings.mixed_precision})" if f != 1.0 else "")
               + (", checkpointed" if ckpt else ""))
    if config.train_text_encoders:
        per_item = sum(_text_encoder_activations(spec.configs[te], ckpt) for te in spec.family.text_encoders)
        total += items * per_item * f
        formula += f" + {items} × {_gib(per_item)} (text encoders)"
    return int(total), formula, tuple(notes)


def _text_encoder_activations(config: dict, ckpt: bool) -> float:
    """Per batch item: the measured encoder of the same width and depth, else CLIP-L's scaled
    by hidden size × layers."""
    shape = (config.get("hidden_size"), config.get("num_hidden_layers"))
    for name, known in _TEXT_ENCODERS.items():
        if known == shape:
            return TEXT_ENCODER_ACTIVATIONS[name][ckpt]
    width, layers = _TEXT_ENCODERS["clip-l"]
    return TEXT_ENCODER_ACTIVATIONS["clip-l"][ckpt] * (shape[0] * shape[1]) / (width * layers)


# =============================================================================================
# The plan: what a run will use, before it loads a weight
# =============================================================================================
@dataclass(frozen=True)
class RunPlan:
    config: TrainConfig                 # family defaults and device settings filled in
    spec: ModelSpec
    device: DeviceInfo
    settings: DeviceSettings
    estimate: MemoryEstimate

    def to_dict(self) -> dict:
        return {"config": self.config.to_dict(), "family": self.spec.family.name, "preset": self.spec.preset,
                "model_configs": self.spec.source, "device": self.settings.to_dict(),
                "memory_estimate": self.estimate.to_dict()}

    def describe(self) -> str:
        """What ``dorabooth train --dry-run`` prints."""
        c, s = self.config, self.settings
        rows = [("mixed precision", s.mixed_precision, "mixed_precision"), ("VAE", s.vae_dtype, None),
                ("gradient checkpointing", "on" if s.gradient_checkpointing else "off", "gradient_checkpointing"),
                ("optimizer", s.optimizer, "optimizer"), ("cache latents", "on" if s.cache_latents else "off", None)]
        side = c.resolution
        lines = ["dry run: no weight loaded, nothing written",
                 f"base model: {c.model or 'the embedded toy model'} — {self.spec.family.name} "
                 f"(preset {self.spec.preset}), from {self.spec.source}",
                 f"device: {s.device}", "device settings:"]
        lines += [f"  {name:<23} {value:<10} {'auto' if key in s.auto else 'given' if key else ''}"
                  for name, value, key in rows]
        lines += [f"  - {r}" for r in s.reasons] + [f"  warning: {w}" for w in s.warnings]
        lines += ["resolved config (RUN_DIR/config.json):",
                  *("  " + line for line in json.dumps(c.to_dict(), indent=2).splitlines()),
                  f"peak memory estimate, one training step at {side}×{side} px, {unet_batch_items(c)} image(s) per "
                  f"UNet batch ({c.method}, rank {c.effective_rank}):", self.estimate.table()]
        return "\n".join(lines)


def plan_run(config: TrainConfig, spec: ModelSpec, device: DeviceInfo) -> RunPlan:
    """Family defaults, then the device settings (gradient checkpointing from the estimate
    when the preset does not decide it), then the estimate for what was chosen."""
    resolved = config.with_defaults(spec.defaults)
    multiple = spec.size_multiple
    if resolved.resolution % multiple:
        raise ValueError(f"resolution {resolved.resolution} is not a multiple of {multiple} for this model; "
                         f"use e.g. {max(multiple, resolved.resolution // multiple * multiple)}")
    settings = resolve_device_settings(resolved, spec.preset, device)
    if config.gradient_checkpointing is None and not settings.gradient_checkpointing and device.memory:
        without = estimate_memory(spec, settings.apply(resolved), settings).total
        settings = resolve_device_settings(resolved, spec.preset, device, without)
    final = settings.apply(resolved)
    return RunPlan(final, spec, device, settings, estimate_memory(spec, final, settings, device.memory))


def fill_from_run(config: TrainConfig, previous: TrainConfig) -> TrainConfig:
    """For --resume: the device-dependent fields left on "auto" take the run's own values, and
    prompts, pivotal tokens and Min-SNR γ left unset the ones it was trained with, while token and
    class noun stay (a run made before the family's prompt style was recorded has none in its
    config: it used the "photo" phrasing)."""
    keep = {k: getattr(previous, k) for k in DEVICE_FIELDS if getattr(config, k) is None}
    for name in ("pivotal_tokens", "min_snr_gamma"):   # family defaults that changed on 2026-12-01: its runs keep
        if getattr(config, name) is None:              # theirs (what names the subject in its prompts; its loss)
            keep[name] = getattr(previous, name)
    if (config.token, config.class_noun) == (previous.token, previous.class_noun):   # else derived anew
        if config.instance_prompt is None:
            keep["instance_prompt"] = previous.resolved_instance_prompt
        if config.class_prompt is None:
            keep["class_prompt"] = previous.resolved_class_prompt
    return replace(config, **keep)
