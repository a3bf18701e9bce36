"""A base model's weights on disk, read one tensor at a time, and its components built empty.

Owns the memory side of loading (issue 11): a pipeline *skeleton* (every ``nn.Module``
component built from its config with its parameters on the meta device, so it costs no
memory; tokenizers, scheduler and configs real), where each of its weights lives on disk,
and filling a skeleton in a dtype chosen per component, one tensor at a time. Nothing is
ever held twice or in a wider dtype than asked for: the peak is the filled model plus one
tensor. Exports read base weights through the same sources without filling anything.

Two sources, one interface (``names``, ``dtype``, ``shape``, ``read`` per component and
parameter name, in the model's own state-dict naming):

- :class:`FolderWeights`: a diffusers folder's component files (``<component>/model.safetensors``
  or ``diffusion_pytorch_model.safetensors``, sharded or not). A component whose files hold
  other names (old VAE attention names, say) is loaded by its own library instead
  (``from_pretrained``: correct, but not streamed).
- :class:`SingleFileWeights`: one original-layout checkpoint, through the exporter's key map
  (:class:`dorabooth.formats.single_file.Mapper`); strict: a weight the file lacks is an error.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from .formats.files import SafetensorsReader
from .formats.single_file import Mapper

MODEL_FILES = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}   # <name>.safetensors per library
_TRIM_EVERY = 512 * 2**20        # bytes read between two release_free_memory calls


def release_free_memory() -> int:
    """Give freed heap pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Read buffers freed between tensors that stay (a fp16 read cast to fp32, say) leave holes
    in glibc's heap that it keeps, a few hundred MB over a UNet; trimming returns them."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return 0


# ---- skeletons ---------------------------------------------------------------------------------
def module_spec(index: dict) -> dict[str, tuple[str, type]]:
    """``{component: (library, class)}`` of the ``nn.Module`` components a model_index.json names."""
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = spec
        cls = getattr(importlib.import_module(library), class_name, None)
        if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
            out[name] = (library, cls)
    return out


def empty_module(library: str, cls: type, folder: Path, record_path: bool = True) -> torch.nn.Module:
    """``cls`` built from the config in ``folder`` with its parameters on the meta device
    (buffers real: CLIP's position ids are made at construction, not read). ``record_path``:
    the folder is where its weights are (diffusers' ``from_pretrained`` records it in the config)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            module = cls.from_config(cls.load_config(str(folder)))
            if record_path:
                module.register_to_config(_name_or_path=str(folder))
            return module
        return cls(cls.config_class.from_pretrained(str(folder)))


def skeleton(config: Path, *, weights_here: bool = True, **extra):
    """The pipeline of diffusers folder ``config`` with every model component empty (meta).
    ``weights_here``: False when ``config`` only describes weights kept elsewhere (a single file)."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(str(config))
    modules = {name: empty_module(library, cls, config / name, weights_here)
               for name, (library, cls) in module_spec(index).items()}
    return DiffusionPipeline.from_pretrained(str(config), **modules, **extra)


def is_empty(module) -> bool:
    return isinstance(module, torch.nn.Module) and any(p.is_meta for p in module.parameters())


