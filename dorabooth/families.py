"""What differs between SD 1.x, SD 2.x and SDXL: the one place that branches on the family.

A family is detected from a loaded diffusers pipeline (its class, whether it has a second
text encoder, the UNet's added conditions and cross-attention width, the text encoder's
activation) and stored in every adapter file, so that loading an adapter onto the wrong
family is a clear error. The trainer extends this module with the rest of the family
differences (prompt encoding, added conditions, key maps).
"""

from __future__ import annotations

from dataclasses import dataclass

from .conventions import DVORA_RANK, MIN_SNR_GAMMA

FAMILY_NAMES = ("sd1", "sd2", "sdxl")


@dataclass(frozen=True)
class Family:
    """A model family and the pipeline components an adapter can live in."""

    name: str                         # "sd1" | "sd2" | "sdxl"
    text_encoders: tuple[str, ...]    # pipeline attribute names, in order
    prediction_type: str = "epsilon"  # from the scheduler: "epsilon" | "v_prediction" | "sample"

    def __post_init__(self):
        if self.name not in FAMILY_NAMES:
            raise ValueError(f"unknown model family {self.name!r}; expected one of {', '.join(FAMILY_NAMES)}")

    @property
    def components(self) -> tuple[str, ...]:
        """Adapter-carrying components, as prefixes of adapter keys: unet, then text encoders."""
        return ("unet", *self.text_encoders)


def detect_family(pipe) -> Family:
    """The family of a diffusers StableDiffusion(XL)Pipeline (or any object with the same components).

    SDXL: a second text encoder, or a UNet with ``text_time`` added conditions.
    SD 2.x vs 1.x: cross-attention width 1024 (OpenCLIP-H) vs 768 (CLIP-L); for other widths
    (tiny test models) the text encoder's activation decides: OpenCLIP uses ``gelu``, CLIP-L
    ``quick_gelu``.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise TypeError(f"{type(pipe).__name__} has no UNet; dorabooth needs a Stable Diffusion or SDXL pipeline")
    config = unet.config
    scheduler = getattr(pipe, "scheduler", None)
    prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"

    if getattr(pipe, "text_encoder_2", None) is not None or config.get("addition_embed_type") == "text_time":
        encoders = tuple(n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None)
        return Family("sdxl", encoders, prediction)

    encoders = ("text_encoder",) if getattr(pipe, "text_encoder", None) is not None else ()
    width = config.get("cross_attention_dim")
    if width == 1024:
        name = "sd2"
    elif width == 768:
        name = "sd1"
    else:
        te_config = getattr(getattr(pipe, "text_encoder", None), "config", None)
        name = "sd2" if getattr(te_config, "hidden_act", None) == "gelu" else "sd1"
    return Family(name, encoders, prediction)


def check_family(expected: str, actual: Family, *, source: str) -> None:
    """Raise if an adapter made for ``expected`` is loaded onto a pipeline of family ``actual``."""
    if expected != actual.name:
        raise ValueError(
            f"{source}: adapter was trained on a {expected} model but the pipeline is {actual.name}; "
            f"load it onto a {expected} base model"
        )


# ---- training and generation differences (used by train.py and generate.py) -----------------
# Presets users know (kohya_ss, OneTrainer, diffusers' DreamBooth LoRA READMEs), chosen per
# family and native size. "toy" is any model whose native resolution is at most 128 px
# (the embedded toy SDXL and the tiny test models). ``prompt_style`` phrases the default
# instance and class prompts (``config.default_prompts``): real checkpoints know DreamBooth's
# "a photo of sks dog"; the toy model knows only its captions' "a sks star" / "a star".
TRAIN_PRESETS: dict[str, dict] = {
    #        resolution None = the model's native size
    # toy: every Linear at 2e-3 (was attention at 1e-3 until 2026-12-01), two pivotal tokens (from
    # 2026-12-01) and plain MSE (Min-SNR γ 5 until session 12, 2026-12-01): docs/robustness.md, issue 16
    "toy":  dict(resolution=None, steps=600, lr=2e-3, rank=8, num_class_images=40, class_image_steps=20,
                 train_text_encoders=True, targets="all-linear", pivotal_tokens=2, min_snr_gamma=0.0,
                 prompt_style="caption"),
    "sd1":  dict(resolution=512, steps=800, lr=1e-4, rank=16, num_class_images=100, class_image_steps=30,
                 train_text_encoders=False, targets="attn", pivotal_tokens=0, min_snr_gamma=MIN_SNR_GAMMA,
                 prompt_style="photo"),
    "sd2":  dict(resolution=None, steps=800, lr=1e-4, rank=16, num_class_images=100, class_image_steps=30,
                 train_text_encoders=False, targets="attn", pivotal_tokens=0, min_snr_gamma=MIN_SNR_GAMMA,
                 prompt_style="photo"),
    "sdxl": dict(resolution=1024, steps=1000, lr=1e-4, rank=16, num_class_images=100, class_image_steps=30,
                 train_text_encoders=False, targets="attn", pivotal_tokens=0, min_snr_gamma=MIN_SNR_GAMMA,
                 prompt_style="photo"),
}
GENERATE_PRESETS: dict[str, dict] = {
    "toy":  dict(steps=20, guidance=5.0),
    "sd1":  dict(steps=30, guidance=7.5),
    "sd2":  dict(steps=30, guidance=7.5),
    "sdxl": dict(steps=30, guidance=5.0),
}
TOY_MAX_RESOLUTION = 128


def text_encoder_modules(pipe, family: Family) -> list:
    """The pipeline's text encoder modules, in the family's order."""
    return [getattr(pipe, n) for n in family.text_encoders]


def native_resolution(pipe) -> int:
    """The image side the UNet was trained for: sample_size × the VAE's downscale factor."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(pipe.unet.config.sample_size) * vae_scale


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: VAE downscale × the UNet's downsamplings."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def preset_name(family: Family, pipe) -> str:
    return "toy" if native_resolution(pipe) <= TOY_MAX_RESOLUTION else family.name


