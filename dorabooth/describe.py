"""Reading what is exported, and saying what each tool will make of an adapter file.

:func:`read_source` turns a run folder, an adapter file or an in-memory Adapter into the
neutral adapter plus the base it recorded; :class:`BaseSpec` finds the base model (a given
pipeline, ``--model``, else the recorded one) and opens it without loading its weights (a
skeleton for configs and names, a weight source that reads one tensor at a time);
:func:`report_base` is the one rule for which base the report measures against (given, else
the recorded one when it is on this machine: "toy", a folder, a file); :func:`consumer_report`
is the per-tool report (exact / approximate / not applied) that ``export`` attaches to the
files it writes and that ``adapter-info --consumers`` prints: one code path for both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from . import pivotal
from . import rundir as rd
from .families import detect_family
from .formats import adapter_files
from .formats.consumers import UNMEASURED, FileView, Verdict
from .formats.consumers import consumer_report as _consumer_report
from .formats.files import read_metadata
from .formats.layout import UNetLayout
from .formats.neutral import Adapter
from .inject import canonical_name
from .merging import ModuleWeights, PipelineWeights
from .models import BaseModel, open_pipeline, resolve_model

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# ---- what is exported ----------------------------------------------------------------------------
def read_source(source) -> tuple[Adapter, str | None]:
    """(adapter, base model recorded with it) from a run folder, an adapter file or an Adapter."""
    if isinstance(source, Adapter):
        return source, source.base_model
    p = Path(source)
    if p.is_dir() and rd.is_run(p):
        run = rd.read_run(p)
        resolved = rd.resolve_adapter(p)             # a clear error when the run has no final adapter
        if resolved.kind == "full":
            raise ValueError(f"{p}: a full fine-tune is a whole model, not an adapter; export it with --format "
                             f"merged-single-file or merged-diffusers")
        adapter = adapter_files.read_adapter_file(resolved.path)     # what the run recorded about itself wins
        return replace(adapter, subject=run.subject, base_model=run.base_ref,
                       base_hash=run.base_hash or adapter.base_hash), run.base_weights
    adapter = adapter_files.read_adapter_file(p)
    return adapter, adapter.base_model


def check_family(adapter: Adapter, family: str) -> None:
    if adapter.family and adapter.family != family:
        raise ValueError(f"{adapter.source or 'adapter'}: made for a {adapter.family} model, but the base model "
                         f"is {family}; pass the matching --model")


@dataclass(frozen=True)
class Base:
    """A base model: the pipeline (a skeleton on the meta device when opened from files), where
    it came from (None: a caller's pipeline), its family, and its weights (a weight source:
    ``names``/``dtype``/``shape``/``read``, :mod:`dorabooth.weights` or
    :class:`~dorabooth.merging.PipelineWeights`)."""

    pipe: object
    info: BaseModel | None
    family: str
    weights: object = None

    def module_weights(self, keys) -> ModuleWeights:
        """``{module key: W0}`` for ``keys``, read when asked."""
        return ModuleWeights(self.pipe, self.weights, keys)


@dataclass(frozen=True)
class BaseSpec:
    """How to find the base model: a caller's pipeline wins; else ``model``; else the base the
    adapter recorded. ``model_config``: the diffusers folder describing a single-file model."""

    model: str | None = None
    model_config: str | None = None
    pipe: object | None = None

    @property
    def given(self) -> bool:
        return self.pipe is not None or self.model is not None

    def open(self, recorded: str | None = None, model_config: str | None = None) -> Base:
        """The base without loading its weights: they are read from its files when asked for."""
        if self.pipe is not None:
            return Base(self.pipe, None, detect_family(self.pipe).name, PipelineWeights(self.pipe))
        pipe, info, weights = open_pipeline(self._candidate(recorded), single_file_config=self.model_config or model_config)
        return Base(pipe, info, detect_family(pipe).name, weights or PipelineWeights(pipe))

    def _candidate(self, recorded: str | None) -> str:
        candidate = self.model or recorded
        if not candidate:
            raise ValueError("no base model: pass --model (hub id, diffusers folder or .safetensors)")
        return candidate


MEASURE_HINT = UNMEASURED


def report_base(spec: BaseSpec, recorded: str | None, *, needed: bool = False) -> tuple[Base | None, str]:
    """(the base the consumer report measures against, why there is none): a caller's pipeline or
    ``--model``; else the base the adapter or run recorded, when it is on this machine ("toy", a
    folder, a file) or when ``needed`` (a hub id is then downloaded). ``export`` and
    ``adapter-info`` both call this, so they report on the same base."""
    if spec.given or needed:
        return spec.open(recorded), ""
    if not recorded:
        return None, MEASURE_HINT
    try:
        kind, _ = resolve_model(recorded)
    except (OSError, ValueError):
        return None, f"the recorded base {recorded} is not on this computer; {MEASURE_HINT}"
    if kind == "hub":
        return None, f"the recorded base {recorded} is a hub id; pass --model {recorded} to download it and measure"
    return spec.open(recorded), ""


def base_notes(adapter: Adapter, base: Base | None) -> list[str]:
    """A warning when the base at hand is not the one the adapter records (its hash differs)."""
    if base is None or base.info is None or not adapter.base_hash or not base.info.hash:
        return []
    if base.info.hash == adapter.base_hash:
        return []
    return [f"the base model at {base.info.path} differs from the one this adapter was trained on (weights hash "
            f"{base.info.hash[:19]}… ≠ {adapter.base_hash[:19]}…): errors are measured against this one"]


# ---- what the tools make of it -------------------------------------------------------------------
def unet_layout(adapter: Adapter, pipe, family: str) -> UNetLayout:
    """The UNet's block layout for kohya names: the base's own config when it is at hand, else
    the layout recorded in the file, else that of the base the file records (its UNet config or
    single-file keys, read without loading it), else the family's standard one."""
    if pipe is not None:
        return UNetLayout.from_config(pipe.unet.config)
    if "dorabooth.unet_layout" in adapter.metadata:
        return UNetLayout.from_json(json.loads(adapter.metadata["dorabooth.unet_layout"]))
    config = recorded_unet_config(adapter)
    if config is not None:
        return UNetLayout.from_config(config)
    path = _recorded_base(adapter, "single_file")
    if path is not None:
        return UNetLayout.from_original_keys(read_metadata(path, "checkpoint")[0])
    return UNetLayout.default(family)


