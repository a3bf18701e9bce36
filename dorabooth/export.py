"""Export: adapter files and merged checkpoints from runs and adapter files.

``export(adapters, format=..., out=...)`` decides what to write and writes it; the merge
itself is :mod:`dorabooth.merging` (pure, fp32, the multi-adapter definition is there),
reading sources and the per-tool report :mod:`dorabooth.describe`, the file layouts
:mod:`dorabooth.formats`. Every file is written to a temporary name and renamed when
complete; merged weights are checked for finiteness after the cast to the output dtype;
the training model is never modified.

Nothing loads the whole base model: its weights are read from its files one tensor at a
time (:mod:`dorabooth.weights`), merged in fp32 and cast per tensor
(:class:`~dorabooth.merging.MergedWeights`), and written as they come
(:func:`~dorabooth.formats.files.write_safetensors_streaming`, one component file at a time
for a diffusers folder). ``dtype`` None keeps each tensor's stored dtype.

Formats: ``diffusers-lora`` (axis ``out``), ``kohya`` (both axes), ``merged-diffusers`` (a
pipeline folder) and ``merged-single-file`` (one ``.safetensors`` in the original layout).
A ``--method full`` run exports as a merged checkpoint only (W0 + t·(W − W0)).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import pivotal
from . import rundir as rd
from .conventions import EXPORT_DTYPES, EXPORT_FORMATS, MERGED_FORMATS
from .describe import (
    Base,
    BaseSpec,
    base_notes,
    check_family,
    consumer_report,
    module_names,
    read_source,
    report_base,
    unet_layout,
)
from .events import EventLog
from .finetune import FineTunedSource
from .formats import adapter_files
from .formats.consumers import Verdict
from .formats.files import (SafetensorsReader, atomic_folder, read_metadata, write_json, write_safetensors,
                            write_safetensors_streaming)
from .formats.neutral import Adapter
from .formats.single_file import COMPONENTS, Mapper, image_spec, modelspec
from .merging import MERGE_DEFINITION, MergedWeights, bake_strength
from .version import __version__

FORMATS = EXPORT_FORMATS
DTYPES = dict(zip(EXPORT_DTYPES, (torch.float32, torch.float16, torch.bfloat16)))
FULL_MERGE_DEFINITION = "full fine-tune: W0 + t (W - W0) in every fine-tuned weight"


@dataclass
class ExportResult:
    path: Path
    format: str
    report: list[Verdict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """What to write: the format, where, the dtype (None: keep the base's), and whether an
    existing file may be replaced."""

    format: str
    path: Path
    dtype: torch.dtype | None
    overwrite: bool


def export(adapters: Sequence[tuple[object, float]] | object, *, format: str, out: str | os.PathLike,
           model: str | None = None, model_config: str | None = None, pipe=None,
           dtype: str | torch.dtype | None = None, overwrite: bool = False,
           on_event: Callable[[dict], None] | None = None) -> ExportResult:
    """Export one adapter (or several, merged) in ``format``; see the module docstring.

    ``adapters``: ``[(run folder | adapter file | Adapter, strength), …]`` or a single source.
    ``model``/``pipe``: the base model (default: the one recorded with the adapter);
    ``model_config``: the diffusers folder describing a single-file ``model``.
    ``dtype``: "fp16" | "bf16" | "fp32" (merge in fp32, then cast; default: keep the base's
    dtype for checkpoints, fp32 for adapter files).
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose fp16, bf16 or fp32")
    emit = EventLog(None, on_event)
    pairs = _pairs(adapters)
    target = Target(format, Path(out), DTYPES[dtype] if isinstance(dtype, str) else dtype, overwrite)
    spec = BaseSpec(model, model_config, pipe)
    full = [s for s in (_full_run(src) for src, _ in pairs) if s is not None]
    if full:
        return _export_full(full[0], pairs, target, spec, emit)
    loaded = [(*read_source(src), t) for src, t in pairs]          # (adapter, recorded base, strength)
    emit("adapters_read", count=len(loaded))
    embeddings = _pivotal_embeddings(loaded)
    if format not in MERGED_FORMATS:
        return _with_embeddings(_export_adapter(loaded, target, spec, emit), embeddings, emit)
    base = spec.open(next((b for _, b, _ in loaded if b), None))
    try:
        for a, _, _ in loaded:
            check_family(a, base.family)
        keys = sorted({k for a, _, _ in loaded for k in a.modules})
        base_id = (base.info.id if base.info else None) or model or getattr(getattr(base.pipe, "config", None),
                                                                            "_name_or_path", None)
        meta = _merged_metadata(base, base_id, [{"source": a.source, "strength": t, "method": a.method,
                                                 "magnitude_axis": a.axis, "rank": a.ranks(), "format": a.format}
                                                for a, _, t in loaded], MERGE_DEFINITION)
        merged = MergedWeights(base.pipe, base.weights, [(a, t) for a, _, t in loaded], target.dtype)
        path = _write_merged(base, merged, target, meta, emit)
    finally:
        base.weights.close()
    return _with_embeddings(ExportResult(path, format, notes=[f"merged {len(keys)} modules"], metadata=meta),
                            embeddings, emit)


def convert(source, *, to: str, out: str | os.PathLike, model: str | None = None,
            model_config: str | None = None, pipe=None, overwrite: bool = False) -> ExportResult:
    """Read any adapter file and write it as ``to`` ("diffusers-lora" | "kohya"), unchanged in effect."""
    if to not in adapter_files.ADAPTER_FORMATS:
        raise ValueError(f"--to {to!r}: choose one of {', '.join(adapter_files.ADAPTER_FORMATS)}")
    return export([(source, 1.0)], format=to, out=out, model=model, model_config=model_config, pipe=pipe,
                  overwrite=overwrite)


# ---- pivotal tuning's embeddings ----------------------------------------------------------------
def _pivotal_embeddings(loaded) -> Path | None:
    """The embeddings file of the (at most one) adapter trained with pivotal tuning, or None."""
    found = [f for f in (pivotal.embeddings_for(a.source, a.subject.token if a.subject else None)
                         for a, _, _ in loaded) if f is not None]
    if len(found) > 1:
        raise ValueError(f"{len(found)} of these adapters were trained with pivotal tuning and all name their "
                         f"subject <s0>…: export or merge at most one of them")
    return found[0] if found else None


def _with_embeddings(result: ExportResult, embeddings: Path | None, emit) -> ExportResult:
    """A pivotal adapter's embeddings file copied beside what was written (``<name>_emb.safetensors``;
    inside a diffusers folder), and the note that says it must be used with it: no checkpoint or
    adapter file carries new tokens for A1111/ComfyUI, and our merged diffusers folder neither."""
    if embeddings is None:
        return result
    written = Path(result.path)
    out = (written / f"{written.name}{pivotal.EXPORT_SUFFIX}" if written.is_dir()
           else written.with_name(written.stem + pivotal.EXPORT_SUFFIX))
    tokens, rows = pivotal.read_embeddings(embeddings)
    write_safetensors(out, rows, read_metadata(embeddings, "embeddings file")[1])
    emit("written", path=str(out))
    result.notes.append(f"pivotal tuning: prompts name the subject with {''.join(tokens)}, whose embeddings are in "
                        f"{out}; use that file beside this one (A1111/ComfyUI: put it in models/embeddings and write "
                        f"'{out.stem}' in their place; diffusers: pipe.load_textual_inversion, docs/export.md)")
    return result


def _pairs(adapters) -> list[tuple[object, float]]:
    """A source, a list of sources, or a list of (source, strength) → [(source, strength), …]."""
    if isinstance(adapters, (str, os.PathLike, Adapter)):
        adapters = [adapters]
    pairs = [(a[0], float(a[1])) if isinstance(a, tuple) else (a, 1.0) for a in adapters]
    if not pairs:
        raise ValueError("no adapter given; pass --adapter RUN_DIR_OR_FILE")
    return pairs


# ---- adapter files -------------------------------------------------------------------------------
def _export_adapter(loaded, target: Target, spec: BaseSpec, emit) -> ExportResult:
    """One adapter as a diffusers-lora or kohya file (strength baked in), with its per-tool report."""
    if len(loaded) > 1:
        raise ValueError("several adapters can only be combined into a merged checkpoint "
                         "(--format merged-diffusers or merged-single-file); adapter files hold one adapter")
    adapter, recorded, t = loaded[0]
    needs_base = t != 1.0 and adapter.method != "lora"
    base, unmeasured = report_base(spec, recorded, needed=needs_base or adapter.family is None)   # as adapter-info
    try:
        return _write_adapter(adapter, recorded, t, base, target, emit, unmeasured)
    finally:
        if base is not None:
            base.weights.close()


def _write_adapter(adapter: Adapter, recorded, t: float, base: Base | None, target: Target, emit,
                   unmeasured: str) -> ExportResult:
    if base is not None:
        check_family(adapter, base.family)
    family = adapter.family or (base.family if base is not None else None)
    if family is None:
        raise ValueError(f"{adapter.source}: the model family is unknown; pass --model")
    pipe = base.pipe if base is not None else None
    weights = base.module_weights(adapter.modules) if base is not None else None     # W0, read when asked
    if t != 1.0:
        if adapter.method != "lora" and weights is None:
            raise ValueError("a DoRA adapter at strength != 1 needs the base weights; pass --model")
        adapter = bake_strength(adapter, t, weights or {})
    if target.format == "kohya":
        path = adapter_files.write_kohya(adapter, target.path, family=family, layout=unet_layout(adapter, pipe, family),
                                         dtype=target.dtype or torch.float32, base_model=adapter.base_model or recorded,
                                         overwrite=target.overwrite, **(image_spec(pipe) if pipe is not None else {}))
    else:
        path = adapter_files.write_diffusers_lora(adapter, target.path, family=family,
                                                  module_names=module_names(pipe) if pipe is not None else None,
                                                  base_model=adapter.base_model or recorded, overwrite=target.overwrite)
    emit("written", path=str(path))
    written = adapter_files.read_adapter_file(path)
    return ExportResult(path, target.format, consumer_report(written, family, pipe, weights, unmeasured),
                        notes=base_notes(written, base))


# ---- merged checkpoints --------------------------------------------------------------------------
def _full_run(source) -> rd.AdapterSource | None:
    """The resolved ``--method full`` run folder (an ``AdapterSource`` of kind "full"), else None."""
    if not isinstance(source, (str, os.PathLike)) or not (Path(source) / rd.FULL_UNET).is_dir():
        return None
    try:
        resolved = rd.resolve_adapter(source)
    except FileNotFoundError:                       # not a run, or unfinished: read_source says which
        return None
    return resolved if resolved.kind == "full" and resolved.from_run else None


def _export_full(source: rd.AdapterSource, pairs, target: Target, spec: BaseSpec, emit) -> ExportResult:
    """A full fine-tune (its ``unet/`` and any ``text_encoder*/``) as a merged checkpoint, at
    strength t: W0 + t·(W − W0) in every fine-tuned weight, as ``dorabooth generate`` uses it."""
    run = source.path.parent
    if len(pairs) != 1:
        raise ValueError(f"{run}: a full fine-tune exports on its own; it cannot be combined with adapters")
    if target.format not in MERGED_FORMATS:
        raise ValueError(f"{run}: a full fine-tune is a whole model, not an adapter; export it with --format "
                         f"merged-single-file or merged-diffusers")
    t = pairs[0][1]
    base = spec.open(source.model or "toy", source.model_config)
    meta = _merged_metadata(base, (base.info.id if base.info else None) or spec.model or source.model or "toy",
                            [{"source": str(run), "strength": t, "method": "full"}], FULL_MERGE_DEFINITION)
    try:
        fine_tune = FineTunedSource(base.pipe, base.weights, source.path, t)      # W0 + t (W - W0), read per tensor
        emit("fine_tune_loaded", components=fine_tune.fine_tuned)
        try:        # written from the components, not patched into a single-file base: every weight may differ
            path = _write_merged(Base(base.pipe, None, base.family), MergedWeights(base.pipe, fine_tune, [], target.dtype),
                                 target, meta, emit)
        finally:
            fine_tune.close()
    finally:
        base.weights.close()
    return ExportResult(path, target.format, metadata=meta,
                        notes=[f"full fine-tune of {', '.join(fine_tune.fine_tuned)} at strength {t:g}"])


def _merged_metadata(base: Base, base_id, adapters: list[dict], merge: str) -> dict[str, str]:
    """The ``dorabooth.*`` header of a merged checkpoint: what was merged into which base, and how."""
    return {
        "dorabooth.version": __version__,
        "dorabooth.family": base.family,
        "dorabooth.base_model": str(base_id),
        "dorabooth.base_hash": base.info.hash if base.info else "",
        "dorabooth.adapters": json.dumps(adapters),
        "dorabooth.merge": merge,
    }


def _write_merged(base: Base, weights: MergedWeights, target: Target, meta, emit) -> Path:
    """The merged checkpoint, written one tensor at a time from ``weights``: from the base's own
    single file when there is one (untouched tensors copied as they are), else from the base's
    components."""
    if target.format == "merged-single-file":
        if target.path.suffix != ".safetensors":
            raise ValueError(f"--out {target.path}: a single-file checkpoint must end in .safetensors")
        if target.path.exists() and not target.overwrite:
            raise FileExistsError(f"{target.path} exists; choose another --out or pass --overwrite")
    if target.format == "merged-single-file" and base.info is not None and base.info.kind == "single_file":
        path = _single_file_from_file(base, weights, target, meta)
    elif target.format == "merged-single-file":
        path = _single_file(base, weights, target, meta)
    else:
        path = _diffusers_folder(base.pipe, weights, target, meta)
    emit("merged", modules=len(weights.merged))
    emit("written", path=str(path))
    return path


def _diffusers_folder(pipe, weights: MergedWeights, target: Target, meta) -> Path:
    """A pipeline folder as ``save_pretrained`` writes it: model_index.json, each model component's
    config and one weights file (streamed from ``weights``), tokenizers and scheduler as they are."""
    cls = type(pipe)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in pipe.components.items() if k in params}
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", False)) \
            and kwargs.get("safety_checker") is not None
    index = cls(**kwargs)                         # the same components: only its config is written
    with atomic_folder(target.path, overwrite=target.overwrite) as tmp:
        for name, component in pipe.components.items():
            if name not in params or component is None:
                continue
            if isinstance(component, torch.nn.Module):
                if name not in weights.components:
                    raise ValueError(f"{name}: the base's weights do not include this component")
                _write_component(component, name, weights, tmp / name)
            elif hasattr(component, "save_pretrained"):
                component.save_pretrained(tmp / name)
        index.save_config(tmp)
        write_json(tmp / "dorabooth_export.json",
                   {k: (json.loads(v) if k == "dorabooth.adapters" else v) for k, v in meta.items()}, indent=2)
    return target.path


