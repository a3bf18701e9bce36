"""Load a base pipeline: hub id, local diffusers folder, or one ``.safetensors`` checkpoint.

Owns: telling the three apart (with errors that say what to pass instead), the embedded
toy model as the default, refusing pickled weights (only safetensors are read), family
detection through :mod:`dorabooth.families`, and a fingerprint of the base weights that
runs and adapters record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import Family, detect_family
from .formats.files import read_metadata, read_safetensors
from .formats.single_file import Mapper


def shipped_path(top: str, name: str = "") -> Path:
    """``<top>/<name>`` of what the project ships beside the package (``assets``, ``prompts``):
    in the source tree (a checkout or an editable install) or, in a wheel install, inside the
    data-only package ``dorabooth_<top>`` the wheel carries."""
    import importlib.util

    source = Path(__file__).resolve().parent.parent / top / name
    if source.exists():
        return source
    spec = importlib.util.find_spec(f"dorabooth_{top}")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / name).exists():
            return Path(location) / name
    return source                          # missing everywhere: errors name the source-tree path


def asset_dir(name: str) -> Path:
    """``assets/<name>`` (the toy model, the sample subjects), wherever it was installed."""
    return shipped_path("assets", name)


TOY_MODEL = asset_dir("toy-sdxl")
TOY_ALIASES = ("toy", "toy-sdxl")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
NO_SAFETY_CHECKER = {"safety_checker": None, "requires_safety_checker": False}   # SD 1.x/2.x pipelines
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FULL_HASH_LIMIT = 512 * 2**20


@dataclass(frozen=True)
class BaseModel:
    """Where a base model came from: what a run, an adapter and an export record."""

    id: str             # what the user passed (hub id, path), or "toy"
    kind: str           # "hub" | "folder" | "single_file"
    path: str           # the local folder or file the weights were read from
    hash: str           # "sha256:…" of the weights (sampled for very large models)
    family: str

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "path": self.path, "hash": self.hash, "family": self.family}


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str]:
    """(kind, location) for a ``--model`` value: None/"toy" → the embedded toy model folder.

    Raises with a message that says what to pass when ``model`` is none of the three kinds.
    """
    if model is None or str(model) in TOY_ALIASES:
        if not (TOY_MODEL / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the embedded toy model is missing ({TOY_MODEL}); build it with `dorabooth toy build` "
                f"or pass --model (hub id, diffusers folder or .safetensors file)")
        return "folder", str(TOY_MODEL)
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            hint = (" It looks like one component (a UNet/VAE folder); pass the pipeline folder above it."
                    if (path / "config.json").is_file() else "")
            raise ValueError(f"{path} is a folder but not a diffusers pipeline (no model_index.json).{hint} "
                             f"Pass a diffusers pipeline folder, a .safetensors checkpoint or a hub id.")
        return "folder", str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: only .safetensors checkpoints are loaded; {suffix} files are pickles "
                             f"that can run code when opened. Convert it to .safetensors with a tool you trust.")
        if suffix != ".safetensors":
            raise ValueError(f"{path}: not a .safetensors checkpoint or a diffusers folder")
        return "single_file", str(path)
    if text.lower().endswith((".safetensors",) + PICKLE_SUFFIXES) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"--model {text!r}: no such file or folder, and not a hub id like "
                                f"'stabilityai/stable-diffusion-xl-base-1.0'")
    return "hub", text


def load_pipeline(model: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                  single_file_config: str | None = None) -> tuple[object, BaseModel]:
    """Load a StableDiffusion(XL)Pipeline and describe it.

    ``model``: hub id, diffusers folder, ``.safetensors`` file, or None for the embedded toy.
    ``single_file_config``: for a single file, a diffusers folder or hub id whose configs
    describe it (else diffusers infers the architecture and fetches the configs it needs).
    Returns ``(pipe, BaseModel)``; the pipeline is on the CPU in ``dtype``.
    """
    kind, location = resolve_model(model)
    if kind == "hub":
        from diffusers import DiffusionPipeline
        try:
            folder = DiffusionPipeline.download(location, use_safetensors=True)
        except Exception as e:  # network, auth, missing repo: say what to do, keep the cause
            raise OSError(f"{location!r} is not a local file or folder, and getting it from the Hugging Face "
                          f"hub failed ({type(e).__name__}: {e}). Check the path or id and your connection, "
                          f"log in for gated models, or pass a local diffusers folder / .safetensors file") from e
        pipe = _from_folder(str(folder), dtype)
        path = str(folder)
    elif kind == "folder":
        pipe = _from_folder(location, dtype)
        path = location
    else:
        pipe = _from_single_file(location, dtype, single_file_config)
        path = location
    family = detect_family(pipe)
    ident = "toy" if model is None or str(model) in TOY_ALIASES else str(model)
    return pipe, BaseModel(ident, kind, path, weights_hash(path), family.name)


def _from_folder(folder: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline
    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder} holds a {cls}; dorabooth trains {' and '.join(SUPPORTED_PIPELINES)} models "
                         f"(SD 1.x, SD 2.x, SDXL)")
    extra = {}
    if "safety_checker" in index:
        extra = dict(NO_SAFETY_CHECKER)
    try:
        return DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **_dtype_kwargs(dtype), **extra)
    except OSError as e:
        if "safetensors" in str(e).lower() or any(Path(folder).rglob("*.bin")):
            raise OSError(f"{folder}: could not load safetensors weights ({e}); dorabooth reads only "
                          f".safetensors, never pickled .bin files. Re-save the pipeline with "
                          f"safe_serialization=True") from e
        raise


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """fp32 is diffusers' default: pass nothing (the keyword was renamed torch_dtype → dtype)."""
    return {} if dtype == torch.float32 else {"torch_dtype": dtype}


