"""The training configuration: one frozen dataclass, validated on creation, saved with every run.

``TrainConfig`` holds everything that decides what a run learns (base model, subject, method,
optimisation, prior preservation) plus the few run mechanics a library call needs (``out``,
``resume``, checkpoint and sample cadence, mixed precision). Fields left ``None`` are chosen
when the run starts: per model family and size by :func:`dorabooth.families.train_defaults`,
and per device (mixed precision, gradient checkpointing, optimizer) by
:func:`dorabooth.devices.resolve_device_settings`; ``config.json`` in the run folder holds the
resolved values, so a run can be read, resumed and repeated from it alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from .conventions import MAGNITUDE_AXES, METHODS, MIN_SNR_GAMMA

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PRODIGY_LR = 1.0                       # Prodigy estimates the step size; lr only scales it (its default)
MIXED_PRECISION = ("no", "fp16", "bf16")
TARGET_PRESETS = ("attn", "cross-attn", "attn+ff", "all-linear", "attn+conv", "all")
QUANTIZE_BASE = ("none", "nf4")        # dorabooth.quantize (kept here too: config imports no torch)

# What a request may ask for (the app passes user input straight in): each number checked against
# its range in TrainConfig.__post_init__, the message stating the range.
MAX_STEPS = 100_000
MAX_RANK = 1024                        # presets use 8–32; "best quality" doubles the family's rank
MAX_CLASS_IMAGES = 10_000
MAX_LR = 1.0                           # AdamW: anything near 1 already diverges; lr in (0, 1]
MAX_RESOLUTION = 4096
MAX_SAMPLER_STEPS = 1000
MAX_SEED = 2**32 - 1
MAX_LORAPLUS_RATIO = 1000.0            # LoRA+ paper: 16 suggested; B's lr = ratio · lr
MAX_PIVOTAL_TOKENS = 16                # new tokens per text encoder (diffusers' advanced script: 2 by default)
PIVOTAL_INITS = ("class", "random")    # dorabooth.pivotal: the class noun's embedding, or std-scaled noise

# Fields that may change between a run and its --resume without changing what is learned.
RUN_MECHANICS = frozenset({"out", "resume", "checkpoint_every", "keep_checkpoints", "sample_every",
                           "mixed_precision", "steps", "validation_prompts", "gradient_checkpointing"})
# Fields a --resume may change although they change what is learned from there on: the ways out
# of a diverged run (lower the learning rate, clip harder); config.json records each change.
RESUME_OVERRIDES = frozenset({"lr", "text_encoder_lr", "pivotal_lr", "max_grad_norm"})


@dataclass(frozen=True)
class TrainConfig:
    """A DreamBooth run. ``None`` means "the default for this model and device" (see
    ``families.train_defaults`` and ``devices.resolve_device_settings``)."""

    # ---- subject ---------------------------------------------------------------------------
    images: str                                # folder of 3–20 subject photos (name.txt captions optional)
    class_noun: str                            # "dog": what the subject is
    out: str                                   # run folder (created; DESIGN §6)
    token: str = "sks"                         # rare token that will mean the subject
    instance_prompt: str | None = None         # default per model family: default_prompts()
    class_prompt: str | None = None            # default per model family: default_prompts()
    model: str | None = None                   # hub id, diffusers folder or .safetensors; None = embedded toy
    model_config: str | None = None            # for a .safetensors model: diffusers folder / hub id with its configs

    # ---- method ----------------------------------------------------------------------------
    method: str = "dora"                       # dora | lora | dvora (DoRA on VeRA) | full (full fine-tune of the UNet)
    rank: int | None = None
    alpha: float | None = None                 # default = rank (scale 1)
    half_rank: bool = False                    # DoRA†: the paper's half-rank setting, rank → rank // 2
    magnitude_axis: str = "out"                # out (PEFT/diffusers) | in (kohya (1, in), A1111/ComfyUI)
    rslora: bool = False                       # scale alpha / sqrt(rank) instead of alpha / rank
    targets: str | None = None                 # UNet preset: attn | cross-attn | attn+ff | all-linear | attn+conv | all; None = family default
    quantize_base: str = "none"                # none | nf4: adapted layers' frozen W0 held in NF4 (QDoRA; torchao)
    train_text_encoders: bool | None = None    # every text encoder trains too (adapters, or the whole encoder for full)
    text_encoder_lr: float | None = None       # default = lr
    pivotal_tokens: int | None = None          # pivotal tuning: N new tokens <s0>…<sN-1> per text encoder replace the token; 0 = off; None = family default
    pivotal_init: str = "random"               # random (std-scaled noise, diffusers' advanced script) | class (the class noun's embedding)
    pivotal_lr: float | None = None            # lr of the new token embeddings; default = text_encoder_lr
    pivotal_stop: float | None = None          # train the new embeddings only for this first fraction of steps; None = all

    # ---- data ------------------------------------------------------------------------------
    resolution: int | None = None              # square side in px (buckets keep about this area)
    buckets: bool = False                      # aspect-ratio buckets instead of a centre crop
    flip: bool = False                         # random horizontal flip (doubles cached latents)

    # ---- prior preservation ------------------------------------------------------------------
    prior_preservation: bool = True
    class_images: str | None = None            # folder of class images; default <out>/class
    num_class_images: int | None = None        # generated with the base model when the folder has fewer
    prior_loss_weight: float = 1.0
    class_image_steps: int | None = None       # sampler steps for generated class images

    # ---- optimisation ------------------------------------------------------------------------
    steps: int | None = None                   # optimizer steps
    lr: float | None = None
    lr_schedule: str = "constant"              # constant | cosine | linear (decay to 0)
    warmup_steps: int = 0
    batch_size: int = 1                        # subject images per step and process (class images double it)
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0          # None = no clipping
    optimizer: str | None = None               # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt); None = per device
    loraplus_ratio: float | None = None        # LoRA+: lora_B's lr = ratio · lr (paper: 16); None = off
    ema_decay: float | None = None             # EMA of the adapter weights (e.g. 0.999), used for samples/final; None = off
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    min_snr_gamma: float | None = None         # Min-SNR weighting (Hang et al. 2023); 0 = plain MSE; None = family default
    noise_offset: float = 0.0
    seed: int = 0

    # ---- speed and memory --------------------------------------------------------------------
    mixed_precision: str | None = None         # no | fp16 | bf16 (accelerate); None = per device
    gradient_checkpointing: bool | None = None # None = per family and device memory
    cache_latents: bool = True                 # encode the images once (both flips when flip=True)

    # ---- run mechanics -------------------------------------------------------------------------
    validation_prompts: tuple[str, ...] = ()   # default: the instance prompt
    sample_every: int | None = None            # preview images every N steps; 0 = only at the end
    checkpoint_every: int | None = None        # 0 = only the final adapter
    keep_checkpoints: int = 2
    resume: bool = False

    def __post_init__(self):
        # Normalise list-valued fields coming from JSON or argparse.
        object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        _check(bool(self.images), "images: give the folder with the subject photos (--images DIR)")
        _check(bool(self.out), "out: give a run folder (--out RUN_DIR)")
        _check(bool(self.class_noun and self.class_noun.strip()),
               "class_noun: say what the subject is, e.g. --class-noun dog")
        _check(bool(self.token and self.token.strip()) and " " not in self.token.strip(),
               f"token {self.token!r}: use one rare word such as 'sks' (--token)")
        _one_of("method", self.method, METHODS)
        _one_of("magnitude_axis", self.magnitude_axis, MAGNITUDE_AXES)
        _one_of("quantize_base", self.quantize_base, QUANTIZE_BASE)
        _check(self.quantize_base == "none" or self.method != "full",
               f"quantize_base {self.quantize_base}: a full fine-tune trains the base weights themselves; use "
               f"--method dora or lora with --quantize-base, or drop it")
        _check(self.method != "dvora" or self.targets not in ("attn+conv", "all"),
               f"targets {self.targets}: DVoRA adapts Linear layers only; use --targets attn, cross-attn, "
               f"attn+ff or all-linear with --method dvora, or --method dora for the convolutions")
        _one_of("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.optimizer is not None:
            _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.mixed_precision is not None:
            _one_of("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _check(self.targets is None or bool(self.targets.strip()), f"targets: use one of {', '.join(TARGET_PRESETS)} or module names")
        _check_bounds(self)
        _check(math.isfinite(self.prior_loss_weight) and self.prior_loss_weight >= 0,
               "prior_loss_weight: use a weight >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps: use 0 or more")
        _check(self.batch_size >= 1, f"batch_size {self.batch_size}: use at least 1")
        _check(self.grad_accum >= 1, f"grad_accum {self.grad_accum}: use at least 1")
        _positive("max_grad_norm", self.max_grad_norm)
        _check(math.isfinite(self.weight_decay) and self.weight_decay >= 0,
               "weight_decay: use 0 or a small positive number")
        _check(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
               f"adam_betas {self.adam_betas}: give two numbers in [0, 1)")
        _positive("adam_eps", self.adam_eps)
        _check(self.min_snr_gamma is None or (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0),
               f"min_snr_gamma {self.min_snr_gamma}: use 0 (plain MSE) or a positive γ such as 5")
        _check(math.isfinite(self.noise_offset) and self.noise_offset >= 0,
               "noise_offset: use 0 (off) or a small positive value such as 0.05")
        for name in ("sample_every", "checkpoint_every"):
            value = getattr(self, name)
            _check(value is None or value >= 0, f"{name} {value}: use 0 (off) or a number of steps")
        _check_optimizer_extras(self)
        _check_pivotal(self)
        _check(self.keep_checkpoints >= 1, "keep_checkpoints: keep at least 1")
        _check(all(p.strip() for p in self.validation_prompts), "validation_prompts: empty prompt given")

    # ---- derived values ------------------------------------------------------------------------
    @property
    def effective_rank(self) -> int | None:
        """The rank the layers get: ``rank // 2`` with ``half_rank`` (DoRA†), else ``rank``."""
        if self.rank is None:
            return None
        return self.rank // 2 if self.half_rank else self.rank

    @property
    def effective_alpha(self) -> float | None:
        """alpha, or the effective rank when not given (scale alpha/rank = 1)."""
        return self.alpha if self.alpha is not None else (None if self.rank is None else float(self.effective_rank))

    @property
    def identifier(self) -> str:
        """What names the subject in prompts: ``token``, or with pivotal tuning the new tokens
        ``<s0><s1>…`` in its place (as diffusers' advanced script replaces its TOK)."""
        return pivotal_identifier(self.pivotal_tokens) if self.pivotal_tokens else self.token.strip()

    def with_identifier(self, text: str) -> str:
        """``text`` with the token word replaced by :attr:`identifier` (unchanged without pivotal tuning)."""
        if not self.pivotal_tokens:
            return text
        return name_subject(text, self.token.strip(), self.identifier)

    @property
    def resolved_instance_prompt(self) -> str:
        """The instance prompt. ``with_defaults`` writes the family's default into the config;
        a config without one (runs made before it did) was trained with the "photo" phrasing."""
        return self.instance_prompt or default_prompts(self.identifier, self.class_noun)[0]

    @property
    def resolved_class_prompt(self) -> str:
        """The class prompt (as ``resolved_instance_prompt``)."""
        return self.class_prompt or default_prompts(self.identifier, self.class_noun)[1]

    @property
    def class_dir(self) -> Path:
        return Path(self.class_images) if self.class_images else Path(self.out) / "class"

    @property
    def unresolved(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is None and f.name in _FAMILY_FIELDS]

    def with_defaults(self, defaults: dict[str, Any]) -> TrainConfig:
        """Fill the ``None`` fields from a family's ``train_defaults`` (the prompts phrased in its
        ``prompt_style``) and derive cadences."""
        values = {k: v for k, v in defaults.items() if k in _FAMILY_FIELDS and getattr(self, k) is None}
        if self.pivotal_tokens is None and (self.method == "full" or "pivotal_tokens" not in defaults):
            values["pivotal_tokens"] = 0               # a full fine-tune has no adapter to tune beside; no family choice: off
        if values.get("pivotal_tokens"):              # the family's new tokens name the subject in the prompts below
            return replace(self, pivotal_tokens=values["pivotal_tokens"]).with_defaults(defaults)
        if self.optimizer == "prodigy" and self.lr is None:
            values["lr"] = PRODIGY_LR                  # Prodigy's own default, not the family's AdamW rate
        if self.targets is None and "targets" not in defaults:
            values["targets"] = "attn"                 # a family without its own choice: attention, as diffusers
        if self.min_snr_gamma is None and "min_snr_gamma" not in defaults:
            values["min_snr_gamma"] = MIN_SNR_GAMMA
        if self.method == "dvora" and self.rank is None and "dvora_rank" in defaults:
            values["rank"] = defaults["dvora_rank"]
        instance, class_prompt = default_prompts(self.identifier, self.class_noun, defaults.get("prompt_style", "photo"))
        values.update({k: v for k, v in (("instance_prompt", instance), ("class_prompt", class_prompt))
                       if getattr(self, k) is None})
        if self.pivotal_tokens and self.instance_prompt is not None:          # "a photo of sks dog" → "<s0><s1>"
            values["instance_prompt"] = self.with_identifier(self.instance_prompt)
        if self.pivotal_tokens and self.validation_prompts:
            values["validation_prompts"] = tuple(self.with_identifier(p) for p in self.validation_prompts)
        cfg = replace(self, **values)
        _check(not cfg.pivotal_tokens or cfg.identifier in cfg.resolved_instance_prompt,
               f"instance_prompt {cfg.instance_prompt!r}: with --pivotal the new tokens {cfg.identifier} take the place "
               f"of the token {cfg.token!r}; write {cfg.token!r} (or {cfg.identifier}) in the instance prompt")
        missing = cfg.unresolved
        if missing:
            raise ValueError(f"no default for {', '.join(missing)}; set them explicitly")
        derived: dict[str, Any] = {}
        if cfg.text_encoder_lr is None:
            derived["text_encoder_lr"] = cfg.lr
        if cfg.pivotal_tokens and cfg.pivotal_lr is None:
            derived["pivotal_lr"] = derived.get("text_encoder_lr", cfg.text_encoder_lr)
        if cfg.sample_every is None:
            derived["sample_every"] = 0
        if cfg.checkpoint_every is None:
            derived["checkpoint_every"] = max(1, math.ceil(cfg.steps / 4))
        if not cfg.validation_prompts:
            derived["validation_prompts"] = (cfg.resolved_instance_prompt,)
        if cfg.alpha is None:
            derived["alpha"] = float(cfg.effective_rank)
        return replace(cfg, **derived)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validation_prompts"] = list(self.validation_prompts)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    def recipe_differences(self, other: TrainConfig) -> list[str]:
        """Fields (outside run mechanics and resume overrides) where ``other`` differs: what --resume refuses."""
        a, b = (dict(c.to_dict(), instance_prompt=c.resolved_instance_prompt,
                     class_prompt=c.resolved_class_prompt) for c in (self, other))
        return [k for k in a if k not in RUN_MECHANICS | RESUME_OVERRIDES and a[k] != b[k]]


