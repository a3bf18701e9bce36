"""Generation: seeded determinism, strength 0 = base model, merged = live, no base reloads,
PNG metadata, run folders bringing their base model, full fine-tunes, clear errors."""

import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dorabooth
from dorabooth.config import TrainConfig
from dorabooth.generate import Session, generate
from dorabooth.rundir import resolve_adapter
from dorabooth.train import train
from tiny_runs import MAKERS, make_subject, quick, save_model

ARGS = dict(steps=3, guidance=3.0)
gen_mod = importlib.import_module("dorabooth.generate")   # the module (dorabooth.generate is the function)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("generate")


def random_adapter(kind, path, seed=0, text_encoders=False):
    """An adapter with clearly non-zero updates (B random, m perturbed), written with save_adapter."""
    pipe = MAKERS[kind]()
    torch.manual_seed(seed)
    dorabooth.attach(pipe, rank=4, text_encoders=text_encoders)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in name:
                p.mul_(1.2)
    dorabooth.save_adapter(pipe, path)
    return path


@pytest.fixture(scope="module")
def sdxl_model(root):
    return str(save_model("sdxl", root / "model-sdxl"))


@pytest.fixture(scope="module")
def sdxl_session(sdxl_model):
    return Session(sdxl_model)


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def test_same_seed_same_images_and_seeds_are_per_image(sdxl_session):
    s = sdxl_session
    s.use_adapter(None)
    a = s.generate("a photo of dog", n=3, seed=5, **ARGS)
    assert np.array_equal(pixels(a), pixels(s.generate("a photo of dog", n=3, seed=5, **ARGS)))
    # each image has its own generator: other batching gives the same images up to float rounding
    b = s.generate("a photo of dog", n=3, seed=5, batch_size=1, **ARGS)
    assert np.abs(pixels(a) - pixels(b)).max() <= 2
    c = s.generate("a photo of dog", seeds=[6], **ARGS)
    assert np.abs(pixels(a[1:2]) - pixels(c)).max() <= 2                 # image i uses seed + i
    assert np.abs(pixels(a[:1]) - pixels(c)).max() > 10


def test_strength_zero_is_exactly_the_base_model(sdxl_session, root):
    s = sdxl_session
    adapter = random_adapter("sdxl", root / "a.safetensors", text_encoders=True)
    s.use_adapter(None)
    base = pixels(s.generate("a photo of sks dog", n=2, seed=1, **ARGS))
    for merge in (True, False):
        s.merge = merge
        s.use_adapter(adapter)
        s.set_strength(0.0)
        assert np.array_equal(pixels(s.generate("a photo of sks dog", n=2, seed=1, **ARGS)), base)
        s.set_strength(1.0)
        adapted = pixels(s.generate("a photo of sks dog", n=2, seed=1, **ARGS))
        assert np.abs(adapted - base).max() > 10
        if merge:
            merged = adapted
        else:
            assert np.abs(adapted - merged).max() <= 2                  # merged ≈ live, to rounding
    s.merge = True
    s.use_adapter(None)
    assert np.array_equal(pixels(s.generate("a photo of sks dog", n=2, seed=1, **ARGS)), base)  # W0 restored


def test_switching_adapters_and_strengths_never_reloads_the_base(sdxl_model, root, tmp_path, monkeypatch):
    calls = []
    real = gen_mod.load_pipeline
    monkeypatch.setattr(gen_mod, "load_pipeline", lambda *a, **k: calls.append(a) or real(*a, **k))
    a = random_adapter("sdxl", root / "s1.safetensors", seed=1)
    b = random_adapter("sdxl", root / "s2.safetensors", seed=2)
    session = Session(sdxl_model)
    first = generate("a photo of sks dog", out=tmp_path, adapter=a, strength=[0.0, 0.5, 1.0], session=session,
                     **ARGS)
    second = generate("a photo of sks dog", out=tmp_path, adapter=b, session=session, **ARGS)
    assert len(calls) == 1 and len(first) == 3 and len(second) == 1
    images = pixels([Image.open(p) for p in [*first, *second]])
    assert len({im.tobytes() for im in images}) == 4                     # every strength/adapter differs


