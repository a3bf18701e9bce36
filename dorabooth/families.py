"""What differs between SD 1.x, SD 2.x and SDXL: the one place that branches on the family.

A family is detected from a loaded diffusers pipeline (its class, whether it has a second
text encoder, the UNet's added conditions and cross-attention width, the text encoder's
activation) and stored in every adapter file, so that loading an adapter onto the wrong
family is a clear error. The trainer extends this module with the rest of the family
differences (prompt encoding, added conditions, key maps).
"""

from __future__ import annotations

from dataclasses import dataclass

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
