"""A base model described by its configs alone: family, preset, defaults, and its components
built on the meta device (parameter shapes, no memory), so that a run can be planned and
its trainable parameters counted before a weight is read.

:func:`model_spec` reads a ``--model`` value: a diffusers folder's configs, a single file's
config folder or (without one) the published configs of the family its keys show, or a hub
id's JSON files. :func:`trainable_parameters` counts what the trainer will train, from
shapes, with the same target resolution as ``inject``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

from . import families as fam
from .config import TrainConfig
from .families import Family

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}
# The full-size fixtures (dorabooth.testing.fullsize) with each family's published configs.
PUBLISHED = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
_ARCH_KEYS = ("block_out_channels", "layers_per_block", "transformer_layers_per_block", "down_block_types",
              "cross_attention_dim", "attention_head_dim")


# =============================================================================================
# The base model from its configs
# =============================================================================================
@dataclass(frozen=True)
class ModelSpec:
    """A base model as its configs describe it: no weight is read."""

    source: str                                  # where the configs came from, in words
    configs: dict[str, dict]                     # component → its config (unet, vae, text encoders, scheduler)
    classes: dict[str, tuple[str, str]]          # component → (library, class name) from model_index.json

    @cached_property
    def view(self):
        """A stand-in pipeline (``.unet.config`` …) for ``families``' functions."""
        return SimpleNamespace(**{c: SimpleNamespace(config=_Config(self.configs[c])) if c in self.configs else None
                                  for c in _CONFIG_FILES})

    @cached_property
    def family(self) -> Family:
        return fam.detect_family(self.view)

    @property
    def preset(self) -> str:
        return fam.preset_name(self.family, self.view)

    @property
    def defaults(self) -> dict:
        return fam.train_defaults(self.family, self.view)

    @property
    def size_multiple(self) -> int:
        return fam.size_multiple(self.view)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @cached_property
    def modules(self) -> dict:
        """Every weight component built on the meta device (shapes only, no memory)."""
        return {c: _meta_module(self.classes[c], self.configs[c]) for c in COMPONENTS if c in self.configs}

    @cached_property
    def parameters(self) -> dict[str, int]:
        return {c: sum(p.numel() for p in m.parameters()) for c, m in self.modules.items()}

    def published_architecture(self) -> str | None:
        """The full-size fixture (sd15 | sd21 | sdxl) whose UNet architecture this one has, else None."""
        from .testing.fullsize import CONFIGS

        name = PUBLISHED[self.family.name]
        published, mine = CONFIGS[name]["unet"], self.configs["unet"]
        same = all(_listify(published.get(k, 1)) == _listify(mine.get(k, 1)) for k in _ARCH_KEYS)
        return name if same else None


class _Config(dict):
    """A config dict with attribute access, like diffusers' FrozenDict."""

    __getattr__ = dict.get


def _listify(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def model_spec(model: str | None, model_config: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a ``--model`` value (None = the embedded toy) without its weights.

    A diffusers folder: its configs. A single file: the configs of ``model_config`` (a folder
    or hub id) or, without one, the published configs of the family its keys show (what
    diffusers' ``from_single_file`` fetches). A hub id: its JSON files only.
    """
    from .models import checkpoint_family, resolve_model

    kind, location = resolve_model(model)
    if kind == "folder":
        return _from_folder(Path(location))
    if kind == "hub":
        return _from_folder(_hub_configs(location), f"configs of {location} (hub)")
    if model_config is not None:
        folder = Path(model_config) if Path(model_config).is_dir() else _hub_configs(model_config)
        return _from_folder(folder, f"configs of {model_config} (for {Path(location).name})")
    from .testing.fullsize import CONFIGS

    family = checkpoint_family(location)
    name = PUBLISHED[family]
    published = CONFIGS[name]
    classes = {c: tuple(published["model_index"][c]) for c in _CONFIG_FILES if c in published}
    return ModelSpec(f"the published {family.upper()} configs (what diffusers assumes for {Path(location).name}; "
                     f"pass --model-config for another architecture)",
                     {c: dict(published[c]) for c in _CONFIG_FILES if c in published}, classes)


def _from_folder(folder: Path, source: str | None = None) -> ModelSpec:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json; pass a diffusers pipeline folder")
    index = json.loads(index_file.read_text())
    configs, classes = {}, {}
    for name, file in _CONFIG_FILES.items():
        entry = index.get(name)
        path = folder / name / file
        if isinstance(entry, list) and entry[0] is not None:
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing; model_index.json lists {name}. Re-save the pipeline "
                                        f"folder, or pass another --model")
            configs[name] = json.loads(path.read_text())
            classes[name] = (entry[0], entry[1])
    if "unet" not in configs or "vae" not in configs:
        raise ValueError(f"{folder} has no unet/ or vae/ config; pass a Stable Diffusion or SDXL pipeline folder")
    return ModelSpec(source or f"configs of {folder}", configs, classes)


def _hub_configs(repo: str) -> Path:
    """The JSON files of a hub repository (kilobytes), downloaded or from the local cache."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo, allow_patterns=["model_index.json", "*/config.json",
                                                            "*/scheduler_config.json"]))
    except Exception as e:
        raise OSError(f"{repo!r}: could not get its configs from the Hugging Face hub ({type(e).__name__}: {e}); "
                      f"check the id and your connection, or pass a local diffusers folder") from e