def _write_component(model, name: str, weights: MergedWeights, folder: Path) -> None:
    """One model component as its library's ``save_pretrained`` lays it out: config.json and one
    ``.safetensors`` file (``{"format": "pt"}``, as diffusers and transformers write it)."""
    from diffusers import ModelMixin

    entries = [(n, weights.dtype(name, n), weights.shape(name, n)) for n in weights.names(name)]
    folder.mkdir(parents=True)
    if isinstance(model, ModelMixin):
        model.save_config(folder)
        file = "diffusion_pytorch_model.safetensors"
    else:                                         # transformers: the config records the dtype and class
        config = copy.deepcopy(model.config)
        config.dtype = str(next((d for _, d, _ in entries if d.is_floating_point), torch.float32)).split(".")[1]
        config.architectures = [type(model).__name__]
        config.save_pretrained(folder)
        file = "model.safetensors"
    write_safetensors_streaming(folder / file, entries, lambda n: weights.read(name, n), {"format": "pt"},
                                where=name)


def _single_file(base: Base, weights: MergedWeights, target: Target, meta) -> Path:
    """The original layout, every tensor assembled from the components' (q, k, v joined, transposes)."""
    mapper = Mapper(base.family, base.pipe.unet.config, base.pipe.vae.config)
    plan = mapper.plan({c: weights.names(c) for c in COMPONENTS if c in weights.components})
    entries = [(key, weights.dtype(*pieces[0][:2]),
                mapper.original_shape([(t, weights.shape(c, n)) for c, n, t in pieces])) for key, pieces in plan.items()]
    header = {**modelspec(base.family, target.path.stem, **image_spec(base.pipe)), **meta}
    return write_safetensors_streaming(
        target.path, entries, lambda key: mapper.assemble([(t, weights.read(c, n)) for c, n, t in plan[key]]),
        header, overwrite=target.overwrite)