def train_defaults(family: Family, pipe) -> dict:
    """Defaults for the ``None`` fields of a TrainConfig on this model (see TRAIN_PRESETS)."""
    preset = dict(TRAIN_PRESETS[preset_name(family, pipe)])
    if preset["resolution"] is None:
        preset["resolution"] = native_resolution(pipe)
    preset["dvora_rank"] = dvora_rank(pipe)
    return preset


def dvora_rank(pipe) -> int:
    """``--method dvora``'s default rank: VeRA's 256 (``DVORA_RANK``), at most the UNet's narrowest
    block width (a lower bound of min(in, out) of its Linear layers): 256 on SD 1.x/2.x/XL (320
    wide), 32 on the toy model, 16 on the tiny test models."""
    return min(DVORA_RANK, *(int(c) for c in pipe.unet.config.block_out_channels))


def generate_defaults(family: Family, pipe) -> dict:
    return dict(GENERATE_PRESETS[preset_name(family, pipe)], resolution=native_resolution(pipe))


def _tokenize(tokenizer, prompts):
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(family: Family, pipe, prompts, text_encoders=None):
    """Text conditioning as the family's pipeline computes it, differentiable.

    SD 1.x/2.x: the encoder's last hidden state (B, 77, D) and no pooled embedding.
    SDXL: both encoders' second-to-last hidden states concatenated (B, 77, D1 + D2) and
    text encoder 2's projected pooled embedding (B, P), as ``StableDiffusionXLPipeline``.
    ``text_encoders`` overrides the pipeline's modules (e.g. DDP-wrapped ones while training).
    """
    encoders = text_encoders or [getattr(pipe, n) for n in family.text_encoders]
    tokenizers = [getattr(pipe, n) for n in ("tokenizer", "tokenizer_2")[: len(encoders)]]
    if family.name != "sdxl":
        te = encoders[0]
        ids = _tokenize(tokenizers[0], prompts).to(_device_of(te))
        return te(ids)[0], None
    hidden, pooled = [], None
    for tokenizer, te in zip(tokenizers, encoders):
        out = te(_tokenize(tokenizer, prompts).to(_device_of(te)), output_hidden_states=True)
        if out[0].ndim == 2:                      # CLIPTextModelWithProjection: text_embeds (B, P)
            pooled = out[0]
        hidden.append(out.hidden_states[-2])      # (B, 77, D_i)
    import torch

    return torch.cat(hidden, dim=-1), pooled


def _device_of(module):
    return next(module.parameters()).device


def sdxl_time_ids(original_size, crop_top_left, target_size) -> list[float]:
    """SDXL micro-conditioning (Podell et al. 2023, §2.2): (h0, w0, top, left, h, w)."""
    return [float(v) for v in (*original_size, *crop_top_left, *target_size)]


def added_conditions(family: Family, pooled, time_ids):
    """``added_cond_kwargs`` for the UNet: SDXL's pooled text embeds and time ids; else None.

    pooled: (B, P) or None; time_ids: list of B six-number lists.
    """
    if family.name != "sdxl":
        return None
    import torch

    ids = torch.tensor(time_ids, dtype=pooled.dtype, device=pooled.device)   # (B, 6)
    return {"text_embeds": pooled, "time_ids": ids}
