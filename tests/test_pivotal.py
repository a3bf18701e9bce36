"""Pivotal tuning (issue 14 #2): new tokens <s0>… per text encoder, their embedding rows trained
beside the adapter; only those rows change; resumed bit-identically; saved in the run and its
checkpoints as an A1111/ComfyUI embeddings file that stock diffusers' ``load_textual_inversion``
loads to the same vectors and text-encoder outputs; generate/adapter-info/export use it."""


import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import MAKERS, make_subject, quick, save_model, straight_and_resumed

import dorabooth
from dorabooth import pivotal
from dorabooth.config import TrainConfig
from dorabooth.families import detect_family, encode_prompts
from dorabooth.optim import make_optimizer
from dorabooth.train import train

KEYS = {"sd15": ["clip_l"], "sdxl": ["clip_l", "clip_g"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pivotal")
    make_subject(root / "subject")
    for kind in ("sd15", "sdxl"):
        save_model(kind, root / kind)
    return root


def config(root, out, kind="sd15", **kw):
    return TrainConfig(images=str(root / "subject"), out=str(out), model=str(root / kind),
                       **quick(**{"prior_preservation": False, "steps": 5, "checkpoint_every": 2,
                                  "keep_checkpoints": 5, "pivotal_tokens": 2, **kw}))


@pytest.fixture(scope="module")
def runs(root):
    """A finished 5-step pivotal run per tiny model (frozen text encoders: the rows alone train there);
    SD 1.5 starts its rows from the class noun, SDXL from noise."""
    return {kind: train(config(root, root / f"run-{kind}", kind, pivotal_init="class" if kind == "sd15" else "random")).run_dir
            for kind in ("sd15", "sdxl")}


# ---- the config -----------------------------------------------------------------------------------
def test_config_names_the_subject_with_the_new_tokens(tmp_path):
    c = TrainConfig(images="x", class_noun="dog", out="o", pivotal_tokens=3, instance_prompt="a photo of sks dog",
                    validation_prompts=("sks dog on a beach",))
    assert c.identifier == "<s0><s1><s2>"
    filled = c.with_defaults({"rank": 4, "resolution": 64, "steps": 2, "lr": 1e-3, "num_class_images": 1,
                              "class_image_steps": 1, "train_text_encoders": False})
    assert filled.instance_prompt == "a photo of <s0><s1><s2> dog"
    assert filled.validation_prompts == ("<s0><s1><s2> dog on a beach",)
    assert filled.pivotal_lr == filled.text_encoder_lr == 1e-3
    assert TrainConfig(images="x", class_noun="dog", out="o").identifier == "sks"
    lacking = TrainConfig(images="x", class_noun="dog", out="o", pivotal_tokens=2, instance_prompt="a photo of a dog")
    with pytest.raises(ValueError, match="write 'sks'"):
        lacking.with_defaults({"rank": 4, "resolution": 64, "steps": 2, "lr": 1e-3, "num_class_images": 1,
                               "class_image_steps": 1, "train_text_encoders": False})


def test_the_familys_default_turns_it_on_and_a_full_fine_tune_off():
    """The toy model's recipe names the subject with 2 new tokens (docs/robustness.md); SD/SDXL's do
    not; a full fine-tune has no adapter to tune them beside; an explicit --pivotal 0 wins."""
    from dorabooth.families import TRAIN_PRESETS

    toy = {k: v for k, v in TRAIN_PRESETS["toy"].items()} | {"resolution": 32}
    sd = TRAIN_PRESETS["sd1"]
    base = dict(images="x", class_noun="star", out="o", token="zwx")
    c = TrainConfig(**base).with_defaults(toy)
    assert (c.pivotal_tokens, c.identifier, c.instance_prompt) == (2, "<s0><s1>", "a <s0><s1> star")
    assert c.pivotal_lr == c.text_encoder_lr == c.lr
    assert TrainConfig(**base).with_defaults(sd).pivotal_tokens == 0
    assert TrainConfig(**base, method="full").with_defaults(toy).pivotal_tokens == 0
    off = TrainConfig(**base, pivotal_tokens=0).with_defaults(toy)
    assert (off.pivotal_tokens, off.instance_prompt) == (0, "a zwx star")


def test_with_pivotal_tuning_the_typed_token_changes_nothing_trained(root, tmp_path):
    """The new tokens replace the typed one in every prompt: runs that differ only in --token train
    the same adapter and rows bit for bit (bench/robustness.py trains one of them per subject and seed)."""
    made = [train(config(root, tmp_path / token, token=token, steps=3, checkpoint_every=0)).run_dir
            for token in ("sks", "brelk")]
    for name in ("adapter.safetensors", pivotal.EMBEDDINGS):
        a, b = (load_file(run / name) for run in made)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("fields, message", [
    ({"pivotal_tokens": 17}, "1–16"), ({"pivotal_tokens": -1}, "1–16"),
    ({"pivotal_tokens": 2, "method": "full"}, "--method dora, lora or dvora"),
    ({"pivotal_tokens": 2, "pivotal_init": "zeros"}, "class, random"),
    ({"pivotal_tokens": 2, "pivotal_stop": 0.0}, "(0, 1]"), ({"pivotal_tokens": 2, "pivotal_lr": 2.0}, "pivotal_lr"),
    ({"pivotal_tokens": 2, "optimizer": "prodigy", "lr": 1.0, "pivotal_lr": 0.5}, "one learning rate"),
])
def test_config_refuses_what_cannot_run(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        TrainConfig(images="x", class_noun="dog", out="o", **fields)


# ---- training: only the new rows change -------------------------------------------------------------
@pytest.mark.parametrize("init", ["class", "random"])
def test_only_the_new_rows_train(init):
    pipe = MAKERS["sdxl"]()
    dorabooth.attach(pipe, method="dora", rank=2, text_encoders=True)
    before = {n: getattr(pipe, n).get_input_embeddings().weight.detach().clone() for n in ("text_encoder", "text_encoder_2")}
    tokens = pivotal.attach_trainable(pipe, 2, init, "dog", seed=0)
    start = pivotal.current_rows(pipe)
    if init == "class":                     # every row the mean of "dog"'s token embeddings
        ids = pipe.tokenizer("dog", add_special_tokens=False).input_ids
        assert torch.equal(start["clip_l"][1], before["text_encoder"][ids].float().mean(0))
    params = {f"{c}.{n}": p for c in ("unet", "text_encoder", "text_encoder_2")
              for n, p in getattr(pipe, c).named_parameters() if p.requires_grad}
    rows = [n for n in params if n.endswith(".pivotal_rows")]
    assert len(rows) == 2 and all(not n.endswith("token_embedding.weight") for n in params)
    cfg = TrainConfig(images="x", class_noun="dog", out="o", lr=1e-2, text_encoder_lr=1e-2, steps=3, pivotal_tokens=2)
    optimizer = make_optimizer(params, cfg)
    for _ in range(3):
        embeds, pooled = encode_prompts(detect_family(pipe), pipe, [f"a {''.join(tokens)} dog"])
        (embeds.square().mean() + pooled.square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, weight in before.items():     # the whole matrix as it was: old rows and the placeholders' values
        now = getattr(pipe, name).get_input_embeddings().weight
        assert torch.equal(now[: weight.shape[0]], weight)
    after = pivotal.current_rows(pipe)
    assert all(not torch.equal(after[k], start[k]) for k in ("clip_l", "clip_g"))
    dorabooth.detach(pipe)                   # the tokenizers and matrices as they were
    assert "<s0>" not in pipe.tokenizer.get_vocab()
    assert all(torch.equal(getattr(pipe, n).get_input_embeddings().weight, w) for n, w in before.items())


def test_pivotal_stop_freezes_the_rows_after_the_fraction(root, tmp_path):
    cfg = config(root, tmp_path / "stop", pivotal_stop=0.4)          # rows train for ceil(0.4 · 5) = 2 steps
    train(cfg)
    rows = {s: load_file(str(tmp_path / "stop" / "checkpoints" / f"step-{s}" / "embeddings.safetensors"))
            for s in (2, 4)}
    final = load_file(str(tmp_path / "stop" / "embeddings.safetensors"))
    assert torch.equal(rows[2]["clip_l"], final["clip_l"]) and torch.equal(rows[4]["clip_l"], final["clip_l"])
    assert "pivotal_stop" in TrainConfig.from_dict(cfg.to_dict()).to_dict()


@pytest.mark.parametrize("method, te", [("dora", False), ("lora", True), ("dvora", True)])
def test_resume_gives_bit_identical_embeddings_and_adapter(root, tmp_path, method, te):
    kw = {"method": method, "train_text_encoders": te, "pivotal_init": "random", "pivotal_stop": 0.8}
    if method == "dvora":
        kw["rank"] = 4
    straight_and_resumed(lambda out: config(root, out, **kw), tmp_path / "a", tmp_path / "b")
    for name in ("adapter.safetensors", "embeddings.safetensors"):
        a, b = (load_file(str(tmp_path / r / name)) for r in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    init = load_file(str(tmp_path / "a" / "checkpoints" / "step-2" / "embeddings.safetensors"))
    assert not torch.equal(init["clip_l"], load_file(str(tmp_path / "a" / "embeddings.safetensors"))["clip_l"])


# ---- the files: A1111/ComfyUI layout, stock diffusers loads them --------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_stock_load_textual_inversion_gives_our_vectors_and_outputs(root, runs, kind):
    from diffusers import DiffusionPipeline

    run = runs[kind]
    rows = load_file(str(run / "embeddings.safetensors"))
    assert sorted(rows) == sorted(KEYS[kind]) and all(v.shape == (2, 32) for v in rows.values())
    assert all(v.shape[1] == 32 for v in load_file(str(run / "checkpoints" / "step-2" / "embeddings.safetensors")).values())
    tokens = ["<s0>", "<s1>"]
    stock = DiffusionPipeline.from_pretrained(str(root / kind))
    for key, tok, te in zip(KEYS[kind], ("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2")):
        stock.load_textual_inversion(rows[key], token=tokens, text_encoder=getattr(stock, te),
                                     tokenizer=getattr(stock, tok))
    ours = DiffusionPipeline.from_pretrained(str(root / kind))
    dorabooth.load_adapter(ours, run / "adapter.safetensors")
    prompt = TrainConfig.from_dict(json.loads((run / "config.json").read_text())["config"]).instance_prompt
    assert "<s0><s1>" in prompt
    family = detect_family(ours)
    for key, tok, te in zip(KEYS[kind], ("tokenizer", "tokenizer_2"), ("text_encoder", "text_encoder_2")):
        ids = getattr(stock, tok).convert_tokens_to_ids(tokens)
        assert ids == getattr(ours, tok).convert_tokens_to_ids(tokens)
        assert torch.equal(getattr(stock, te).get_input_embeddings().weight[ids], rows[key])
        assert torch.equal(getattr(ours, te).get_input_embeddings().weight[ids], rows[key])
    with torch.no_grad():
        a, b = (encode_prompts(family, p, [prompt]) for p in (stock, ours))
    assert torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


def test_generate_uses_the_tokens_and_a_missing_file_is_named(root, runs, tmp_path):
    from dorabooth.generate import Session

    session = Session(str(root / "sd15"), device="cpu", dtype=torch.float32)
    vocab = len(session.pipe.tokenizer)
    session.use_adapter(runs["sd15"])
    assert session.pipe.tokenizer.tokenize("a <s0><s1> dog") == ["a</w>", "<s0>", "<s1>", "dog</w>"]
    images = session.generate("a <s0><s1> dog", steps=2, seed=1)
    assert len(images) == 1 and images[0].info["dorabooth"]
    typed = session.generate("a sks dog", steps=2, seed=1)            # the run's own token names the subject too
    assert json.loads(typed[0].info["dorabooth"])["prompt"] == "a <s0><s1> dog"
    assert list(typed[0].getdata()) == list(images[0].getdata())
    assert session.sampling("sks, a sksdog").prompt == "<s0><s1>, a sksdog"   # the word only
    session.set_strength(0.0)                                           # the base model: the typed word as it is
    assert session.sampling("a sks dog").prompt == "a sks dog"
    session.set_strength(1.0)
    step = sorted((runs["sd15"] / "checkpoints").iterdir())[0]
    session.use_adapter(step)                                           # a checkpoint of the run: the same
    assert session.sampling("a sks dog").prompt == "a <s0><s1> dog"
    session.use_adapter(None)
    assert len(session.pipe.tokenizer) == vocab
    assert session.pipe.text_encoder.get_input_embeddings().num_embeddings == vocab
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "adapter.safetensors").write_bytes((runs["sd15"] / "adapter.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="trained with pivotal tuning.*embeddings file is not beside"):
        session.use_adapter(lone / "adapter.safetensors")
    assert len(session.pipe.tokenizer) == vocab


def test_adapter_info_and_export_carry_the_embeddings(root, runs, tmp_path):
    from dorabooth.describe import adapter_info
    from dorabooth.export import export

    info = adapter_info(runs["sdxl"])
    assert info["pivotal"]["tokens"] == ["<s0>", "<s1>"] and info["pivotal"]["rows"] == {"clip_l": [2, 32],
                                                                                        "clip_g": [2, 32]}
    for fmt, out in (("kohya", tmp_path / "dog.safetensors"), ("merged-single-file", tmp_path / "merged.safetensors")):
        result = export(runs["sdxl"], format=fmt, out=out, model=str(root / "sdxl"))
        emb = out.with_name(out.stem + "_emb.safetensors")
        assert any("pivotal tuning" in n and str(emb) in n for n in result.notes)
        copied, original = load_file(str(emb)), load_file(str(runs["sdxl"] / "embeddings.safetensors"))
        assert all(torch.equal(copied[k], original[k]) for k in original)
    pipe = MAKERS["sdxl"]()                   # the exported kohya file finds its _emb file beside it
    dorabooth.load_adapter(pipe, tmp_path / "dog.safetensors")
    assert pipe.tokenizer_2.convert_tokens_to_ids("<s1>") == len(pipe.tokenizer_2) - 1


# ---- ComfyUI's own tokenizers, when a checkout is at hand ----------------------------------------
COMFYUI = os.environ.get("DORABOOTH_COMFYUI")


@pytest.mark.skipif(not COMFYUI, reason="set DORABOOTH_COMFYUI to a ComfyUI checkout (a PYTHONPATH) and "
                                        "DORABOOTH_COMFYUI_PYTHON to a Python that imports it")
def test_comfyuis_own_tokenizers_load_the_exported_embeddings(root, runs, tmp_path):
    """ComfyUI's SD1Tokenizer / SDXLTokenizer (tests/compat/comfyui_embeddings.py) read the exported
    ``<name>_emb.safetensors`` from their embeddings folder where the prompt writes
    ``embedding:<name>_emb`` and put exactly our N vectors there, per encoder by its key."""
    from dorabooth.export import export

    cases, expected = {}, {}
    for kind in ("sd15", "sdxl"):
        folder = tmp_path / kind
        folder.mkdir()
        export(runs[kind], format="kohya", out=folder / "dog.safetensors", model=str(root / kind))
        rows = load_file(str(folder / "dog_emb.safetensors"))
        cases[kind] = {"family": kind, "folder": str(folder), "prompt": "a photo of embedding:dog_emb dog"}
        expected[kind] = {k[-1]: rows[k] for k in KEYS[kind]}                 # clip_l → "l", clip_g → "g"
    (tmp_path / "embeddings.json").write_text(json.dumps(cases))
    harness = Path(__file__).parent / "compat" / "comfyui_embeddings.py"
    python = os.environ.get("DORABOOTH_COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, str(harness), str(tmp_path)], env={**os.environ, "PYTHONPATH": COMFYUI},
                         cwd=COMFYUI.split(os.pathsep)[0], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for kind, encoders in expected.items():
        assert sorted(result[kind]) == sorted(encoders), kind
        for encoder, rows in encoders.items():
            got = result[kind][encoder]
            assert got["positions"] == [4, 5], (kind, encoder)                # <start> a photo of [v0 v1] dog
            assert torch.equal(torch.tensor(got["vectors"], dtype=rows.dtype), rows), (kind, encoder)


# ---- A1111's own embeddings loader, when a webui checkout is at hand ----------------------------------
A1111 = os.environ.get("DORABOOTH_A1111")


@pytest.mark.skipif(not A1111, reason="set DORABOOTH_A1111 to an A1111 / Forge webui checkout")
def test_a1111s_own_loader_loads_the_exported_embeddings(root, runs, tmp_path):
    """A1111's ``EmbeddingDatabase`` (its textual_inversion.py, run by tests/compat/a1111_embeddings.py)
    reads the exported ``<name>_emb.safetensors`` from its embeddings folder as an embedding of
    the model's width (SD 1.x by its one tensor, SDXL by ``clip_l`` + ``clip_g``), skips nothing,
    reports no error, keeps exactly our N rows per key, and finds it where the prompt writes
    ``<name>_emb``."""
    from transformers import CLIPTokenizer

    from dorabooth.export import export

    cases, expected = {}, {}
    for kind in ("sd15", "sdxl"):
        folder = tmp_path / kind
        folder.mkdir()
        export(runs[kind], format="kohya", out=tmp_path / f"{kind}.safetensors", model=str(root / kind))
        (tmp_path / f"{kind}_emb.safetensors").rename(folder / "dog_emb.safetensors")   # only the embeddings there
        encoders = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
        width = sum(json.loads((root / kind / e / "config.json").read_text())["hidden_size"] for e in encoders)
        cases[kind] = {"folder": str(folder), "width": width, "tokenizer": str(root / kind / "tokenizer"),
                       "prompt": "a photo of dog_emb dog"}
        expected[kind] = load_file(str(folder / "dog_emb.safetensors"))
    (tmp_path / "embeddings.json").write_text(json.dumps(cases))
    harness = Path(__file__).parent / "compat" / "a1111_embeddings.py"
    out = subprocess.run([sys.executable, str(harness), A1111, str(tmp_path)], capture_output=True, text=True,
                         timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for kind, rows in expected.items():
        got = result[kind]
        assert got["errors"] == [] and got["skipped"] == [], (kind, got["errors"], got["skipped"])
        assert list(got["loaded"]) == ["dog_emb"], kind
        loaded = got["loaded"]["dog_emb"]
        assert (loaded["vectors"], loaded["shape"]) == (2, cases[kind]["width"]), kind
        keys = {"": rows["clip_l"]} if kind == "sd15" else rows                  # SD 1.x: its one tensor
        assert sorted(loaded["rows"]) == sorted(keys), kind
        for key, tensor in keys.items():
            assert torch.equal(torch.tensor(loaded["rows"][key], dtype=torch.float32), tensor.float()), (kind, key)
        assert [(f["name"], f["vectors"]) for f in got["found"]] == [("dog_emb", 2)], kind
        before = CLIPTokenizer.from_pretrained(cases[kind]["tokenizer"])("a photo of", add_special_tokens=False)
        assert got["found"][0]["token_offset"] == len(before["input_ids"]), kind   # a photo of [dog_emb] dog
