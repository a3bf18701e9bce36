"""Images from a base model plus an adapter, seeded, at a chosen strength.

A :class:`Session` loads the base pipeline once; adapters (a run folder, an adapter file, or
a full fine-tune's ``unet/`` folder) and strengths switch on the loaded model without
reloading it. By default the adapter is merged into the weights (DESIGN §3: strength t
scales both the magnitude and the direction update; t = 0 is exactly the base model), so
generation runs at the base model's speed. Every image gets one generator seeded with its
own seed: same seed, same image, whatever the batch. PNGs carry their parameters.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import adapters, inject
from . import families as fam
from .events import EventLog
from .families import detect_family
from .formats.files import atomic_file
from .finetune import FineTunedWeights
from .models import load_pipeline
from .config import name_subject
from .rundir import AdapterSource, pivotal_alias, resolve_adapter
from .version import __version__

def default_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


@dataclass(frozen=True)
class Sampling:
    """How one prompt is drawn, with the model family's defaults filled in (:meth:`Session.sampling`)."""

    prompt: str
    negative: str | None
    steps: int
    guidance: float
    width: int
    height: int


class Session:
    """A loaded base model that adapters and strengths are switched on.

    >>> s = Session("assets/toy-sdxl")
    >>> s.use_adapter("runs/dog"); s.set_strength(0.7)
    >>> images = s.generate("a photo of sks dog on a beach", n=4, seed=1)
    """

    def __init__(self, model: str | None = None, *, merge: bool = True, device=None, dtype=None, pipe=None,
                 model_config: str | None = None):
        if pipe is None:
            pipe, self.base = load_pipeline(model, single_file_config=model_config)
        else:
            self.base = None
        auto_device, auto_dtype = default_device()
        self.device = torch.device(device) if device is not None else auto_device
        self.dtype = dtype or auto_dtype
        self.pipe = pipe.to(self.device)
        if self.pipe.unet.dtype != self.dtype:
            self.pipe.to(dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.family = detect_family(self.pipe)
        self.defaults = fam.generate_defaults(self.family, self.pipe)
        self.merge = merge
        self.adapter: AdapterSource | None = None
        self.alias: tuple[str, str] | None = None           # (typed token, pivotal identifier) of the adapter's run
        self.strength = 1.0
        self._full: FineTunedWeights | None = None          # a loaded full fine-tune

    # ---- adapters ----------------------------------------------------------------------------
    def use_adapter(self, adapter: str | os.PathLike | AdapterSource | None) -> None:
        """Swap the adapter (None removes it); the base weights are restored first, never reloaded."""
        self._remove_adapter()
        if adapter is None:
            return
        source = adapter if isinstance(adapter, AdapterSource) else resolve_adapter(adapter)
        if source.kind == "full":
            self._full = FineTunedWeights(self.pipe, source.path)
        else:
            adapters.load_adapter(self.pipe, source.path)
        self.adapter = source
        self.alias = pivotal_alias(source)
        try:
            self._apply_strength()
        except ValueError:
            self._remove_adapter()                     # a merge that failed leaves no adapter behind
            raise

    @property
    def fine_tuned_components(self) -> list[str]:
        """The pipeline components a loaded full fine-tune replaces (``unet``, ``text_encoder``…)."""
        return self._full.components if self._full is not None else []

    def set_strength(self, t: float) -> None:
        """Adapter strength t ≥ 0 (DESIGN §3); 0 gives exactly the base model's images."""
        if t < 0 or not isinstance(t, (int, float)):
            raise ValueError(f"strength {t}: use a number >= 0 (0 = base model, 1 = as trained)")
        previous, self.strength = self.strength, float(t)
        if self.adapter is not None:
            try:
                self._apply_strength()
            except ValueError:
                self.strength = previous                # the session stays as it was
                self._apply_strength()
                raise

    def _apply_strength(self) -> None:
        t = self.strength
        if self._full is not None:
            self._full.apply(t)
            return
        adapters.unmerge(self.pipe)
        adapters.set_strength(self.pipe, t)
        if self.merge and t != 0.0:      # t = 0 runs the base layers themselves: bit-exact base images
            try:
                adapters.merge(self.pipe)
            except ValueError as e:
                raise ValueError(f"{self.adapter.path}: {e}") from None

    def _remove_adapter(self) -> None:
        if self._full is not None:
            self._full.apply(0.0)                      # the base weights back
            self._full = None
        if any(True for _ in inject.iter_layers(self.pipe)):
            adapters.detach(self.pipe)
        self.adapter = None
        self.alias = None

    # ---- images ------------------------------------------------------------------------------
    def sampling(self, prompt: str, *, negative: str | None = None, steps: int | None = None,
                 guidance: float | None = None, width: int | None = None, height: int | None = None) -> Sampling:
        """How ``prompt`` is drawn on this model: the family's defaults for what is not given, checked."""
        width = width or self.defaults["resolution"]
        height = height or self.defaults["resolution"]
        multiple = fam.size_multiple(self.pipe)
        if width % multiple or height % multiple:
            raise ValueError(f"width/height {width}×{height}: use multiples of {multiple} for this model")
        if self.alias is not None and self.strength != 0.0:      # "a sks cross" → "a <s0><s1> cross"
            prompt = name_subject(prompt, *self.alias)
            negative = negative and name_subject(negative, *self.alias)
        return Sampling(prompt, negative, steps or self.defaults["steps"],
                        self.defaults["guidance"] if guidance is None else guidance, width, height)

    @torch.no_grad()
    def generate(self, prompt: str, *, negative: str | None = None, n: int = 1, steps: int | None = None,
                 guidance: float | None = None, seed: int = 0, seeds: Sequence[int] | None = None,
                 width: int | None = None, height: int | None = None, batch_size: int = 4,
                 on_image: Callable[[Image.Image], None] | None = None) -> list[Image.Image]:
        """``n`` images of ``prompt`` (seeds ``seed, seed+1, …`` or ``seeds``), each carrying
        its parameters in ``image.info["parameters"]`` / ``image.info["dorabooth"]``."""
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(n)]
        if not seeds:
            raise ValueError("n must be at least 1")
        how = self.sampling(prompt, negative=negative, steps=steps, guidance=guidance, width=width, height=height)
        images = []
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start:start + batch_size]
            out = self.pipe(prompt=[how.prompt] * len(chunk),
                            negative_prompt=None if how.negative is None else [how.negative] * len(chunk),
                            num_inference_steps=how.steps, guidance_scale=how.guidance, width=how.width,
                            height=how.height, generator=[torch.Generator().manual_seed(s) for s in chunk]).images
            for s, image in zip(chunk, out):
                params = self._parameters(how, s)
                image.info["parameters"] = _a1111_text(params)
                image.info["dorabooth"] = json.dumps(params)
                images.append(image)
                if on_image is not None:
                    on_image(image)
        return images

    def _parameters(self, how: Sampling, seed: int) -> dict:
        return {
            "prompt": how.prompt, "negative_prompt": how.negative or "", "steps": how.steps,
            "guidance": how.guidance, "seed": seed, "width": how.width, "height": how.height,
            "sampler": type(self.pipe.scheduler).__name__,
            "strength": self.strength if self.adapter is not None else None,
            "adapter": str(self.adapter.path) if self.adapter is not None else None,
            "merged": bool(self.merge and self.adapter is not None and self.adapter.kind == "adapter"
                           and self.strength != 0.0),
            "base_model": self.base.id if self.base else None,
            "base_model_hash": self.base.hash if self.base else None,
            "family": self.family.name, "dorabooth_version": __version__,
        }