def _recorded_base(adapter: Adapter, kind: str) -> str | None:
    """The local folder or file of the base the adapter records, if it is one of ``kind``."""
    try:
        found, location = resolve_model(adapter.base_model) if adapter.base_model else (None, None)
    except (OSError, ValueError):
        return None
    return location if found == kind else None


def recorded_unet_config(adapter: Adapter) -> dict | None:
    """The UNet config of the base the adapter records, when that is a local diffusers folder."""
    folder = _recorded_base(adapter, "folder")
    config = Path(folder) / "unet" / "config.json" if folder else None
    return json.loads(config.read_text()) if config is not None and config.is_file() else None


def module_names(pipe) -> dict[str, list[str]]:
    """Every module name (canonical) per adapted component of ``pipe``."""
    return {c: [canonical_name(m, c, n) for n, _ in m.named_modules() if n]
            for c in ("unet", *TEXT_ENCODERS) if (m := getattr(pipe, c, None)) is not None}


def consumer_report(adapter: Adapter, family: str, pipe=None, weights=None,
                    unmeasured: str = MEASURE_HINT) -> list[Verdict]:
    """How ComfyUI, A1111, diffusers, LyCORIS… apply the file ``adapter`` was read from.

    ``pipe``: the base model (its UNet config and text-encoder depths name the keys exactly);
    without it they are inferred from the adapter. ``weights``: ``{module key: W0}`` to
    measure each tool's error; without it each verdict notes ``unmeasured`` (why, and what to do)."""
    keys, _ = read_metadata(adapter.source)
    kind = "kohya" if any(k.endswith(".lora_down.weight") for k in keys) else "diffusers"
    if pipe is not None:
        unet_config = pipe.unet.config
        te_layers = {c: int(m.config.num_hidden_layers) for c in TEXT_ENCODERS
                     if (m := getattr(pipe, c, None)) is not None}
    else:
        unet_config = recorded_unet_config(adapter) or _unet_config_guess(adapter, unet_layout(adapter, None, family))
        te_layers = _te_layers_guess(adapter)
    view = FileView(adapter, kind, keys, adapter.file_names, adapter.magnitude_shapes)
    return _consumer_report(view, family, unet_config, te_layers, None if weights is None else weights.__getitem__,
                            unmeasured=unmeasured)


