"""`dorabooth eval`: prompt sets, the toy reader's scoring of known images, the table and JSON
on a tiny trained run, the embedding scorer on tiny local CLIP/DINOv2 folders, and errors."""

import json
import math
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from analysis_runs import tiny_run
from dorabooth.cli import main
from dorabooth.evaluate import (DEFAULT_PROMPTS, EvalPrompt, EvalRun, ToyScorer, evaluate_run, fill, format_table,
                                load_prompts, mean_std)
from dorabooth.toyworld import world
from dorabooth.toyworld.reader import GENERATED_SHAPE_ACCURACY
from dorabooth.toyworld.subjects import write_subjects
from tiny_models import TOKENIZER_DIR

SMALL_SET = {"name": "small", "prompts": [
    {"prompt": "{instance}"},
    {"prompt": "{instance} on a blue background", "expect": {"background": "blue"}},
    {"prompt": "{class_prompt}", "kind": "class"},
]}


def test_prompt_sets_shipped_and_placeholders(tmp_path):
    toy = load_prompts(DEFAULT_PROMPTS["toy"])
    assert toy.name == "toy-eval" and {p.kind for p in toy.prompts} == {"subject", "class"}
    assert sum(1 for p in toy.prompts if p.expect.get("background")) == len(world.COLOURS)
    objects = load_prompts("dreambooth-objects.txt")             # a bare name looks in prompts/
    assert len(objects.prompts) == 25 and all("{token} {class_noun}" in p.template for p in objects.prompts)
    assert len(load_prompts("dreambooth-live.txt").prompts) == 25
    fields = {"instance": "a sks square", "class_prompt": "a square", "token": "sks", "class_noun": "square"}
    assert fill("{instance} on a blue background", fields) == "a sks square on a blue background"
    assert fill(objects.prompts[0].template, fields) == "a sks square in the jungle"
    with pytest.raises(ValueError, match="unknown placeholder"):
        fill("a {subject}", fields)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="toy-eval.json"):
        load_prompts(tmp_path / "missing.json")


def _run(images: Path, **kw) -> EvalRun:
    return EvalRun(path=images, method="dora", label="DoRA r=4", base="toy", base_id="toy", token="sks",
                   class_noun="square", instance_prompt="a sks square", class_prompt="a square",
                   images=str(images), seed=0, lr=1e-3, **kw)


def test_toy_scorer_on_known_images(tmp_path):
    subject = write_subjects(tmp_path)[0]             # square, left half red, right half white
    scorer = ToyScorer(_run(subject))
    assert scorer.subject == ("square", "split-lr", "red", "white")
    on = lambda bg, **kw: world.render(world.Scene("square", "red", bg, pattern="split-lr", colour2="white", **kw))
    blue = EvalPrompt("{instance} on a blue background", expect={"background": "blue"})
    rows = scorer.score([on("blue"), on("black"), world.render(world.Scene("square", "red", "blue"))], blue, "")
    assert [r["subject"] for r in rows] == [True, True, False]
    assert [r["prompt"] for r in rows] == [True, False, True]
    assert scorer.score([on("blue")], EvalPrompt("{instance}"), "")[0]["prompt"] is None
    assert scorer.usable(EvalPrompt("x", expect={"background": "white"})) == "background white is a colour of the subject"
    # Without subject.json the subject is what most photos read as.
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, bg in enumerate(("blue", "black", "green")):
        world.render(world.Scene("circle", "yellow", bg), 64).save(photos / f"{i}.png")
    assert ToyScorer(_run(photos)).subject == ("circle", None, "yellow", None)


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    return tiny_run(tmp_path_factory, "dora")


def test_eval_cli_prints_a_table_and_writes_json(dora_run, tmp_path, capsys):
    prompts = tmp_path / "small.json"
    prompts.write_text(json.dumps(SMALL_SET))
    out = tmp_path / "eval.json"
    code = main(["eval", str(dora_run), "--scorer", "toy", "--prompts", str(prompts), "--seeds", "0", "1",
                 "--steps", "2", "--out", str(out), "--save-images", str(tmp_path / "images")])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    lines = printed[next(i for i, line in enumerate(printed) if line.startswith("run ")):]
    assert lines[0].split() == ["run", "label", "seed", "lr", "subject", "prompt", "class_leak", "reader",
                                "images"], printed
    assert lines[2].split()[:2] == [dora_run.name, "DoRA"] and lines[2].split()[-1] in ("6", "4"), printed
    result = json.loads(out.read_text())["runs"][0]
    assert result["scorer"] == "toy" and result["seeds"] == [0, 1] and result["snapshot"] == "final"
    # beside the fidelity numbers: how often the reader gets the subject's shape right on generations
    shape, (correct, n) = result["subject"][0], GENERATED_SHAPE_ACCURACY[result["subject"][0]]
    acc = result["reader_accuracy"]
    assert (acc["subject_shape"], acc["correct"], acc["n"]) == (shape, correct, n) and set(acc["per_shape"]) == set(
        world.SHAPES)
    assert lines[2].split()[-3:-1] == [shape, f"{correct}/{n}"], printed
    assert lines[3].startswith("reader: shape read right on ") and "reader-set" in lines[3] and "star " in lines[3]
    m = result["metrics"]
    assert set(m) == {"subject_fidelity", "prompt_fidelity", "class_leak", "n_images"}
    assert 0 <= m["subject_fidelity"] <= 1 and 0 <= m["class_leak"] <= 1
    kept = [p for p in result["per_prompt"]]
    assert m["n_images"] == 2 * len(kept) == len(result["images"])
    assert [p["prompt"] for p in kept][0] == "a sks dog"             # the toy preset's caption phrasing
    assert all(set(p) == {"prompt", "kind", "expect", "n", "subject", "prompt_fidelity"} for p in kept)
    assert all(Path(im["path"]).is_file() for im in result["images"])
    assert len(result["skipped"]) + len(kept) == 3


