"""Loading base models: diffusers folders, hub ids (through a local hub cache), single files, errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dorabooth import models
from tiny_models import make_sd15_pipeline, make_sdxl_pipeline

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "sd15"
    make_sd15_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_folder_loads_with_family_and_hash(sd15_folder):
    pipe, base = models.load_pipeline(str(sd15_folder))
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert (base.kind, base.family, base.id) == ("folder", "sd1", str(sd15_folder))
    assert base.hash.startswith("sha256:") and base.hash == models.weights_hash(sd15_folder)


def test_sdxl_folder(tmp_path):
    make_sdxl_pipeline().save_pretrained(tmp_path / "xl", safe_serialization=True)
    _, base = models.load_pipeline(tmp_path / "xl")
    assert base.family == "sdxl"


def test_hub_id_through_the_real_hub_client(sd15_folder, tmp_path):
    """A hub id is fetched by diffusers' own download code; here from an offline local cache."""
    snap = tmp_path / "cache" / "models--tiny--sd15" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.symlink(sd15_folder, snap)
    (tmp_path / "cache" / "models--tiny--sd15" / "refs").mkdir()
    (tmp_path / "cache" / "models--tiny--sd15" / "refs" / "main").write_text("abc123")
    code = ("from dorabooth.models import load_pipeline\n"
            "pipe, base = load_pipeline('tiny/sd15'); print(base.kind, base.family, base.path)\n"
            "try:\n    load_pipeline('tiny/absent')\nexcept OSError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("hub sd1 ") and lines[0].endswith("abc123")
    assert lines[1].startswith("ERR 'tiny/absent' is not a local file or folder")


@pytest.mark.parametrize("name,message", [
    ("missing-dir/model", "no such file or folder|not a local file"),
    ("./nope", "no such file or folder"),
    ("weights.ckpt", "pickles"),
    ("notes.txt", "not a .safetensors checkpoint"),
    ("component", "one component"),
    ("empty", "no model_index.json"),
])
def test_bad_model_paths_say_what_to_pass(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "component").mkdir()
    (tmp_path / "component" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    kind = None
    try:
        kind, _ = models.resolve_model(name)
    except (ValueError, FileNotFoundError) as e:
        import re
        assert re.search(message, str(e)), str(e)
        return
    assert kind == "hub" and name == "missing-dir/model"   # org/name: a hub id (the hub client reports it)


def test_single_file_family_from_keys_and_wrong_files(tmp_path):
    cases = {
        "xl": ["conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.out.0.weight"],
        "v2": ["cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.0.weight"],
        "v1": ["cond_stage_model.transformer.text_model.final_layer_norm.weight"],
    }
    for name, keys in cases.items():
        save_file({k: torch.zeros(1) for k in keys}, str(tmp_path / f"{name}.safetensors"))
    assert models.checkpoint_family(str(tmp_path / "xl.safetensors")) == "sdxl"
    assert models.checkpoint_family(str(tmp_path / "v2.safetensors")) == "sd2"
    assert models.checkpoint_family(str(tmp_path / "v1.safetensors")) == "sd1"
    t = torch.zeros(1)
    save_file({"unet.down_blocks.0.attn1.to_q.lora_A.weight": t}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="adapter, not a base model; pass it as --adapter"):
        models.load_pipeline(str(tmp_path / "lora.safetensors"))
    save_file({"foo.bar": t}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="do not look like an SD"):
        models.load_pipeline(str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"broken\.safetensors: empty or truncated \(7 bytes\); not a \.safetensors"):
        models.load_pipeline(str(tmp_path / "broken.safetensors"))


def test_refuses_pickled_weights_in_a_folder(tmp_path, sd15_folder):
    import shutil
    folder = tmp_path / "pickled"
    shutil.copytree(sd15_folder, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save({}, folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="never pickled .bin"):
        models.load_pipeline(str(folder))


def test_toy_default_resolves_relative_to_the_package(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    if not (models.TOY_MODEL / "model_index.json").is_file():
        with pytest.raises(FileNotFoundError, match="toy build"):
            models.resolve_model(None)
        return
    assert models.resolve_model(None) == ("folder", str(models.TOY_MODEL))
    assert models.resolve_model("toy") == ("folder", str(models.TOY_MODEL))


def test_single_file_with_its_config_folder(sd15_folder, tmp_path):
    """An original-layout .safetensors (written with formats.single_file) loads offline with its
    configs from --model-config, its weights read one tensor at a time through our key map."""
    from dorabooth.formats.single_file import Mapper

    pipe = make_sd15_pipeline()
    mapper = Mapper("sd1", pipe.unet.config, pipe.vae.config)
    original = mapper.to_original({c: getattr(pipe, c).state_dict() for c in ("unet", "vae", "text_encoder")})
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    loaded, base = models.load_pipeline(str(path), single_file_config=str(sd15_folder))
    assert (base.kind, base.family, type(loaded).__name__) == ("single_file", "sd1", "StableDiffusionPipeline")
    for c in ("unet", "vae", "text_encoder"):
        ref, got = getattr(pipe, c).state_dict(), getattr(loaded, c).state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), c


def test_sdxl_single_file_with_equal_width_encoders_loads_through_our_key_map(tmp_path):
    """diffusers' from_single_file tells SDXL's two text encoders apart by width and leaves one
    unloaded when they are equal (the toy model, this tiny one: 32/32); load_pipeline reads
    every weight through the exporter's own key map, given the model's diffusers folder. When
    neither can load the file, the error says what each one lacked."""
    from dorabooth.formats.single_file import Mapper

    pipe = make_sdxl_pipeline()
    assert pipe.text_encoder.config.hidden_size == pipe.text_encoder_2.config.hidden_size
    folder = tmp_path / "sdxl"
    pipe.save_pretrained(folder, safe_serialization=True)
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    original = Mapper("sdxl", pipe.unet.config, pipe.vae.config).to_original(
        {c: getattr(pipe, c).state_dict() for c in parts})
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    loaded, base = models.load_pipeline(str(path), single_file_config=str(folder))
    assert (base.kind, base.family, type(loaded).__name__) == ("single_file", "sdxl", "StableDiffusionXLPipeline")
    for c in parts:
        ref, got = getattr(pipe, c).state_dict(), getattr(loaded, c).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), c
    images = loaded(prompt="a photo", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    del original["conditioner.embedders.1.model.text_projection"]               # a weight missing: an error
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    with pytest.raises(OSError, match="key map: .* has no conditioner.embedders.1.model.text_projection.*"
                                      "from_single_file left text_encoder_2 without weights"):
        models.load_pipeline(str(path), single_file_config=str(folder))
