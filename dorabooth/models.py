"""Load a base pipeline: hub id, local diffusers folder, or one ``.safetensors`` checkpoint.

Owns: telling the three apart (with errors that say what to pass instead), the embedded
toy model as the default, refusing pickled weights (only safetensors are read), family
detection through :mod:`dorabooth.families`, and a fingerprint of the base weights that
runs and adapters record. Loading is two steps, so that a caller can decide dtypes from the
configs before any weight is read: :func:`open_pipeline` (configs, tokenizers, scheduler;
model components empty) and :func:`load_weights` (each component in its dtype, one tensor at
a time, :mod:`dorabooth.weights`); :func:`load_pipeline` does both.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import Family, detect_family
from .formats.files import read_metadata
from .weights import FolderWeights, SingleFileWeights, is_empty, skeleton


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
                  single_file_config: str | None = None, fp32: Collection[str] = ()) -> tuple[object, BaseModel]:
    """Load a StableDiffusion(XL)Pipeline and describe it.

    ``model``: hub id, diffusers folder, ``.safetensors`` file, or None for the embedded toy.
    ``single_file_config``: for a single file, a diffusers folder or hub id whose configs
    describe it (else diffusers infers the architecture and fetches the configs it needs).
    Returns ``(pipe, BaseModel)``; the pipeline is on the CPU in ``dtype``, but for the
    components named in ``fp32``. Weights are read one tensor at a time into their final
    dtype (:mod:`dorabooth.weights`): the peak is the loaded pipeline plus one tensor.
    """
    pipe, base, weights = open_pipeline(model, single_file_config=single_file_config, dtype=dtype)
    load_weights(pipe, weights, dtype, fp32)
    return pipe, base


def open_pipeline(model: str | os.PathLike | None = None, *, single_file_config: str | None = None,
                  dtype: torch.dtype = torch.float32):
    """``(pipe, BaseModel, weights)``: the pipeline with its model components still empty (on the
    meta device: configs, tokenizers and scheduler are real) and ``weights``, where each weight
    is on disk (:class:`~dorabooth.weights.FolderWeights` / :class:`~dorabooth.weights.SingleFileWeights`);
    :func:`load_weights` fills it. A single file that only diffusers' own loader reads (no local
    ``single_file_config``, or one our key map does not fit) comes back loaded, in ``dtype``,
    with ``weights`` None."""
    kind, location = resolve_model(model)
    if kind == "hub":
        from diffusers import DiffusionPipeline
        try:
            folder = DiffusionPipeline.download(location, use_safetensors=True)
        except Exception as e:  # network, auth, missing repo: say what to do, keep the cause
            raise OSError(f"{location!r} is not a local file or folder, and getting it from the Hugging Face "
                          f"hub failed ({type(e).__name__}: {e}). Check the path or id and your connection, "
                          f"log in for gated models, or pass a local diffusers folder / .safetensors file") from e
        location = str(folder)
    if kind in ("hub", "folder"):
        pipe, weights = _open_folder(location)
    else:
        pipe, weights = _open_single_file(location, dtype, single_file_config)
    family = detect_family(pipe)
    ident = "toy" if model is None or str(model) in TOY_ALIASES else str(model)
    return pipe, BaseModel(ident, kind, location, weights_hash(location), family.name), weights


def load_weights(pipe, weights, dtype: torch.dtype, fp32: Collection[str] = ()) -> None:
    """Fill the empty components of an :func:`open_pipeline` pipeline from ``weights``, each in
    ``dtype`` or, if named in ``fp32``, in fp32; components loaded already are cast the same way."""
    for name, module in list(pipe.components.items()):
        if not isinstance(module, torch.nn.Module):
            continue
        want = torch.float32 if name in fp32 else dtype
        if is_empty(module):
            if weights is None:
                raise ValueError(f"{name} has no weights to load")
            filled = weights.fill(module, name, want)
            if filled is not module:
                setattr(pipe, name, filled)
        elif module.dtype != want:
            module.to(want)
    if weights is not None:
        weights.close()


def _open_folder(folder: str):
    index_path = Path(folder) / "model_index.json"
    cls = json.loads(index_path.read_text()).get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        raise ValueError(f"{folder} holds a {cls}; dorabooth trains {' and '.join(SUPPORTED_PIPELINES)} models "
                         f"(SD 1.x, SD 2.x, SDXL)")
    extra = dict(NO_SAFETY_CHECKER) if "safety_checker" in json.loads(index_path.read_text()) else {}
    pipe = skeleton(Path(folder), **extra)
    weights = FolderWeights(folder, pipe)
    for component in weights.problems:
        refuse_pickled_weights(Path(folder) / component)
    return pipe, weights


def refuse_pickled_weights(folder: Path, fix: str = "Re-save the pipeline with safe_serialization=True") -> None:
    """Raise when ``folder`` holds its weights only as pickled ``.bin`` files (which are never opened)."""
    if any(folder.glob("*.bin")) and not any(folder.glob("*.safetensors")):
        raise OSError(f"{folder}: only pickled .bin weights; dorabooth reads only .safetensors, never pickled .bin "
                      f"files. {fix}")


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


def _open_single_file(path: str, dtype: torch.dtype, config: str | None):
    """With a local ``config`` folder: its skeleton, the weights read through our key map (the
    exporter's, strict: streamed, and right for SDXL encoders of equal width, which diffusers
    tells apart by width only); else, or when the key map does not fit the file, diffusers'
    ``from_single_file`` loads the whole pipeline (in ``dtype``)."""
    family = checkpoint_family(path)
    problems = []
    local = config is not None and (Path(config) / "model_index.json").is_file()
    if local:
        try:
            extra = {} if family == "sdxl" else dict(NO_SAFETY_CHECKER)
            pipe = skeleton(Path(config), weights_here=False, **extra)
            pipe.register_to_config(_name_or_path=path)
            return pipe, SingleFileWeights(path, pipe, family)
        except (KeyError, ValueError) as e:
            problems.append(f"dorabooth's key map: {e.args[0] if e.args else e}")
    try:
        pipe = _from_single_file(path, dtype, family, config)
        unloaded = _unloaded_components(pipe)
        if not unloaded:
            return pipe, None
        problems.append(f"diffusers' from_single_file left {', '.join(unloaded)} without weights")
        cause = None
    except Exception as e:
        problems.append(f"diffusers' from_single_file: {type(e).__name__}: {e}")
        cause = e
    raise OSError(f"{path}: could not load this {family} checkpoint ({'; '.join(problems)}). "
                  + ("Check that --model-config is the diffusers folder of the model this file was made from"
                     if local else "Without internet, pass the matching diffusers folder as the single-file "
                                   "config (--model-config DIR)")) from cause


def _from_single_file(path: str, dtype: torch.dtype, family: str, config: str | None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {} if family == "sdxl" else dict(NO_SAFETY_CHECKER)
    if config is not None:
        extra["config"] = config
    return cls.from_single_file(path, **_dtype_kwargs(dtype), **extra)


def _unloaded_components(pipe) -> list[str]:
    return [name for name, c in pipe.components.items() if is_empty(c)]


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