# Fields whose "auto" (None) depends on the device and the family (devices.resolve_device_settings).
DEVICE_FIELDS = ("mixed_precision", "gradient_checkpointing", "optimizer")

# Fields whose defaults depend on the model family and size (families.train_defaults).
_FAMILY_FIELDS = frozenset({"rank", "resolution", "steps", "lr", "num_class_images", "class_image_steps",
                            "train_text_encoders", "targets", "pivotal_tokens", "min_snr_gamma"})


# How the default prompts are phrased; ``families.TRAIN_PRESETS`` picks the style per family.
PROMPT_STYLES: dict[str, tuple[str, str]] = {
    # DreamBooth's phrasing (Ruiz et al. 2023), what real SD / SDXL checkpoints were prompted with
    "photo": ("a photo of {token} {class_noun}", "a photo of {article} {class_noun}"),
    # the toy world's captions ("a star on a blue background"): it never saw "a photo of",
    # and "a photo of a star" drew a star in 3 of 4 images (docs/training.md)
    "caption": ("a {token} {class_noun}", "{article} {class_noun}"),
}


def pivotal_identifier(n: int) -> str:
    """``"<s0><s1>…"``: the N pivotal tokens that name the subject in prompts (diffusers' names)."""
    return "".join(f"<s{i}>" for i in range(n))