def _single_file_from_file(base: Base, weights: MergedWeights, target: Target, meta) -> Path:
    """Merge into the base's own single file: every other tensor (and the file's own header
    keys) is kept as it was, cast to the target dtype if one is given."""
    mapper = Mapper(base.family, base.pipe.unet.config, base.pipe.vae.config)
    with SafetensorsReader(base.info.path, "checkpoint") as original:
        updates: dict[str, list] = {}
        for component, name in weights.merged:
            t = mapper.target(component, name)
            if t is None or t.key not in original:
                raise KeyError(f"{component}.{name}: the base checkpoint has no {t.key if t else 'such key'}")
            updates.setdefault(t.key, []).append((t, component, name))

        def dtype(key):
            stored = original.dtype(key)
            return target.dtype if target.dtype is not None and stored.is_floating_point else stored

        def tensor_of(key):
            value = original[key].to(dtype(key))
            if key in updates:
                value = mapper.updated(key, value, [(t, weights.read(c, n)) for t, c, n in updates[key]])
            return value

        header = {**{k: v for k, v in original.metadata.items() if not k.startswith("dorabooth.")},
                  **modelspec(base.family, target.path.stem, **image_spec(base.pipe)), **meta}
        return write_safetensors_streaming(target.path, [(k, dtype(k), original.shape(k)) for k in original],
                                           tensor_of, header, overwrite=target.overwrite)
