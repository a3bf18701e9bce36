"""The neutral in-memory adapter: what every reader produces and every writer consumes.

One :class:`ModuleAdapter` per adapted ``nn.Linear``, keyed by a family-level module name:
the pipeline component, then the module path in diffusers/transformers naming, text
encoders always with the ``text_model.`` level (as ``inject.canonical_name`` writes them)::

    unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj
    text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj

Tensors (fp32)::

    down      A : (r, in)
    up        B : (out, r)
    scale     s = alpha / r  (alpha / sqrt(r) with rsLoRA; kohya files store alpha = s·r)
    magnitude m : (out,) for axis "out", (in,) for axis "in", None for plain LoRA

A Conv2d module (LoCon) has ``down`` (r, in, kh, kw) and ``up`` (out, r, 1, 1); its magnitude
is per output channel ("out") or per input channel ("in"), flat as for a Linear.

What a file format stores per component rather than per module (PEFT's ``LoraConfig``: rank,
alpha, use_dora, rsLoRA, targets) is derived from the modules by :meth:`Adapter.component_config`
and :meth:`Adapter.component_targets`; :attr:`Adapter.tensors` gives the live layers' tensors.

:func:`adapted_weight` applies a module adapter to a weight with the one definition of W'(t)
(DESIGN §3, :func:`dorabooth.dora.dora_weight`) that merges, exports and the consumer report use.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from ..conventions import MAGNITUDE_AXES
from ..dora import dora_weight
from .subject import Subject

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@dataclass
class ModuleAdapter:
    down: torch.Tensor                  # A : (r, in), a conv's (r, in, kh, kw)
    up: torch.Tensor                    # B : (out, r), a conv's (out, r, 1, 1)
    scale: float                        # s
    magnitude: torch.Tensor | None = None   # (out,) or (in,), flat
    axis: str | None = None             # "out" | "in" for DoRA, None for LoRA

    def __post_init__(self):
        self.down = self.down.detach().float()
        self.up = self.up.detach().float()
        conv = self.down.ndim == 4 and self.up.ndim == 4 and tuple(self.up.shape[2:]) == (1, 1)
        if not (conv or self.down.ndim == self.up.ndim == 2) or self.down.shape[0] != self.up.shape[1]:
            raise ValueError(f"down {tuple(self.down.shape)} and up {tuple(self.up.shape)} are not (r, in) and "
                             f"(out, r), or a conv's (r, in, kh, kw) and (out, r, 1, 1), of one rank r")
        if (self.magnitude is None) != (self.axis is None):
            raise ValueError("a DoRA module needs both a magnitude and its axis; a LoRA module neither")
        if self.magnitude is not None:
            if self.axis not in MAGNITUDE_AXES:
                raise ValueError(f"magnitude axis must be 'out' or 'in', got {self.axis!r}")
            self.magnitude = self.magnitude.detach().float().reshape(-1)
            n = self.out_features if self.axis == "out" else self.in_features
            if self.magnitude.numel() != n:
                raise ValueError(f"magnitude has {self.magnitude.numel()} entries; axis {self.axis!r} of a "
                                 f"({self.out_features}, {self.in_features}) weight needs {n}")
        self.scale = float(self.scale)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's shape: (out, in), or a conv's (out, in, kh, kw)."""
        return (self.out_features, self.in_features, *self.down.shape[2:])

    @property
    def alpha(self) -> float:
        """The kohya ``alpha`` giving this scale: s·r."""
        return self.scale * self.rank

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None


@dataclass
class VeraInfo:
    """What a DVoRA adapter (DoRA on VeRA, :mod:`dorabooth.dvora`) trained, beside its expanded
    modules: the projections' seed and per module d : (r,) and b : (out,). Its modules hold
    down = diag(d)·A and up = diag(b)·B, so everything else treats it as an ordinary DoRA adapter."""
    seed: int
    d: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]