def test_png_metadata_and_file_names(sdxl_session, root, tmp_path):
    adapter = random_adapter("sdxl", root / "m.safetensors")
    paths = generate("a photo of sks dog", out=tmp_path, adapter=adapter, negative="blurry", n=2, seed=7,
                     strength=0.8, session=sdxl_session, **ARGS)
    assert [p.name for p in paths] == ["0000-s7.png", "0001-s8.png"]
    text = Image.open(paths[1]).text
    params = json.loads(text["dorabooth"])
    assert (params["seed"], params["strength"], params["negative_prompt"], params["steps"]) == (8, 0.8, "blurry", 3)
    assert params["merged"] is True and params["family"] == "sdxl" and params["base_model_hash"].startswith("sha")
    assert text["parameters"].startswith("a photo of sks dog\nNegative prompt: blurry\nSteps: 3,")
    assert "Seed: 8" in text["parameters"] and "m.safetensors:0.8" in text["parameters"]
    again = generate("a photo of sks dog", out=tmp_path, n=1, seed=7, session=sdxl_session, **ARGS)
    assert again[0].name == "0002-s7.png"                                 # never overwrites


def test_run_folder_brings_its_base_model(root, tmp_path):
    model = str(save_model("sd15", root / "model-sd15"))
    subject = make_subject(root / "subject")
    run = tmp_path / "run"
    train(TrainConfig(images=str(subject), out=str(run), model=model, **quick(prior_preservation=False, lr=1e-2)))
    source = resolve_adapter(run)
    assert (source.kind, source.model, source.path.name) == ("adapter", model, "adapter.safetensors")
    paths = generate("a photo of sks dog", out=tmp_path / "images", adapter=run, n=1, **ARGS)
    assert json.loads(Image.open(paths[0]).text["dorabooth"])["base_model"] == model
    ckpt = resolve_adapter(run / "checkpoints" / "step-1" / "adapter.safetensors")
    assert ckpt.kind == "adapter"


def test_full_fine_tune_strengths(root, tmp_path):
    model = str(save_model("sd15", root / "model-sd15"))
    subject = make_subject(root / "subject")
    run = tmp_path / "full"
    train(TrainConfig(images=str(subject), out=str(run), model=model, method="full",
                      **quick(prior_preservation=False, lr=1e-2, train_text_encoders=True)))
    session = Session(model)
    base = pixels(session.generate("a photo of sks dog", seed=2, **ARGS))
    te0 = {k: v.clone() for k, v in session.pipe.text_encoder.state_dict().items()}
    session.use_adapter(run)
    assert session.adapter.kind == "full"
    session.set_strength(0.0)
    assert np.array_equal(pixels(session.generate("a photo of sks dog", seed=2, **ARGS)), base)
    session.set_strength(1.0)
    assert not np.array_equal(pixels(session.generate("a photo of sks dog", seed=2, **ARGS)), base)
    tuned = load_file(str(run / "text_encoder" / "model.safetensors"))    # the fine-tuned encoder is in use
    live = dict(session.pipe.text_encoder.named_parameters())
    assert all(torch.equal(live[k], v) for k, v in tuned.items())
    session.use_adapter(None)
    assert np.array_equal(pixels(session.generate("a photo of sks dog", seed=2, **ARGS)), base)
    assert all(torch.equal(v, te0[k]) for k, v in session.pipe.text_encoder.state_dict().items())


def test_errors(root, sdxl_session, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder, adapter folder or .safetensors"):
        resolve_adapter(tmp_path / "nothing")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="only .safetensors"):
        resolve_adapter(tmp_path / "w.ckpt")
    sd15_adapter = random_adapter("sd15", root / "sd15.safetensors")
    with pytest.raises(ValueError, match="sd1 model but the pipeline is sdxl"):
        sdxl_session.use_adapter(sd15_adapter)
    with pytest.raises(ValueError, match="strength -1"):
        sdxl_session.set_strength(-1)
    with pytest.raises(ValueError, match="multiples of"):
        sdxl_session.generate("x", width=18, **ARGS)