def test_eval_uses_the_prompts_the_trainer_resolved(dora_run, tmp_path):
    """No prompts given: the trainer wrote its family's defaults into config.json (the tiny model
    is a toy-sized one: caption phrasing) and eval's {instance} and {class_prompt} are those; a
    run made before prompts were written there has none, and was trained with "a photo of …"."""
    import shutil

    from dorabooth.rundir import read_config, write_config
    from dorabooth.evaluate import read_eval_run

    config, extra = read_config(dora_run)
    assert (config.instance_prompt, config.class_prompt) == ("a sks dog", "a dog")
    run = read_eval_run(dora_run)
    assert (run.instance_prompt, run.class_prompt) == ("a sks dog", "a dog")
    old = tmp_path / "old-run"
    shutil.copytree(dora_run, old)
    write_config(old, replace(config, instance_prompt=None, class_prompt=None), extra)
    assert (read_eval_run(old).instance_prompt, read_eval_run(old).class_prompt) == ("a photo of sks dog",
                                                                                    "a photo of a dog")


def test_eval_of_a_checkpoint_with_defaults(dora_run):
    res = evaluate_run(dora_run, scorer="toy", seeds=[0], steps=1, checkpoint=2)
    assert res["snapshot"] == "step-2" and res["prompt_set"] == "toy-eval"
    assert res["metrics"]["n_images"] == len(res["per_prompt"]) == 12 - len(res["skipped"])
    assert format_table([res]).splitlines()[2].split()[1:3] == ["DoRA", "r=4"]
    with pytest.raises(FileNotFoundError, match="step-9"):
        evaluate_run(dora_run, scorer="toy", seeds=[0], checkpoint=9)


def test_eval_errors(dora_run, tmp_path, capsys):
    with pytest.raises(ValueError, match="--clip DIR"):      # the tiny model is not the toy model
        evaluate_run(dora_run, seeds=[0])
    assert main(["eval", str(dora_run), "--clip", str(tmp_path / "no-clip")]) == 1
    assert "never downloads" in capsys.readouterr().err


def _tiny_clip_and_dino(folder: Path) -> tuple[str, str]:
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, Dinov2Config, Dinov2Model)

    text = dict(vocab_size=523, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=521, eos_token_id=522, pad_token_id=522)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    size = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(**size),
                  tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))).save_pretrained(folder / "clip")
    Dinov2Model(Dinov2Config(**vision)).save_pretrained(folder / "dino")
    BitImageProcessor(**size).save_pretrained(folder / "dino")
    return str(folder / "clip"), str(folder / "dino")


def test_embedding_scorer_on_tiny_local_models(dora_run, tmp_path):
    clip, dino = _tiny_clip_and_dino(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {token} {class_noun} in the snow\n")
    res = evaluate_run(dora_run, prompts=prompts, seeds=[0, 1], steps=1, clip=clip, dino=dino)
    m = res["metrics"]
    assert res["scorer"] == "embedding" and res["subject_fidelity"] == "DINO" and res["prompt_fidelity"] == "CLIP-T"
    assert m["subject_fidelity"] == m["dino"] and m["prompt_fidelity"] == m["clip_t"] and m["n_images"] == 2
    assert all(-1.0 <= m[k] <= 1.0 for k in ("dino", "clip_i", "clip_t"))
    assert format_table([res]).splitlines()[0].split()[-4:] == ["dino", "clip_i", "clip_t", "images"]


class _Payload:
    """A pickle that creates ``marker`` when it is unpickled: the folder's weights must never be opened."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_eval_refuses_pickled_model_folders_without_opening_them(dora_run, tmp_path, capsys):
    clip, dino = _tiny_clip_and_dino(tmp_path)
    marker = tmp_path / "payload-ran"
    for folder in (Path(clip), Path(dino)):
        (folder / "model.safetensors").unlink()             # what save_pretrained(safe_serialization=False) leaves
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for flag, folder, example in (("--clip", clip, "openai/clip-vit-large-patch14"),
                                  ("--dino", dino, "facebook/dinov2-small")):
        assert main(["eval", str(dora_run), flag, folder, "--seeds", "0", "--steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            f"error: {folder}: only pickled .bin weights; dorabooth reads only .safetensors, never pickled .bin files. "
            f"Download its .safetensors weights instead (`huggingface-cli download {example} --include "
            f"'*.safetensors' '*.json' '*.txt' --local-dir DIR`) or re-save it with save_pretrained")
        assert "Traceback" not in err
    assert not marker.exists()


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0) and mean_std([None]) == (None, None)
    assert math.isclose(mean_std([0.2, 0.4])[1], math.sqrt(0.02))
