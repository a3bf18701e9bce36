"""Exports read the base one tensor at a time and equal the in-memory merge bit for bit.

The reference is what export did before it streamed, written out with the pure functions of
:mod:`dorabooth.merging`: the base loaded whole by diffusers (fp32), ``merge_weights`` over
``pipeline_weights``, each merged weight cast into its component's state dict, and then
``save_pretrained`` (a merged folder) or ``Mapper.to_original`` (a single file). The streamed
exports must write the same tensors, the same configs and the same files; the adapter-file
exports the same tensors and the same per-tool report (every measured error included).
"""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import dorabooth
from dorabooth import describe
from dorabooth.export import export
from dorabooth.formats.adapter_files import read_adapter_file
from dorabooth.formats.single_file import Mapper
from dorabooth.merging import merge_weights, pipeline_weights, weight_name
from export_helpers import BUILDERS, FAMILY, adapted

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", params=[("sd15", "out"), ("sdxl_wide", "in")], ids=lambda p: p[0])
def case(request, tmp_path_factory):
    kind, axis = request.param
    d = tmp_path_factory.mktemp(f"stream-{kind}")
    BUILDERS[kind]().save_pretrained(d / "base", safe_serialization=True)
    first = dorabooth.save_adapter(adapted(kind, axis), d / "first")
    second = dorabooth.save_adapter(adapted(kind, "out" if axis == "in" else "in", seed=7), d / "second")
    return kind, d, first, second


def in_memory(base, pairs, dtype):
    """(pipeline, {component: state dict}) of the merge as export computed it in memory."""
    pipe = DiffusionPipeline.from_pretrained(str(base))
    adapters = [(read_adapter_file(a), t) for a, t in pairs]
    keys = sorted({k for a, _ in adapters for k in a.modules})
    merged = merge_weights(pipeline_weights(pipe, keys), adapters)
    comps = {}
    for c in COMPONENTS:
        if getattr(pipe, c, None) is None:
            continue
        sd = dict(getattr(pipe, c).state_dict())
        for key, W in merged.items():
            component, param = weight_name(pipe, key)
            if component == c:
                sd[param] = W.to(sd[param].dtype if dtype is None else dtype)
        comps[c] = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}
    return pipe, comps


def _same(a: dict, b: dict, where: str):
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{where}: {k}"


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_merged_single_file_equals_the_in_memory_merge(case, dtype):
    kind, d, first, second = case
    pairs = [(first, 0.8), (second, 0.5)]
    out = export(pairs, format="merged-single-file", out=d / f"single-{dtype}.safetensors", model=str(d / "base"),
                 dtype=dtype).path
    pipe, comps = in_memory(d / "base", pairs, {"fp16": torch.float16, None: None}[dtype])
    reference = Mapper(FAMILY[kind], pipe.unet.config, pipe.vae.config).to_original(comps)
    _same(load_file(str(out)), reference, out.name)


def test_merged_diffusers_equals_the_in_memory_merge_saved(case, tmp_path):
    kind, d, first, second = case
    pairs = [(first, 1.0), (second, 0.3)]
    out = export(pairs, format="merged-diffusers", out=tmp_path / "streamed", model=str(d / "base"), dtype="bf16").path
    pipe, comps = in_memory(d / "base", pairs, torch.bfloat16)
    for c, sd in comps.items():
        getattr(pipe, c).load_state_dict(sd, assign=True)
    pipe.save_pretrained(tmp_path / "reference", safe_serialization=True)
    ref_files = sorted(p.relative_to(tmp_path / "reference") for p in (tmp_path / "reference").rglob("*") if p.is_file())
    got_files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != "dorabooth_export.json")
    assert got_files == ref_files
    for rel in ref_files:
        a, b = tmp_path / "reference" / rel, out / rel
        if rel.suffix == ".safetensors":
            _same(load_file(str(b)), load_file(str(a)), str(rel))
        elif rel.suffix == ".json":               # a merge is not the base: its index names no source folder
            ref = {k: v for k, v in json.loads(a.read_text()).items() if str(rel) != "model_index.json" or k != "_name_or_path"}
            assert json.loads(b.read_text()) == ref, str(rel)
        else:
            assert a.read_bytes() == b.read_bytes(), str(rel)


def test_a_single_file_base_keeps_its_other_tensors_and_merges_the_same(case):
    kind, d, first, _ = case
    from_folder = export(first, format="merged-single-file", out=d / "from-folder.safetensors", model=str(d / "base")).path
    base_file = export([(first, 0.0)], format="merged-single-file", out=d / "base.safetensors", model=str(d / "base")).path
    from_file = export(first, format="merged-single-file", out=d / "from-file.safetensors", model=str(base_file),
                       model_config=str(d / "base")).path
    _same(load_file(str(from_file)), load_file(str(from_folder)), from_file.name)


@pytest.mark.parametrize("fmt,t", [("kohya", 0.6), ("kohya", 1.0), ("diffusers-lora", 0.7)])
def test_adapter_files_and_reports_equal_the_in_memory_ones(case, fmt, t):
    """From the folder (W0 read when the report asks) and from a loaded pipeline: same file, same report."""
    kind, d, first, second = case
    source = first if fmt == "kohya" or kind == "sd15" else None
    if source is None:
        pytest.skip("a per-input magnitude cannot be written as diffusers-lora")
    name = f"{fmt}-{t}" + (".safetensors" if fmt == "kohya" else "")
    streamed = export([(source, t)], format=fmt, out=d / "s" / name, model=str(d / "base"))
    loaded = export([(source, t)], format=fmt, out=d / "m" / name, pipe=DiffusionPipeline.from_pretrained(str(d / "base")))
    path = lambda r: r.path if r.path.is_file() else r.path / "pytorch_lora_weights.safetensors"  # noqa: E731
    _same(load_file(str(path(streamed))), load_file(str(path(loaded))), name)
    assert [v.to_dict() for v in streamed.report] == [v.to_dict() for v in loaded.report]
    assert any(v.max_rel_error is not None for v in streamed.report)                # the errors were measured, with W0


def test_opening_a_base_reads_no_weight(case):
    kind, d, first, _ = case
    base = describe.BaseSpec(str(d / "base")).open()
    try:
        assert all(p.is_meta for c in COMPONENTS if getattr(base.pipe, c, None) is not None
                   for p in getattr(base.pipe, c).parameters())
        w0 = base.module_weights(read_adapter_file(first).modules)
        key = next(iter(w0))
        pipe = DiffusionPipeline.from_pretrained(str(d / "base"))
        assert torch.equal(w0[key], pipeline_weights(pipe, [key])[key])
    finally:
        base.weights.close()