# ---- sources -----------------------------------------------------------------------------------
class _Source:
    """``names``/``dtype``/``shape``/``read`` of a skeleton's components; subclasses say where
    each tensor is (``_locate``) and how it is read (``read``)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.shapes = {c: {k: tuple(v.shape) for k, v in m.state_dict().items()} for c, m in modules.items()}

    @property
    def components(self) -> list[str]:
        return list(self.shapes)

    def names(self, component: str) -> list[str]:
        return list(self.shapes[component])

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        return self.shapes[component][name]

    def fill(self, module: torch.nn.Module, component: str, dtype: torch.dtype) -> torch.nn.Module:
        """Every parameter and persistent buffer of the empty ``module`` read from the files, floating
        point ones in ``dtype``, one tensor at a time; returns the module (in eval mode)."""
        read = 0
        with torch.no_grad():
            for name, current in module.state_dict(keep_vars=True).items():
                stored = self.dtype(component, name)
                want = dtype if stored.is_floating_point else stored
                if want == stored:
                    value = self.read(component, name)
                    if value.untyped_storage().nbytes() > value.nbytes:      # a slice of a q/k/v block
                        value = value.clone()
                else:   # the result first, then the read: the freed read buffer is the heap's top, not a hole
                    value = torch.empty(self.shape(component, name), dtype=want)
                    value.copy_(self.read(component, name))
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=current.requires_grad)
                else:
                    owner._buffers[leaf] = value
                read += value.nbytes
                if read > _TRIM_EVERY:
                    read = release_free_memory()
        release_free_memory()
        return _checked(module, component).eval()


def _checked(module: torch.nn.Module, where: str, why: str = "") -> torch.nn.Module:
    """``module``, unless a parameter is still on the meta device (its files lack it): an error."""
    left = [n for n, p in module.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{where}: {len(left)} weights are not in its files (e.g. {', '.join(left[:3])})"
                         + (f"; {why}" if why else "") + "; the model's files are incomplete or for another "
                         "config: download or copy them again")
    return module


class FolderWeights(_Source):
    """The weights of a diffusers folder's components, by the skeleton's parameter names."""

    def __init__(self, folder: str | Path, pipe):
        self.folder = Path(folder)
        from diffusers import DiffusionPipeline

        specs = module_spec(DiffusionPipeline.load_config(str(self.folder)))
        modules = {c: getattr(pipe, c) for c in specs if getattr(pipe, c, None) is not None}
        super().__init__(modules)
        self.classes = {c: specs[c] for c in modules}
        self.where: dict[str, dict[str, tuple[SafetensorsReader, str]]] = {}
        self.problems: dict[str, str] = {}           # component → why it is loaded by its library instead
        self._library: dict[str, dict[str, torch.Tensor]] = {}
        for component in modules:
            try:
                self.where[component] = self._locate(component)
            except (KeyError, FileNotFoundError) as e:
                self.problems[component] = str(e)

    def _locate(self, component: str) -> dict[str, tuple[SafetensorsReader, str]]:
        library, _ = self.classes[component]
        folder = self.folder / component
        stem = MODEL_FILES.get(library, "model")
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            raise FileNotFoundError(f"{folder}: no {single.name} or {index.name}")
        stored = {}
        for f in files:
            reader = SafetensorsReader(f, f"{component} weights")
            stored.update({k: (reader, k) for k in reader})
        where = {}
        for name in self.names(component):
            key = next((k for k in (name, "text_model." + name, name.removeprefix("text_model.")) if k in stored), None)
            if key is None:
                raise KeyError(f"{files[0]} has no {name}")
            if tuple(stored[key][0].shape(key)) != self.shape(component, name):
                raise KeyError(f"{files[0]}: {key} is {stored[key][0].shape(key)}, the config makes "
                               f"{self.shape(component, name)}")
            where[name] = stored[key]
        return where

    def dtype(self, component: str, name: str) -> torch.dtype:
        if component in self.problems:
            return self._loaded(component)[name].dtype
        reader, key = self.where[component][name]
        return reader.dtype(key)

    def read(self, component: str, name: str) -> torch.Tensor:
        if component in self.problems:
            return self._loaded(component)[name]
        reader, key = self.where[component][name]
        return reader[key]

    def fill(self, module, component, dtype):
        if component not in self.problems:
            return super().fill(module, component, dtype)
        library, cls = self.classes[component]              # the library's own loader (renamed keys…)
        kwargs = {"torch_dtype": dtype} if library == "diffusers" else {"dtype": dtype}
        module = cls.from_pretrained(str(self.folder / component), use_safetensors=True, **kwargs)
        return _checked(module, str(self.folder / component), self.problems[component]).eval()

    def _loaded(self, component: str) -> dict[str, torch.Tensor]:
        if component not in self._library:
            self._library[component] = self.fill(None, component, torch.float32).state_dict()
        return self._library[component]

    def close(self) -> None:
        for where in self.where.values():
            for reader, _ in where.values():
                reader.close()


class SingleFileWeights(_Source):
    """The weights of an original-layout single file, by the skeleton's parameter names."""

    def __init__(self, path: str | Path, pipe, family: str):
        modules = {c: getattr(pipe, c) for c in ("unet", "vae", "text_encoder", "text_encoder_2")
                   if getattr(pipe, c, None) is not None}
        super().__init__(modules)
        self.path = Path(path)
        self.file = SafetensorsReader(path, "checkpoint")
        self.mapper = Mapper(family, pipe.unet.config, pipe.vae.config)
        self._last: tuple[str, torch.Tensor] | None = None      # q, k and v share one stored tensor
        for component in modules:                                 # the key map checked from the header alone
            for name in self.names(component):
                t = self.mapper.target(component, name)
                if t is None:
                    continue
                if t.key not in self.file:
                    raise KeyError(f"{self.path} has no {t.key} (for {component}.{name})")

    def dtype(self, component: str, name: str) -> torch.dtype:
        t = self.mapper.target(component, name)
        return self.file.dtype(t.key) if t is not None and t.key in self.file else torch.float32

    def read(self, component: str, name: str) -> torch.Tensor:
        return self.mapper.read(self, component, name)

    # the mapping Mapper.read reads from: the file, remembering the last tensor
    def __contains__(self, key) -> bool:
        return key in self.file

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._last is None or self._last[0] != key:
            self._last = (key, self.file[key])
        return self._last[1]

    def close(self) -> None:
        self._last = None
        self.file.close()