def checkpoint_family(path: str) -> str:
    """sd1 | sd2 | sdxl from the key names of an original-layout checkpoint (no tensors read)."""
    keys = set(read_metadata(path, "checkpoint")[0])
    if any("lora_" in k or k.endswith(".alpha") or "lora." in k for k in list(keys)[:200]):
        raise ValueError(f"{path} is a LoRA/DoRA adapter, not a base model; pass it as --adapter and "
                         f"the base model as --model")
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys) or \
            any(k.startswith("model.diffusion_model.") for k in keys):
        return "sd1"
    if "unet" in {k.split(".")[0] for k in keys} or any(k.startswith("down_blocks.") for k in keys):
        raise ValueError(f"{path} holds diffusers-layout weights (a component, not a whole checkpoint); pass "
                         f"the diffusers pipeline folder instead")
    raise ValueError(f"{path}: keys do not look like an SD 1.x / 2.x / SDXL checkpoint "
                     f"(expected model.diffusion_model.…, cond_stage_model.… or conditioner.embedders.…)")


def _from_single_file(path: str, dtype: torch.dtype, config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    family = checkpoint_family(path)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else dict(NO_SAFETY_CHECKER)
    if config is not None:
        extra["config"] = config
    try:
        pipe = cls.from_single_file(path, **_dtype_kwargs(dtype), **extra)
        unloaded = _unloaded_components(pipe)
        if not unloaded:
            return pipe
        problem, cause = f"it left {', '.join(unloaded)} without weights", None
    except Exception as e:
        problem, cause = f"{type(e).__name__}: {e}", e
    local = config is not None and (Path(config) / "model_index.json").is_file()
    if local:           # e.g. SDXL encoders of equal width, which diffusers tells apart by width only
        try:
            return _from_single_file_mapped(path, dtype, Path(config), family)
        except Exception as e:
            problem += f"; dorabooth's own key map failed too ({type(e).__name__}: {e})"
    raise OSError(f"{path}: diffusers could not load this {family} checkpoint ({problem}). "
                  + ("Check that --model-config is the diffusers folder of the model this file was made from"
                     if local else "Without internet, pass the matching diffusers folder as the single-file "
                                   "config (--model-config DIR)")) from cause


def _unloaded_components(pipe) -> list[str]:
    return [name for name, c in pipe.components.items()
            if isinstance(c, torch.nn.Module) and any(p.is_meta for p in c.parameters())]


def _from_single_file_mapped(path: str, dtype: torch.dtype, config: Path, family: str):
    """The pipeline of ``config`` (a diffusers folder: its component configs, tokenizers and
    scheduler) with every weight read from the single file through the original-layout key map
    the exporter writes with (:class:`dorabooth.formats.single_file.Mapper`); strict: a weight
    the file lacks is an error."""
    import importlib

    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(config))
    parts = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or spec[0] is None:
            continue
        library, class_name = spec
        component_cls = getattr(importlib.import_module(library), class_name)
        folder = config / name
        if not issubclass(component_cls, torch.nn.Module):
            parts[name] = component_cls.from_pretrained(str(folder))              # tokenizer, scheduler
        elif library == "diffusers":
            parts[name] = component_cls.from_config(component_cls.load_config(str(folder)))
        else:
            from transformers import AutoConfig
            parts[name] = component_cls(AutoConfig.from_pretrained(str(folder)))
    original, _ = read_safetensors(path, "checkpoint")
    mapper = Mapper(family, parts["unet"].config, parts["vae"].config)
    for name, module in parts.items():
        if not isinstance(module, torch.nn.Module):
            continue
        state = {k: mapper.read(original, name, k).to(v.dtype) for k, v in module.state_dict().items()}
        module.load_state_dict(state, strict=True)
        if dtype != torch.float32:
            module.to(dtype)
        module.eval()
    pipeline_cls = getattr(importlib.import_module("diffusers"), index["_class_name"])
    extra = {} if family == "sdxl" else {**NO_SAFETY_CHECKER, "feature_extractor": None}
    return pipeline_cls(**parts, **{k: v for k, v in extra.items() if k not in parts})


def weights_hash(path: str | os.PathLike) -> str:
    """"sha256:…" over the weight files (``*.safetensors``) and configs of a folder or one file.

    Up to 512 MiB everything is hashed; above, each file's size, header and three 1 MiB
    samples (prefix "sha256s:"): cheap for a 7 GB SDXL and still different after any fine-tune.
    """
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*")
                                            if f.is_file() and f.suffix in (".safetensors", ".json"))
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    full = total <= _FULL_HASH_LIMIT
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        size = f.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            if full or size <= 4 * 2**20:
                for chunk in iter(lambda: fh.read(2**20), b""):
                    h.update(chunk)
            else:
                for offset in (0, size // 2, size - 2**20):
                    fh.seek(offset)
                    h.update(fh.read(2**20))
    return ("sha256:" if full else "sha256s:") + h.hexdigest()


def family_of(pipe) -> Family:
    return detect_family(pipe)
