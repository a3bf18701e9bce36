"""A DVoRA run's own adapter file (``adapter.safetensors`` of a ``--method dvora`` run): small.

It holds what trained and how to rebuild the rest (:mod:`dorabooth.dvora`)::

    unet.<module>.vera_lambda_d            (r,)       d
    unet.<module>.vera_lambda_b            (out,)     b
    unet.<module>.lora_magnitude_vector    (out,) for axis "out", (1, in) for axis "in"
    text_encoder.text_model.encoder.layers.N.self_attn.q_proj.…   (same three, when they trained)

Header: ``dorabooth.method: dvora``, ``dorabooth.vera_seed`` (the projections' seed),
``dorabooth.vera_projection`` (how A and B are drawn from it: :data:`~dorabooth.dvora.PROJECTION`),
``dorabooth.vera_in_features`` (JSON: module key → in), and the keys of our diffusers-lora
files (format version, family, magnitude axis, rank, alpha, rslora, targets, base model and
hash, ``modelspec.*``). Reading it rebuilds A, B and returns the ordinary DoRA adapter with
down = diag(d)·A, up = diag(b)·B (plus :class:`~.neutral.VeraInfo`), so generate, merges and every
export treat it as DoRA; stock tools do not read this file (export it first).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..dvora import PROJECTION, shared_projection, vera_factors
from .diffusers_lora import FORMAT_VERSION, MAGNITUDE, _modelspec, _number
from .files import write_safetensors
from .neutral import Adapter, ModuleAdapter, VeraInfo, group_by_component, scale_for
from .subject import Subject, description

D_KEY, B_KEY = "vera_lambda_d", "vera_lambda_b"
METHOD = "dvora"


def is_dvora(keys) -> bool:
    """True when the tensor names are a DVoRA file's."""
    return any(k.endswith("." + D_KEY) for k in keys)


# ---- write ---------------------------------------------------------------------------------
def write_dvora(path: str | os.PathLike, adapter: Adapter, *, family: str, version: str = "",
                base_model: str | None = None, overwrite: bool = True) -> Path:
    """Write a DVoRA ``adapter`` (one with :attr:`~.neutral.Adapter.vera`) as d, b, m and the seed."""
    vera = adapter.vera
    if vera is None:
        raise ValueError("not a DVoRA adapter (no seed and scaling vectors); write it as diffusers-lora or kohya")
    target = Path(path)
    tensors, in_features = {}, {}
    for key, mod in adapter.modules.items():
        tensors[f"{key}.{D_KEY}"] = vera.d[key].detach().float()
        tensors[f"{key}.{B_KEY}"] = vera.b[key].detach().float()
        tensors[f"{key}.{MAGNITUDE}"] = mod.magnitude if mod.axis == "out" else mod.magnitude[None, :]
        in_features[key] = mod.in_features
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{target}: adapter tensor {key} is not finite (NaN/inf); not writing a broken adapter")
    configs = {c: adapter.component_config(c) for c in adapter.by_component()}
    (rank,), (alpha,) = {c["rank"] for c in configs.values()}, {c["alpha"] for c in configs.values()}
    metadata = {
        "format": "pt",
        "dorabooth.format_version": FORMAT_VERSION,
        "dorabooth.family": family,
        "dorabooth.method": METHOD,
        "dorabooth.magnitude_axis": adapter.axis,
        "dorabooth.rank": str(rank),
        "dorabooth.alpha": str(_number(alpha)),
        "dorabooth.rslora": "true" if adapter.rslora else "false",
        "dorabooth.targets": json.dumps({c: adapter.component_targets(c) for c in configs}),
        "dorabooth.vera_seed": str(vera.seed),
        "dorabooth.vera_projection": PROJECTION,
        "dorabooth.vera_in_features": json.dumps(in_features, sort_keys=True),
        **({"dorabooth.version": version} if version else {}),
        **({"dorabooth.base_model": str(base_model)} if base_model else {}),
        **({"dorabooth.base_hash": adapter.base_hash} if adapter.base_hash else {}),
    }
    metadata.update(_modelspec(adapter, family, base_model))
    subject = adapter.subject
    metadata["modelspec.title"] = subject.title(METHOD) if subject else "dorabooth DVoRA adapter"
    metadata["modelspec.description"] = description(subject, METHOD, adapter.axis, base_model)
    return write_safetensors(target, tensors, metadata, overwrite=overwrite)