def name_subject(text: str, token: str, identifier: str) -> str:
    """``text`` with the word ``token`` (not inside another word or a ``<…>`` token) replaced by
    ``identifier``: "a sks dog" → "a <s0><s1> dog"."""
    return re.sub(rf"(?<![\w<]){re.escape(token)}(?![\w>])", lambda _: identifier, text)


def default_prompts(token: str, class_noun: str, style: str = "photo") -> tuple[str, str]:
    """(instance prompt, class prompt) in a phrasing style: "a photo of sks dog" and "a photo of a
    dog" ("photo"), "a sks star" and "a star" ("caption"). The class prompt keeps an article so
    that the word in the token's place differs: measured on the toy model, the article-less "a
    photo of dog" let the subject leak into "a photo of a dog" (10/16 vs 0/16)."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style {style!r}: choose one of {', '.join(PROMPT_STYLES)}")
    noun = class_noun.strip()
    article = "an" if noun[:1].lower() in "aeiou" else "a"
    instance, class_prompt = PROMPT_STYLES[style]
    return (" ".join(instance.format(token=token, class_noun=noun).split()),
            class_prompt.format(article=article, class_noun=noun))


def default_instance_prompt(token: str, class_noun: str, style: str = "photo") -> str:
    """The instance prompt when none is given ("a photo of sks dog"; "a sks dog" in "caption" style)."""
    return default_prompts(token, class_noun, style)[0]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{name} {value!r}: choose one of {', '.join(choices)}")


def _check_bounds(c: TrainConfig) -> None:
    """The numbers a request may set, each within its range (the MAX_* above); messages state the range."""
    if c.rank is not None:
        least = 2 if c.half_rank else 1
        _check(c.rank >= least,
               f"rank {c.rank}: use a rank of at least {least} (the range is {least}–{MAX_RANK})")
        _check(c.rank <= MAX_RANK,
               f"rank {c.rank}: use a rank of at most {MAX_RANK} (the range is {least}–{MAX_RANK}; 4–64 is usual)")
    _positive("alpha", c.alpha)
    _learning_rate("lr", c.lr)
    _learning_rate("text_encoder_lr", c.text_encoder_lr)
    if c.resolution is not None:
        _check(c.resolution >= 8 and c.resolution % 8 == 0,
               f"resolution {c.resolution}: use a multiple of 8 (e.g. 512, 768, 1024)")
        _check(c.resolution <= MAX_RESOLUTION,
               f"resolution {c.resolution}: use at most {MAX_RESOLUTION} px (e.g. 512, 768, 1024)")
    if c.steps is not None:
        _check(c.steps >= 1, f"steps {c.steps}: train at least 1 step (the range is 1–{MAX_STEPS})")
        _check(c.steps <= MAX_STEPS, f"steps {c.steps}: train at most {MAX_STEPS} steps (the range is "
                                     f"1–{MAX_STEPS}; a few hundred to a few thousand is usual)")
    if c.num_class_images is not None:
        _check(1 <= c.num_class_images <= MAX_CLASS_IMAGES,
               f"num_class_images {c.num_class_images}: use at least 1 and at most {MAX_CLASS_IMAGES} "
               f"(the range is 1–{MAX_CLASS_IMAGES}; about 100–200 is usual)")
    if c.class_image_steps is not None:
        _check(1 <= c.class_image_steps <= MAX_SAMPLER_STEPS,
               f"class_image_steps {c.class_image_steps}: use at least 1 sampler step and at most "
               f"{MAX_SAMPLER_STEPS}")
    _check(0 <= c.seed <= MAX_SEED, f"seed {c.seed}: use a whole number from 0 to {MAX_SEED}")


def _check_optimizer_extras(c: TrainConfig) -> None:
    """LoRA+ and EMA (adapters only), and Prodigy's single learning rate."""
    if c.loraplus_ratio is not None:
        _check(math.isfinite(c.loraplus_ratio) and 0 < c.loraplus_ratio <= MAX_LORAPLUS_RATIO,
               f"loraplus_ratio {c.loraplus_ratio}: use a number in (0, {MAX_LORAPLUS_RATIO:g}] (16 is the "
               f"LoRA+ paper's suggestion), or leave it off")
        _check(c.method != "full", "loraplus_ratio: LoRA+ sets the lr of adapter up matrices; with --method full "
                                   "leave --loraplus-ratio off")
    if c.ema_decay is not None:
        _check(math.isfinite(c.ema_decay) and 0 < c.ema_decay < 1,
               f"ema_decay {c.ema_decay}: use a number in (0, 1) such as 0.999, or leave it off")
        _check(c.method != "full", "ema_decay: the EMA is of adapter weights; with --method full leave --ema-decay off")
    if c.optimizer == "prodigy":
        _check(c.loraplus_ratio is None, "loraplus_ratio: Prodigy takes one learning rate for all parameters "
                                         "(prodigyopt refuses others); drop --loraplus-ratio or use --optimizer adamw")
        _check(c.text_encoder_lr is None or c.text_encoder_lr == c.lr,
               f"text_encoder_lr {c.text_encoder_lr}: Prodigy takes one learning rate for all parameters; drop "
               f"--text-encoder-lr or use --optimizer adamw")