def adapter_info(path: str | os.PathLike, *, consumers: bool = False, model: str | None = None,
                 model_config: str | None = None, pipe=None) -> dict:
    """What ``dorabooth adapter-info`` prints: format, family, method, rank, alpha, axis,
    modules, unknown keys; with ``consumers``, the per-tool report (against the base
    :func:`report_base` picks, as ``export`` does)."""
    adapter, recorded = read_source(path)
    info = adapter.summary()
    info["pivotal"] = pivotal_info(adapter)
    if not consumers:
        return info
    if adapter.vera is not None:
        info["consumers"] = ("a DVoRA run file (d, b, m and a seed) only dorabooth reads; `dorabooth export` writes "
                             "it as an ordinary DoRA file (diffusers-lora, kohya or merged) that the tools load")
        return info
    spec = BaseSpec(model, model_config, pipe)
    if adapter.family is None and not spec.given and not recorded:
        info["consumers"] = "unknown model family; pass --model"
        return info
    base, unmeasured = report_base(spec, recorded, needed=adapter.family is None)
    try:
        if base is not None:
            check_family(adapter, base.family)
        family = adapter.family or base.family
        weights = base.module_weights(adapter.modules) if base is not None else None
        verdicts = consumer_report(adapter, family, base.pipe if base is not None else None, weights, unmeasured)
        info["consumers"] = [v.to_dict() for v in verdicts]
        info["notes"] = base_notes(adapter, base)
    finally:
        if base is not None:
            base.weights.close()
    return info


def pivotal_info(adapter: Adapter) -> dict | None:
    """Pivotal tuning's tokens and their embeddings file (None for an adapter trained without it)."""
    identifier = adapter.subject.token if adapter.subject else None
    if not pivotal.is_identifier(identifier):
        return None
    try:
        file = pivotal.embeddings_for(adapter.source, identifier)
        tokens, rows = pivotal.read_embeddings(file, adapter.family)
        return {"tokens": tokens, "embeddings": str(file), "rows": {k: list(v.shape) for k, v in rows.items()}}
    except (FileNotFoundError, ValueError) as e:
        return {"tokens": pivotal.tokens_of(identifier), "embeddings": None, "problem": str(e)}


def _unet_config_guess(adapter: Adapter, layout: UNetLayout) -> dict:
    """A UNet config with the adapter's blocks (for key maps when the base model is not at hand):
    transformer depth per level = 1 + the largest transformer_blocks index the adapter uses."""
    n = len(layout.down_attention)
    depth = [1] * n
    for key in adapter.modules:
        p = key.split(".")
        if p[0] != "unet" or "transformer_blocks" not in p:
            continue
        level = {"down_blocks": lambda: int(p[2]), "up_blocks": lambda: n - 1 - int(p[2])}.get(p[1], lambda: n - 1)()
        depth[level] = max(depth[level], int(p[p.index("transformer_blocks") + 1]) + 1)
    return {"layers_per_block": layout.layers_per_block,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
            "transformer_layers_per_block": depth}


def _te_layers_guess(adapter: Adapter) -> dict[str, int]:
    out = {}
    for key in adapter.modules:
        p = key.split(".")
        if p[0] != "unet" and "layers" in p:
            out[p[0]] = max(out.get(p[0], 0), int(p[p.index("layers") + 1]) + 1)
    return out
