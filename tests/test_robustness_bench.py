"""bench/robustness.py's plumbing: the unseen subjects, their photos, one micro run end to end
(CLI train + eval, cached result), and the tables. Not the real recipe (2 steps)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from dorabooth.data import fit
from dorabooth.toyworld import read, world

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "robustness.py"


@pytest.fixture(scope="module")
def rb():
    spec = importlib.util.spec_from_file_location("robustness_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["robustness_bench"] = module             # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_subjects_cover_every_shape_and_pattern_with_own_colours_never_a_shipped_one(rb):
    subjects = rb.make_subjects()
    assert len(subjects) >= 12
    assert {s.shape for s in subjects} == set(world.SHAPES)
    assert {s.pattern for s in subjects} == set(world.PATTERNS)
    assert {s.shape for s in subjects[:5]} == set(world.SHAPES)      # the quick set's first subjects vary too
    every = rb.make_subjects(15)
    assert len({(s.shape, s.pattern) for s in every}) == 15
    assert len({(s.colour, s.colour2) for s in every}) == 15
    assert not {s.combination for s in every} & set(world.HELD_OUT)
    assert all(s.colour != s.colour2 for s in every)
    with pytest.raises(ValueError, match="use 1 to 15"):
        rb.make_subjects(16)


def _reading(image) -> tuple:
    r = read(image)
    return (r["shape"], r["pattern"], *(r["colours"] or (r["colour"], None)))


@pytest.mark.parametrize("index", [3, 10])                       # a split star, a banded circle
def test_photos_arrive_as_a_users_would_and_still_show_the_subject(rb, tmp_path, index):
    subject = rb.make_subjects(15)[index]
    paths = rb.write_photos(subject, tmp_path / "a")
    assert 5 <= len(paths) <= 8
    sizes = set()
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert 128 <= im.height <= 1024
            sizes.add(im.size)
            small, _ = fit(im.convert("RGB"), (32, 32))           # what the trainer makes of it
        assert _reading(small) == subject.combination, p.name
    assert len(sizes) > 1
    info = json.loads((tmp_path / "a" / "subject.json").read_text())
    assert tuple(info["combination"].values()) == subject.combination
    again = rb.write_photos(subject, tmp_path / "b")             # deterministic: the bench reproduces
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]


def test_learned_needs_fidelity_and_no_leak(rb):
    assert rb.learned({"subject_fidelity": 0.75, "class_leak": 0.1})
    assert not rb.learned({"subject_fidelity": 0.74, "class_leak": 0.0})
    assert not rb.learned({"subject_fidelity": 1.0, "class_leak": 0.2})
    assert not rb.learned({"subject_fidelity": None, "class_leak": 0.0})


def test_a_micro_run_trains_with_the_cli_is_scored_and_cached(rb, tmp_path):
    subject = rb.make_subjects(1)[0]
    classes = tmp_path / "class-images" / subject.shape             # given class images: no drawing step
    classes.mkdir(parents=True)
    for i, bg in enumerate(("white", "black")):
        world.render(world.Scene(subject.shape, "red", bg), 32).save(classes / f"{i}.png")
    extra = ["--steps", "2", "--num-class-images", "2"]
    lines = []
    results = rb.bench(tmp_path, [subject], ["zwx"], [0], jobs=1, extra=extra, eval_seeds=(0,), log=lines.append)
    (r,) = results
    assert r["argv"][:8] == ["dorabooth", "train", "--images", str(tmp_path / "subjects" / subject.name),
                             "--token", "zwx", "--class-noun", subject.shape]
    assert r["learned"] == rb.learned(r["metrics"])
    assert 0.0 <= r["metrics"]["subject_fidelity"] <= 1.0 and r["metrics"]["class_leak"] is not None
    assert r["scored_as"] == list(subject.combination)                # eval read subject.json
    assert r["reader_accuracy"]["subject_shape"] == subject.shape
    config = json.loads((tmp_path / "runs" / r["name"] / "config.json").read_text())["config"]
    assert config["token"] == "zwx" and config["seed"] == 0 and config["steps"] == 2
    cached = tmp_path / "results" / f"{r['name']}.json"
    cached.write_text(json.dumps({**r, "train_s": -1.0}))           # a second bench reads it, trains nothing
    again = rb.bench(tmp_path, [subject], ["zwx"], [0], jobs=1, extra=extra, eval_seeds=(0,), log=lines.append)
    assert again[0]["train_s"] == -1.0 and again[0]["eval_seeds"] == [0]
    more = rb.bench(tmp_path, [subject], ["zwx"], [0], jobs=1, extra=extra, eval_seeds=(0, 1), log=lines.append)
    assert more[0]["train_s"] == -1.0                               # other image seeds: scored again, not trained
    assert more[0]["eval_seeds"] == [0, 1] and len(more[0]["images"]) == 2 * len(r["images"])
    assert json.loads(cached.read_text())["eval_seeds"] == [0, 1]
    assert sum(r["name"] in x for x in lines) == 3                   # one progress line per bench call
    # pivotal tuning (the toy default) replaces the token: another token's run is the same training
    both = rb.bench(tmp_path, [subject], ["zwx", "sks"], [0], jobs=1, extra=extra, eval_seeds=(0, 1), log=lines.append)
    assert both[0]["train_s"] == -1.0 and "same_training_as" not in both[0]
    assert both[1]["same_training_as"] == r["name"] and both[1]["token"] == "sks"
    assert both[1]["metrics"] == both[0]["metrics"] and both[1]["argv"][5] == "sks"
    assert not (tmp_path / "runs" / both[1]["name"]).exists()          # nothing trained for it
    assert json.loads((tmp_path / "results" / f"{both[1]['name']}.json").read_text())["same_training_as"] == r["name"]


@pytest.mark.parametrize("flags, same", [
    ([], True), (["--pivotal=0"], False), (["--pivotal", "0"], False), (["--pivotal=3"], True),
    (["--method=full"], False), (["--model", "x"], False), (["--steps", "2", "--lr=1e-3"], True),
])
def test_one_training_stands_for_every_token_only_with_pivotal_tuning(rb, flags, same):
    assert rb.same_for_every_token(flags) is same


def _row(subject, token, seed, fidelity, leak=0.0):
    m = {"subject_fidelity": fidelity, "class_leak": leak}
    return {"subject": subject, "shape": subject.split("-")[2], "pattern": "band", "token": token, "seed": seed,
            "metrics": m, "learned": fidelity >= 0.75 and leak <= 0.1,
            "reader_accuracy": {"subject_shape": subject.split("-")[2], "correct": 70, "n": 71}}


def test_table_counts_learned_runs_per_token_and_subject(rb):
    rows = [_row("red-blue-star-band", "sks", 0, 0.2), _row("red-blue-star-band", "sks", 1, 0.9),
            _row("red-blue-star-band", "zwx", 0, 1.0), _row("red-blue-star-band", "zwx", 1, 0.8, leak=0.3),
            _row("white-black-cross-band", "sks", 0, 0.9), _row("white-black-cross-band", "sks", 1, 0.9),
            _row("white-black-cross-band", "zwx", 0, 0.0), _row("white-black-cross-band", "zwx", 1, 0.75)]
    text = rb.table(rows, "T")
    assert "All runs: **5/8 (62 %)**" in text
    assert "| `sks` | 3/4 (75 %) | 0.90 | 0.000 |" in text
    assert "| `zwx` | 2/4 (50 %) | 0.78 | 0.075 |" in text
    assert "| red-blue-star-band | 2/4 (50 %) | 0.85 | 0.075 | star 70/71 |" in text
    assert "| white-black-cross-band | 0.90* / 0.90* | 0.00 / 0.75* |" in text


def test_two_recipes_are_compared_run_by_run(rb):
    names = [("red-blue-star-band", t, s) for t in ("sks", "zwx") for s in (0, 1)]
    names += [("white-black-cross-band", t, s) for t in ("sks", "zwx") for s in (0, 1)]
    a = [{**_row(sub, t, s, f), "name": f"{sub}__{t}__s{s}", "train_s": 60.0}
         for (sub, t, s), f in zip(names, (0.2, 0.9, 1.0, 0.8, 0.9, 0.9, 0.0, 0.75))]
    b = [{**_row(sub, t, s, f), "name": f"{sub}__{t}__s{s}", "train_s": 50.0}
         for (sub, t, s), f in zip(names, (0.8, 0.9, 1.0, 0.7, 1.0, 0.9, 0.5, 0.8))]
    text = rb.paired(a, b[::-1] + [{**b[0], "name": "only-in-b"}], "A", "B", "T", boot=200)
    assert "| runs learned | 6/8 (75 %) | 6/8 (75 %) |" in text
    assert "| median training time per run | 60 s | 50 s |" in text
    # differences: +0.6, 0, 0, -0.1, +0.1, 0, +0.5, +0.05 -> mean +0.14375; 4 higher, 1 lower, 3 equal
    assert "Paired over 8 runs (2 subjects): B − A subject fidelity **+0.144**" in text
    assert "B higher in 4, lower in 1, equal in 3 runs (sign test p = 0.38)" in text
    # learned only by A: red-blue zwx s1 (0.8 -> 0.7); only by B: red-blue sks s0 (0.2 -> 0.8)
    assert "learned by only A: 1, by only B: 1 (McNemar exact p = 1)" in text
    assert "| `sks` | 3/4 (75 %) | 4/4 (100 %) | 0.72 → 0.90 |" in text
    lo, hi = (float(x) for x in text.split("95 % interval ")[1].split(",")[0].split(" … "))
    assert lo <= 0.144 <= hi
    assert rb._binomial_two_sided(0, 5) == pytest.approx(2 / 32)
    assert rb._binomial_two_sided(3, 6) == 1.0
    with pytest.raises(ValueError, match="share no run"):
        rb.paired(a, [{**b[0], "name": "x"}], "A", "B", "T")


def test_paired_counts_trainings_not_copies(rb):
    """With one training per subject × seed (pivotal tuning), the other tokens' results are copies:
    the sign test and McNemar count the trainings, the mean and its interval stay per run."""
    def rows(fids):
        out = []
        for seed, f in enumerate(fids):
            first = f"red-blue-star-band__sks__s{seed}"
            for token in ("sks", "zwx", "ohwx"):
                name = f"red-blue-star-band__{token}__s{seed}"
                out.append({**_row("red-blue-star-band", token, seed, f), "name": name, "train_s": 60.0,
                            **({"same_training_as": first} if name != first else {})})
        return out

    text = rb.paired(rows([0.5, 0.9]), rows([0.8, 0.8]), "A", "B", "T", boot=200)
    assert "Paired over 6 runs (1 subjects): B − A subject fidelity **+0.100**" in text
    assert "B higher in 1, lower in 1, equal in 0 of the 2 distinct trainings" in text
    assert "learned by only A: 0, by only B: 1 (McNemar exact p = 1)" in text