def _check_pivotal(c: TrainConfig) -> None:
    """Pivotal tuning: a number of tokens in range, a known init, and the adapter methods only."""
    _check(c.pivotal_tokens is None or (isinstance(c.pivotal_tokens, int) and 0 <= c.pivotal_tokens <= MAX_PIVOTAL_TOKENS),
           f"pivotal_tokens {c.pivotal_tokens}: use 0 (off) or 1–{MAX_PIVOTAL_TOKENS} new tokens per text encoder "
           f"(2 is diffusers' advanced script's default)")
    _one_of("pivotal_init", c.pivotal_init, PIVOTAL_INITS)
    _learning_rate("pivotal_lr", c.pivotal_lr)
    if c.pivotal_stop is not None:
        _check(math.isfinite(c.pivotal_stop) and 0 < c.pivotal_stop <= 1,
               f"pivotal_stop {c.pivotal_stop}: use a fraction of the steps in (0, 1] (0.5 is diffusers' advanced "
               f"script's --train_text_encoder_ti_frac), or leave it off")
    if not c.pivotal_tokens:
        return
    _check(c.method != "full", "pivotal_tokens: pivotal tuning trains new token embeddings beside an adapter; use "
                               "--method dora, lora or dvora with --pivotal, or drop --pivotal")
    if c.optimizer == "prodigy":
        _check(c.pivotal_lr is None or c.pivotal_lr == c.lr,
               f"pivotal_lr {c.pivotal_lr}: Prodigy takes one learning rate for all parameters; drop --pivotal-lr "
               f"or use --optimizer adamw")


def _learning_rate(name: str, value: float | None) -> None:
    """A learning rate in (0, MAX_LR]: 0 would train nothing, 1e38 overflows the update."""
    _check(value is None or (math.isfinite(value) and 0 < value <= MAX_LR),
           f"{name} {value}: use a positive number of at most {MAX_LR:g} (the range is (0, {MAX_LR:g}]; "
           f"1e-4 to 1e-3 is usual)")


def _positive(name: str, value: float | None) -> None:
    _check(value is None or (math.isfinite(value) and value > 0), f"{name} {value}: use a positive number")


__all__ = ["TrainConfig", "default_prompts", "PROMPT_STYLES", "METHODS", "MAGNITUDE_AXES", "LR_SCHEDULES", "OPTIMIZERS",
           "MIXED_PRECISION"]
