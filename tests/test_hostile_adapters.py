"""Hostile adapter files (issue 13 §3, §10): a real trained adapter (tests/analysis_runs.py) with one
thing broken — NaN, inf, a ×1e30 or ×1e4 magnitude, an int32 tensor, a module removed, a module the
base does not have — fed to every path that loads an adapter: ``generate`` (merged and
``--no-merge``), ``adapter-info``, ``export``, ``convert``, ``analyze`` and the library's
:class:`~dorabooth.generate.Session` (what the app uses). Each is refused with one ``error:`` line
naming the file and the tensor, exit code 1, no traceback and nothing written."""

import re
import shutil

import pytest
import torch
from analysis_runs import tiny_run
from safetensors import safe_open
from safetensors.torch import save_file

from dorabooth import cli
from dorabooth.formats import read_adapter
from dorabooth.generate import Session

MODULE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
MAGNITUDE = f"{MODULE}.lora_magnitude_vector"
DOWN = f"{MODULE}.lora.down.weight"                 # the diffusers layout of an attention projection
DAMAGED = "the file is damaged or its training diverged — use an earlier checkpoint"


def _scaled(factor):
    return lambda sd: sd.update({MAGNITUDE: sd[MAGNITUDE] * factor})


def _renamed(sd):
    """The module moved to a transformer block the tiny SDXL UNet does not have."""
    for key in [k for k in sd if k.startswith(MODULE + ".")]:
        sd[key.replace("transformer_blocks.0", "transformer_blocks.7")] = sd.pop(key)


EDITS = {   # name: (what is done to the tensors, the error after "error: FILE: ", as a regex)
    "nan": (_scaled(float("nan")), re.escape(f"tensor {MAGNITUDE!r} has NaN values; {DAMAGED}")),
    "inf": (_scaled(float("inf")), re.escape(f"tensor {MAGNITUDE!r} has infinite values; {DAMAGED}")),
    "x1e30": (_scaled(1e30), re.escape(f"tensor {MAGNITUDE!r} has values up to ") + r"\d\.\d+e\+29"
              + re.escape(f", beyond the fp16 range (65504) no working adapter leaves; {DAMAGED}")),
    "x1e4": (_scaled(1e4), re.escape(f"tensor {MAGNITUDE!r} is up to ") + r"[\d.e+]+"
             + re.escape(f"× the base weight's norms (training moves them by a few percent; at most 1000× "
                         f"loads); {DAMAGED}")),
    "int32": (lambda sd: sd.update({DOWN: (sd[DOWN] * 100).to(torch.int32)}),
              re.escape(f"tensor {DOWN!r} is int32; adapter weights are floating point (fp16, bf16 or fp32): "
                        f"the file is damaged or not an adapter")),
    "missing": (lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith(MODULE + ".")]],
                re.escape(f"its recorded unet targets (attn) select 64 modules but the file has tensors for 63; "
                          f"missing {MODULE}; the file is incomplete (damaged or cut): use the complete file or an "
                          f"earlier checkpoint")),
    "unknown": (_renamed, re.escape(f"the keys {MODULE.replace('blocks.0', 'blocks.7')}.… are for a module this "
                                    f"sdxl model's UNet2DConditionModel does not have; the adapter was trained for "
                                    f"another model or model family: load it onto that base")),
}
READ_TIME = ("nan", "inf", "x1e30", "int32")       # refused from the file alone (adapter-info, export, analyze)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory, "dora")


@pytest.fixture(scope="module")
def hostile(run, tmp_path_factory):
    """hostile(name) → the run's adapter with ``EDITS[name]`` applied, as an adapter file."""
    folder = tmp_path_factory.mktemp("hostile")
    with safe_open(str(run / "adapter.safetensors"), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    assert MAGNITUDE in tensors and DOWN in tensors

    def make(name):
        path = folder / f"{name}.safetensors"
        if not path.exists():
            sd = dict(tensors)
            EDITS[name][0](sd)
            save_file(sd, str(path), metadata=meta)
        return path
    return make


def _refused(capsys, argv, path, name, *, code=1):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(f"error: {re.escape(str(path))}: {EDITS[name][1]}", err.strip()), err


def _generate(run, path, out, *extra):
    return ["generate", "--model", str(run.parent / "model-sdxl"), "--adapter", str(path), "--prompt", "a sks dog",
            "--out", str(out), "--steps", "1", *extra]


@pytest.mark.parametrize("name", list(EDITS))
def test_generate_refuses_hostile_adapters(run, hostile, name, tmp_path, capsys):
    path = hostile(name)
    _refused(capsys, _generate(run, path, tmp_path / "images"), path, name)
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("name", ["nan", "x1e30", "x1e4"])
def test_generate_without_merging_refuses_them_too(run, hostile, name, tmp_path, capsys):
    """What used to exit 0 with black images: the layers never merge, so nothing else would notice."""
    path = hostile(name)
    _refused(capsys, _generate(run, path, tmp_path / "images", "--no-merge"), path, name)
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("name", READ_TIME)
def test_adapter_info_export_and_convert_refuse_a_damaged_file(hostile, name, tmp_path, capsys):
    path = hostile(name)
    _refused(capsys, ["adapter-info", str(path)], path, name)       # a damaged file is not described as normal
    _refused(capsys, ["export", "--adapter", str(path), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")],
             path, name)
    _refused(capsys, ["convert", str(path), "--to", "kohya", "--out", str(tmp_path / "c.safetensors")], path, name)
    assert list(tmp_path.iterdir()) == []


def test_analyze_refuses_a_run_whose_adapter_is_damaged(run, hostile, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("samples"))
    shutil.copy(hostile("nan"), copy / "checkpoints" / "step-2" / "adapter.safetensors")
    _refused(capsys, ["analyze", str(copy), "--out", str(tmp_path / "analysis")],
             copy / "checkpoints" / "step-2" / "adapter.safetensors", "nan")


def test_the_library_session_refuses_them_and_keeps_its_state(run, hostile):
    """The app loads adapters through Session: the same refusals, and the session is left as it was."""
    session = Session(str(run.parent / "model-sdxl"))
    session.use_adapter(run)
    for name in ("nan", "missing"):
        with pytest.raises(ValueError, match=EDITS[name][1]):
            session.use_adapter(hostile(name))
        assert session.adapter is None                    # the failed load left no adapter attached
    with pytest.raises(ValueError, match=EDITS["x1e30"][1]):
        read_adapter(hostile("x1e30"))                    # the formats API's own reader too


def test_a_merge_that_overflows_names_the_file_and_module(run):
    """A sound adapter at an absurd strength overflows fp16 when merged: the error names the file, the
    module and its tensors, and the session keeps its previous strength (no inf weights left)."""
    session = Session(str(run.parent / "model-sdxl"), dtype=torch.float16, device="cpu")
    session.use_adapter(run)
    with pytest.raises(ValueError) as e:
        session.set_strength(1e9)
    assert re.fullmatch(re.escape(f"{run / 'adapter.safetensors'}: ") + r"(unet|text_encoder|text_encoder_2)\.\S+ "
                        r"\(lora_A, lora_B, lora_magnitude_vector\): the merged weight at strength 1e\+09 is not finite \(NaN/inf\) "
                        r"in float16: lower the strength, generate in fp32/bf16, or the adapter is broken",
                        str(e.value)), str(e.value)
    assert session.strength == 1.0
    assert all(torch.isfinite(p).all() for p in session.pipe.unet.parameters())