def _meta_module(cls_spec: tuple[str, str], config: dict):
    import importlib

    from accelerate import init_empty_weights

    library, name = cls_spec
    cls = getattr(importlib.import_module(library), name)
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        return cls(cls.config_class.from_dict(config))


# =============================================================================================
# Trainable parameters
# =============================================================================================
def adapted_weights(spec: ModelSpec, config: TrainConfig) -> dict[str, int]:
    """Weights of the Linear layers the adapters wrap, per component (what ``--quantize-base``
    holds in NF4); none for ``--method full``."""
    from .inject import TEXT_ENCODER_TARGETS, resolve_targets

    if config.method == "full":
        return {}
    trained = {"unet": config.targets}
    if config.train_text_encoders:
        trained.update({c: TEXT_ENCODER_TARGETS for c in spec.family.text_encoders})
    return {c: sum(spec.modules[c].get_submodule(n).weight.numel() for n in resolve_targets(spec.modules[c], t))
            for c, t in trained.items()}


def trainable_parameters(spec: ModelSpec, config: TrainConfig) -> dict[str, int]:
    """Trainable parameters per component for a resolved ``config``, counted from shapes (the
    adapters the trainer attaches: targets resolved as ``inject`` resolves them). Raises
    ValueError for targets that match nothing or a rank above a target's min(in, out) (a conv's
    min(out, in·kh·kw))."""
    from .dora import max_rank
    from .inject import TEXT_ENCODER_TARGETS, resolve_targets

    modules = spec.modules
    trained = {"unet": config.targets}
    if config.train_text_encoders:
        trained.update({c: TEXT_ENCODER_TARGETS for c in spec.family.text_encoders})
    counts = {}
    for component, targets in trained.items():
        module = modules[component]
        if config.method == "full":
            counts[component] = spec.parameters[component]
            continue
        rank, total, too_small = config.effective_rank, 0, []
        for name in resolve_targets(module, targets):
            target = module.get_submodule(name)
            out_f, in_f, *kernel = target.weight.shape          # a conv's (out, in, kh, kw): A is (r, in, kh, kw)
            if rank > max_rank(target):
                too_small.append(f"{name} weight {tuple(target.weight.shape)}")
            if config.method == "dvora":               # d (r) + b (out) + m; A and B are frozen
                total += rank + out_f + (out_f if config.magnitude_axis == "out" else in_f)
                continue
            total += rank * (in_f * math.prod(kernel) + out_f)
            if config.method == "dora":
                total += out_f if config.magnitude_axis == "out" else in_f
        if too_small:
            raise ValueError(f"rank {rank} is larger than min(in, out) of {len(too_small)} target module(s) in "
                             f"{component}: {', '.join(too_small[:3])}; use a lower --rank or other --targets")
        counts[component] = total
    if config.pivotal_tokens and config.method != "full":     # the new token rows: (N, dim) per text encoder
        for component in spec.family.text_encoders:
            dim = modules[component].get_input_embeddings().embedding_dim
            counts[component] = counts.get(component, 0) + config.pivotal_tokens * dim
    return counts