def _a1111_text(p: dict) -> str:
    """The "parameters" PNG text A1111 and many viewers show."""
    lines = [p["prompt"]]
    if p["negative_prompt"]:
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    extra = f", Lora: {Path(p['adapter']).name}:{p['strength']:g}" if p["adapter"] else ""
    lines.append(f"Steps: {p['steps']}, Sampler: {p['sampler']}, CFG scale: {p['guidance']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model hash: {p['base_model_hash'] or 'unknown'}{extra}")
    return "\n".join(lines)


def save_png(image: Image.Image, folder: str | os.PathLike, name: str) -> Path:
    """Write ``image`` with its parameters as PNG text chunks; temp name, then rename (a failed
    write leaves neither the temporary nor a folder it made)."""
    folder = Path(folder)
    info = PngInfo()
    for key in ("parameters", "dorabooth"):
        if key in image.info:
            info.add_text(key, image.info[key])
    path = folder / name
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def _next_index(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def generate(prompt: str, *, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
             model: str | None = None, model_config: str | None = None, negative: str | None = None,
             n: int = 1, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, strength: float | Sequence[float] = 1.0,
             width: int | None = None, height: int | None = None, merge: bool = True,
             on_event: Callable[[dict], None] | None = None, session: Session | None = None) -> list[Path]:
    """Write ``n`` PNGs of ``prompt`` into ``out`` for each strength; returns their paths.

    ``adapter``: a run folder (its base model comes from its ``config.json`` unless ``model``
    is given), an adapter file, or None for the base model alone. ``model`` defaults to the
    embedded toy model. Pass a ``session`` to reuse an already loaded base model.
    """
    emit = EventLog(None, on_event)
    source = resolve_adapter(adapter) if adapter is not None else None
    if session is None:
        if model is None and source is not None:          # a run folder brings its base model
            model, model_config = source.model, model_config or source.model_config
        session = Session(model, merge=merge, model_config=model_config)
    session.use_adapter(source)
    strengths = [strength] if isinstance(strength, (int, float)) else list(strength)
    folder = Path(out)                                  # made by the first image written
    paths = []
    for t in strengths:
        session.set_strength(t)
        images = session.generate(prompt, negative=negative, n=n, steps=steps, guidance=guidance, seed=seed,
                                  width=width, height=height)
        for image in images:
            params = json.loads(image.info["dorabooth"])
            suffix = f"-t{t:g}" if source is not None and len(strengths) > 1 else ""
            path = save_png(image, folder, f"{_next_index(folder):04d}-s{params['seed']}{suffix}.png")
            paths.append(path)
            emit("image", path=str(path), seed=params["seed"], strength=params["strength"], done=len(paths),
                 total=len(strengths) * n)
    return paths


__all__ = ["Session", "generate", "save_png"]