# ---- read ----------------------------------------------------------------------------------
def read_state_dict(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str = "<memory>") -> Adapter:
    """A DVoRA file's tensors and header → the expanded (DoRA) neutral adapter with its VeraInfo."""
    if meta.get("dorabooth.method") != METHOD or "dorabooth.vera_seed" not in meta:
        raise ValueError(f"{source}: has {D_KEY} tensors but its header lacks dorabooth.method 'dvora' and "
                         f"dorabooth.vera_seed; the file is damaged or not a dorabooth DVoRA adapter")
    if meta.get("dorabooth.format_version") != FORMAT_VERSION:
        raise ValueError(f"{source}: dorabooth adapter format version {meta.get('dorabooth.format_version')} is not "
                         f"read by this dorabooth (reads {FORMAT_VERSION}); upgrade dorabooth")
    if meta.get("dorabooth.vera_projection") != PROJECTION:
        raise ValueError(f"{source}: its projections were drawn as {meta.get('dorabooth.vera_projection')!r}, this "
                         f"dorabooth draws them as {PROJECTION!r}; read it with the dorabooth that wrote it")
    seed, rank = int(meta["dorabooth.vera_seed"]), int(meta["dorabooth.rank"])
    alpha, rslora = float(meta["dorabooth.alpha"]), meta.get("dorabooth.rslora") == "true"
    axis, in_features = meta.get("dorabooth.magnitude_axis"), json.loads(meta["dorabooth.vera_in_features"])
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        for suffix in (D_KEY, B_KEY, MAGNITUDE):
            if key.endswith("." + suffix):
                grouped.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
                break
        else:
            raise ValueError(f"{source}: tensor {key!r} is not a DVoRA tensor ({D_KEY}, {B_KEY}, {MAGNITUDE})")
    modules, d, b, shapes = {}, {}, {}, {}
    scale = scale_for(alpha, rank, rslora)
    for key, g in grouped.items():
        missing = [s for s in (D_KEY, B_KEY, MAGNITUDE) if s not in g]
        if missing or key not in in_features:
            raise ValueError(f"{source}: {key} lacks {', '.join(missing) or 'its in_features entry'}; the file is "
                             f"incomplete")
        out_f, in_f = g[B_KEY].numel(), int(in_features[key])
        if tuple(g[D_KEY].shape) != (rank,) or g[B_KEY].ndim != 1:
            raise ValueError(f"{source}: {key}: {D_KEY} {tuple(g[D_KEY].shape)} and {B_KEY} {tuple(g[B_KEY].shape)} "
                             f"are not ({rank},) and (out,)")
        projection = shared_projection(seed, out_f, in_f, rank)
        d[key], b[key] = g[D_KEY].float(), g[B_KEY].float()
        down, up = vera_factors(d[key], b[key], projection.A, projection.B)
        shapes[key] = tuple(g[MAGNITUDE].shape)
        modules[key] = ModuleAdapter(down, up, scale, g[MAGNITUDE].reshape(-1), axis)
    targets = json.loads(meta.get("dorabooth.targets") or "{}")
    return Adapter(modules=modules, family=meta.get("dorabooth.family"),
                   format=f"dorabooth DVoRA (r={rank}, seed {seed}, magnitude {'(out,)' if axis == 'out' else '(1, in)'})",
                   source=source, metadata=dict(meta), rslora=rslora, base_model=meta.get("dorabooth.base_model"),
                   targets=targets or None, lora_alpha={c: alpha for c in group_by_component(modules)},
                   magnitude_shapes=shapes, subject=Subject.from_metadata(meta),
                   base_hash=meta.get("dorabooth.base_hash"), vera=VeraInfo(seed, d, b))