@dataclass
class Adapter:
    modules: dict[str, ModuleAdapter]
    family: str | None = None           # "sd1" | "sd2" | "sdxl" | None (unknown)
    format: str = ""                    # what the file was, in words
    source: str = ""                    # the file it was read from
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: tuple[str, ...] = ()
    rslora: bool | None = None
    base_model: str | None = None
    targets: dict[str, list[str]] | None = None   # per component, if the file says
    lora_alpha: dict[str, float] = field(default_factory=dict)   # per component, PEFT's alpha if the file says
    file_names: dict[str, str] = field(default_factory=dict)      # module key → name in the file
    magnitude_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # as stored
    subject: Subject | None = None      # trigger word, prompts and class it was trained on, if known
    base_hash: str | None = None        # hash of the base weights it was trained on, if recorded
    vera: VeraInfo | None = None        # a DVoRA adapter's seed and scaling vectors (None for DoRA/LoRA)

    @property
    def method(self) -> str:
        kinds = {m.is_dora for m in self.modules.values()}
        return "mixed" if len(kinds) > 1 else ("dora" if kinds == {True} else "lora")

    @property
    def axis(self) -> str | None:
        """"out", "in", None (plain LoRA) or "mixed"."""
        axes = {m.axis for m in self.modules.values() if m.is_dora}
        return None if not axes else (axes.pop() if len(axes) == 1 else "mixed")

    @property
    def components(self) -> list[str]:
        return sorted(self.by_component(), key=COMPONENTS.index)

    def by_component(self) -> dict[str, list[str]]:
        """Module keys per component, in the order the modules come."""
        return group_by_component(self.modules)

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def alphas(self) -> list[float]:
        return sorted({round(m.alpha, 6) for m in self.modules.values()})

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under the live layers' (PEFT's) names, e.g. ``unet.<module>.lora_A.weight``,
        ``….lora_B.weight`` and ``….lora_magnitude_vector`` ((out,) for axis "out", (1, in) for "in";
        a conv's (1, out, 1, 1), PEFT's shape, for "out")."""
        out = {}
        for key, m in self.modules.items():
            out[f"{key}.lora_A.weight"] = m.down
            out[f"{key}.lora_B.weight"] = m.up
            if m.is_dora:
                out[f"{key}.lora_magnitude_vector"] = magnitude_shaped(m)
        return out

    def component_config(self, component: str) -> dict:
        """rank, alpha, use_dora, magnitude_axis and rslora of ``component``'s layers (the keys of
        ``inject.component_config``): one of each per component, as PEFT's ``LoraConfig`` holds them.

        alpha is the one the file states (``lora_alpha``) where it gives the modules' scale, else
        s·r (s·sqrt(r) with rsLoRA)."""
        mods = [self.modules[k] for k in self.by_component()[component]]
        ranks = {m.rank for m in mods}
        scales = {round(m.scale, 9) for m in mods}
        kinds = {m.is_dora for m in mods}
        axes = {m.axis for m in mods if m.is_dora}
        if len(ranks) > 1 or len(scales) > 1 or len(kinds) > 1 or len(axes) > 1:
            raise ValueError(f"{component}: modules differ in rank {sorted(ranks)}, scale or method; the "
                             f"diffusers-lora format holds one rank/alpha/method per component (kohya holds any)")
        rank, rslora = ranks.pop(), bool(self.rslora)
        alpha = self.lora_alpha.get(component)
        if alpha is None or any(scale_for(alpha, rank, rslora) != m.scale for m in mods):
            alpha = mods[0].scale * (math.sqrt(rank) if rslora else rank)
        return {"rank": rank, "alpha": alpha, "use_dora": kinds.pop(), "magnitude_axis": axes.pop() if axes else None,
                "rslora": rslora}

    def trainable_count(self) -> int:
        """Numbers the adapter trained: d, b and m per module for DVoRA; A, B (and m) otherwise."""
        if self.vera is not None:
            return sum(self.vera.d[k].numel() + self.vera.b[k].numel() + m.magnitude.numel()
                       for k, m in self.modules.items())
        return sum(m.down.numel() + m.up.numel() + (m.magnitude.numel() if m.is_dora else 0)
                   for m in self.modules.values())

    def component_targets(self, component: str) -> list[str]:
        """The target spec ``component`` was attached with; the module paths if the file does not say."""
        return list((self.targets or {}).get(component) or module_paths(self.by_component()[component]))

    def summary(self) -> dict:
        """What ``adapter-info`` prints."""
        per = self.by_component()
        extra = {} if self.vera is None else {"vera_seed": self.vera.seed, "trainable": self.trainable_count()}
        return {
            "file": self.source, "format": self.format, "family": self.family,
            "method": "dvora" if self.vera is not None else self.method, **extra,
            "magnitude_axis": self.axis, "rank": self.ranks(), "alpha": self.alphas(),
            "rslora": self.rslora, "modules": len(self.modules),
            "conv_modules": sum(m.is_conv for m in self.modules.values()),
            "modules_per_component": {c: len(per[c]) for c in self.components},
            "base_model": self.base_model, "unknown_keys": list(self.unknown_keys),
            "trigger": self.subject.trigger if self.subject else None,
            "instance_prompt": self.subject.instance_prompt if self.subject else None,
        }


def split_module_key(key: str) -> tuple[str, str]:
    """``"unet.down_blocks.0…to_q"`` → ``("unet", "down_blocks.0…to_q")``."""
    component, _, module = key.partition(".")
    if component not in COMPONENTS or not module:
        raise ValueError(f"{key!r} is not a module key (expected unet./text_encoder./text_encoder_2. + module path)")
    return component, module


def module_paths(keys: Iterable[str]) -> list[str]:
    """Module keys → module paths within their component (``split_module_key(k)[1]``)."""
    return [split_module_key(k)[1] for k in keys]


def group_by_component(keys: Iterable[str]) -> dict[str, list[str]]:
    """Module keys grouped by component, in order of first appearance: ``{"unet": [key, …], …}``."""
    per: dict[str, list[str]] = {}
    for key in keys:
        per.setdefault(split_module_key(key)[0], []).append(key)
    return per


def axis_from_shape(shape: tuple[int, ...], out_f: int, in_f: int, *, one_d: str = "out") -> str:
    """The magnitude axis a stored magnitude tensor's shape says.

    4-D (a conv's kohya/LyCORIS ``dora_scale``): ``(out, 1, 1, 1)`` → "out", ``(1, in, 1, 1)``
    → "in"; PEFT's conv ``(1, out, 1, 1)`` is read by the diffusers reader, not here.

    ``(out, 1)`` → "out", ``(1, in)`` → "in" (kohya ``dora_scale``; also square weights are
    unambiguous); 1-D ``(n,)`` → ``one_d`` if ``n`` fits it (PEFT's ``(out,)``), else the
    axis ``n`` fits. Raises if the shape fits neither.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[2:] == (1, 1):
        if shape[:2] == (out_f, 1) and shape[:2] != (1, in_f):
            return "out"
        if shape[:2] == (1, in_f) and shape[:2] != (out_f, 1):
            return "in"
    if len(shape) == 2:
        if shape == (out_f, 1) and shape != (1, in_f):
            return "out"
        if shape == (1, in_f) and shape != (out_f, 1):
            return "in"
        if shape == (1, 1) and out_f == in_f == 1:
            return one_d
    elif len(shape) == 1:
        n = shape[0]
        sizes = {"out": out_f, "in": in_f}
        if n == sizes[one_d]:
            return one_d
        other = "in" if one_d == "out" else "out"
        if n == sizes[other]:
            return other
    raise ValueError(f"magnitude shape {shape} fits neither axis of a (out, in) = ({out_f}, {in_f}) weight: "
                     f"expected ({out_f}, 1) for axis 'out' or (1, {in_f}) for axis 'in'")


def magnitude_shaped(m: ModuleAdapter) -> torch.Tensor:
    """The magnitude as the live layer and diffusers/PEFT files hold it: (out,) or (1, in), a conv's
    (1, out, 1, 1) or (1, in)."""
    if m.axis == "in":
        return m.magnitude[None, :]
    return m.magnitude.view(1, -1, 1, 1) if m.is_conv else m.magnitude


def peft_axis(shape: tuple[int, ...], out_f: int, in_f: int, *, conv: bool) -> str | None:
    """The axis of a diffusers/PEFT ``lora_magnitude_vector`` shape: (out,) or, for a conv,
    PEFT's (1, out, 1, 1) → "out"; (1, in) → "in" (dorabooth's, Linear and conv alike); None
    if the shape fits neither."""
    shape = tuple(int(s) for s in shape)
    if shape == ((1, out_f, 1, 1) if conv else (out_f,)):
        return "out"
    if shape == (1, in_f):
        return "in"
    return None


def scale_for(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """s = alpha / r (alpha / sqrt(r) with rsLoRA); no alpha means s = 1 (kohya, diffusers)."""
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def adapted_weight(W: torch.Tensor, mod: ModuleAdapter, strength: float = 1.0,
                   trained_norm: torch.Tensor | None = None) -> torch.Tensor:
    """W' for one module at strength t, in fp32: (out, in): :func:`dorabooth.dora.dora_weight`
    for ``mod``. ``W`` is the weight the module is applied to; ``trained_norm`` is m₀ = ‖W0‖ of
    the base the adapter was trained on (default ‖W‖: a single adapter on its own base)."""
    return dora_weight(W, mod.down, mod.up, mod.scale, mod.magnitude, mod.axis, t=strength, m0=trained_norm)
