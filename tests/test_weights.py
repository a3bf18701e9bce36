"""Loading in the run's dtype, one tensor at a time (issue 11, "Memory at load").

* a skeleton (``open_pipeline``) has every model weight on the meta device: configs,
  tokenizers, scheduler and the family are there before a single weight is read;
* ``load_pipeline(dtype=…, fp32=…)`` gives each component its dtype, with values equal bit for
  bit to diffusers' own loader cast the same way;
* files in other layouts load too: sharded components, text encoders with the ``text_model.``
  level (transformers 4), old VAE attention names (through diffusers' own loader);
* the safetensors reader and the streaming writer round-trip every dtype and refuse what they
  must (a NaN, a wrong shape, a truncated file) leaving nothing behind.
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from safetensors.torch import load_file, save_file

from dorabooth import models
from dorabooth.formats.files import SafetensorsReader, write_safetensors_streaming
from dorabooth.weights import FolderWeights, is_empty
from tiny_models import make_sd15_pipeline, make_sdxl_pipeline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights") / "sdxl"
    make_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def _modules(pipe):
    return {c: getattr(pipe, c) for c in COMPONENTS if getattr(pipe, c, None) is not None}


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_a_skeleton_holds_no_weights_but_everything_else(sdxl_folder):
    pipe, base, weights = models.open_pipeline(str(sdxl_folder))
    try:
        assert base.family == "sdxl" and type(pipe).__name__ == "StableDiffusionXLPipeline"
        assert all(is_empty(m) and all(p.is_meta for p in m.parameters()) for m in _modules(pipe).values())
        assert pipe.tokenizer("a photo").input_ids and pipe.scheduler.config.num_train_timesteps == 1000
        assert set(weights.components) == set(_modules(pipe))
        assert weights.dtype("unet", "conv_in.weight") == torch.float32        # from the header, nothing read
    finally:
        weights.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_component_in_its_dtype_equal_to_diffusers_loader(sdxl_folder, dtype):
    pipe, _ = models.load_pipeline(str(sdxl_folder), dtype=dtype, fp32=("vae",))
    stock = DiffusionPipeline.from_pretrained(str(sdxl_folder))             # the files are fp32: cast once
    for c, module in _modules(pipe).items():
        assert not is_empty(module) and not module.training, c
        assert {p.dtype for p in module.parameters()} == {torch.float32 if c == "vae" else dtype}, c
        assert _equal(module, getattr(stock, c).to(torch.float32 if c == "vae" else dtype)), c
        assert all(p.requires_grad for p in module.parameters())              # as from_pretrained leaves them


def test_sharded_and_transformers_4_layouts_load(tmp_path):
    pipe = make_sd15_pipeline()
    folder = tmp_path / "sd15"
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.unet.save_pretrained(folder / "unet", max_shard_size="20KB")        # sharded, with an index file
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    te = folder / "text_encoder" / "model.safetensors"                       # the text_model. level of transformers 4
    sd = load_file(str(te))
    save_file({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in sd.items()}, str(te))
    loaded, _ = models.load_pipeline(str(folder))
    for c, module in _modules(loaded).items():
        assert _equal(module, getattr(pipe, c)), c


def test_files_in_old_layouts_load_through_their_library(tmp_path):
    """A VAE saved with the deprecated attention names (query/key/value/proj_attn) is not read
    tensor by tensor: diffusers' own loader renames them, and the values are the same."""
    pipe = make_sd15_pipeline()
    pipe.vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                             layers_per_block=1, sample_size=16).eval()
    folder = tmp_path / "old"
    pipe.save_pretrained(folder, safe_serialization=True)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(str(path)).items():
        for new, was in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, str(path))
    skeleton, _, weights = models.open_pipeline(str(folder))
    assert set(weights.problems) == {"vae"} and "has no" in weights.problems["vae"]
    models.load_weights(skeleton, weights, torch.float16)
    assert skeleton.vae.dtype == torch.float16 and _equal(skeleton.vae, pipe.vae.to(torch.float16))
    assert _equal(skeleton.unet, pipe.unet.to(torch.float16))


def test_a_component_without_its_weights_is_an_error_naming_the_file(tmp_path):
    make_sd15_pipeline().save_pretrained(tmp_path / "m", safe_serialization=True)
    path = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(path))
    del sd["conv_in.weight"]
    save_file(sd, str(path))
    pipe, _, weights = models.open_pipeline(str(tmp_path / "m"))
    assert "unet" in weights.problems and "conv_in.weight" in weights.problems["unet"]
    with pytest.raises(ValueError, match=r"m/unet: 1 weights are not in its files \(e\.g\. conv_in\.weight\).*"
                                         r"download or copy them again"):
        models.load_weights(pipe, weights, torch.float32)      # diffusers' loader would leave it on meta


def test_folder_weights_read_what_the_files_hold(sdxl_folder):
    pipe, _, weights = models.open_pipeline(str(sdxl_folder))
    assert isinstance(weights, FolderWeights)
    stored = load_file(str(sdxl_folder / "text_encoder_2" / "model.safetensors"))
    for name in weights.names("text_encoder_2")[:5]:
        assert torch.equal(weights.read("text_encoder_2", name), stored[name])
        assert weights.shape("text_encoder_2", name) == tuple(stored[name].shape)
    weights.close()


# ---- the reader and the streaming writer ------------------------------------------------------
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool)


def _tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        t = torch.randn((3, 5 + i), generator=g) * 10
        out[f"t{i}"] = t.to(dtype) if dtype != torch.bool else t > 0
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


def test_reader_reads_every_dtype_back(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"k": "v"})
    with SafetensorsReader(tmp_path / "a.safetensors") as r:
        assert r.metadata == {"k": "v"} and set(r) == set(tensors) and len(r) == len(tensors)
        for k, v in tensors.items():
            assert r.dtype(k) == v.dtype and r.shape(k) == tuple(v.shape)
            assert r[k].dtype == v.dtype and torch.equal(r[k], v)
        with pytest.raises(KeyError, match="no tensor 'absent'"):
            r["absent"]


def test_streaming_writer_writes_what_safetensors_reads(tmp_path):
    tensors = _tensors()
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    asked = []
    path = write_safetensors_streaming(tmp_path / "b.safetensors", entries,
                                       lambda k: asked.append(k) or tensors[k], {"m": "1"})
    assert sorted(asked) == sorted(tensors)                               # each tensor asked for once
    back = load_file(str(path))
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())
    with SafetensorsReader(path) as r:
        assert r.metadata == {"m": "1"}


@pytest.mark.parametrize("bad,message", [
    (lambda t: t.clone().fill_(float("nan")), "not finite"),
    (lambda t: t[:1], "the header says"),
    (lambda t: t.half(), "the header says"),
])
def test_streaming_writer_refuses_and_leaves_nothing(tmp_path, bad, message):
    good = torch.ones(2, 3)
    (tmp_path / "out.safetensors").write_bytes(b"previous")
    with pytest.raises(ValueError, match=message):
        write_safetensors_streaming(tmp_path / "out.safetensors", [("a", torch.float32, (2, 3)), ("b", torch.float32, (2, 3))],
                                    lambda k: good if k == "a" else bad(good))
    assert (tmp_path / "out.safetensors").read_bytes() == b"previous"        # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]       # no temporary file left


def test_a_truncated_file_is_named(tmp_path):
    save_file({"a": torch.ones(1000)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"t\.safetensors: truncated"):
        SafetensorsReader(tmp_path / "t.safetensors")
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["a"]["dtype"] == "F32"
