"""Quality check on the embedded toy model (issue 4), through the command line as a user runs it.

`dorabooth train` with default settings on a sample subject, then `dorabooth generate` at
strength 1 (the adapter) and 0 (exactly the base model) for the same prompts and seeds:

- subject prompts (the run's instance prompt, "a sks square …"): the toy world's reader must see
  the subject (shape, split pattern, both colours) measurably more often with the adapter than without;
- class prompts (its class prompt, "a square …"): the adapter's images must stay the class the base
  model drew (same shape rate; the same shape at the same seed) and not turn into the subject;
- the whole default run, class images included, must take at most 5 minutes on the 2-core CPU.

The recipe is judged over two training seeds (``DORABOOTH_QUALITY_TRAIN_SEEDS``, default "0 1"),
their images pooled: one training is one draw of a spread that decides more than most recipe
knobs (docs/robustness.md). With plain MSE (the toy default since 2026-12-01, session 12) seed 0
drew 16 squares of 24 for the class prompts and seed 1 24 of 24 (the base model 22).

It takes a few minutes, so it runs only with ``DORABOOTH_QUALITY=1`` (and the toy model in
``assets/toy-sdxl``; ``DORABOOTH_QUALITY_MODEL`` points it at another toy build). Results are
written to ``quality.json`` beside the runs and printed.
"""

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

from dorabooth import cli, models

MODEL = Path(os.environ.get("DORABOOTH_QUALITY_MODEL", models.TOY_MODEL))
SUBJECTS = Path(__file__).resolve().parent.parent / "assets" / "subjects"
SUBJECT = os.environ.get("DORABOOTH_QUALITY_SUBJECT", "red-white-square")
SEEDS = int(os.environ.get("DORABOOTH_QUALITY_SEEDS", "12"))
TRAIN_SEEDS = [int(x) for x in os.environ.get("DORABOOTH_QUALITY_TRAIN_SEEDS", "0 1").split()]
BUDGET_S = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("DORABOOTH_QUALITY"), reason="set DORABOOTH_QUALITY=1 (takes minutes)"),
    pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason=f"no toy model at {MODEL}"),
]


def subject_folder(tmp_path) -> Path:
    shipped = SUBJECTS / SUBJECT
    if (shipped / "subject.json").is_file():
        return shipped
    from dorabooth.toyworld.subjects import write_subjects     # the same images, drawn from the recipe
    return next(p for p in write_subjects(tmp_path / "subjects") if p.name == SUBJECT)


def prompts(run: Path) -> dict[str, list[str]]:
    """The run's own instance and class prompts (the trainer's defaults for the toy model)."""
    from dorabooth.rundir import read_config

    config, _ = read_config(run)
    instance, klass = config.resolved_instance_prompt, config.resolved_class_prompt
    return {
        "subject": [instance] + [f"{instance} on a {bg} background" for bg in ("blue", "green", "black")],
        "class": [klass, f"{klass} on a blue background"],
    }


def generate_pairs(run: Path, prompt: str, out: Path) -> list[tuple[Image.Image, Image.Image]]:
    """(base image, adapter image) per seed, both from one `dorabooth generate` call."""
    assert cli.main(["generate", "--adapter", str(run), "--model", str(MODEL), "--prompt", prompt,
                     "--out", str(out), "--n", str(SEEDS), "--strength", "0", "1", "--quiet"]) == 0
    by_strength = defaultdict(dict)
    for path in sorted(out.glob("*.png")):
        meta = json.loads(Image.open(path).text["dorabooth"])
        by_strength[meta["strength"]][meta["seed"]] = Image.open(path).convert("RGB")
    return [(by_strength[0.0][s], by_strength[1.0][s]) for s in sorted(by_strength[1.0])]


def test_default_run_learns_the_subject_and_keeps_the_class(tmp_path, capsys):
    from dorabooth.toyworld import read
    from dorabooth.toyworld.dreambooth_check import is_subject

    folder = subject_folder(tmp_path)
    info = json.loads((folder / "subject.json").read_text())
    combo, token, noun = info["combination"], info["token"], info["class_noun"]
    start = time.monotonic()
    pooled: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    result = {"seeds": SEEDS, "train_seeds": TRAIN_SEEDS, "subject": info["name"], "train_s": [], "per_seed": {}}
    for train_seed in TRAIN_SEEDS:
        run = tmp_path / f"run-s{train_seed}"
        started = time.monotonic()
        assert cli.main(["train", "--images", str(folder), "--token", token, "--class-noun", noun,
                         "--out", str(run), "--model", str(MODEL), "--seed", str(train_seed), "--quiet"]) == 0
        result["train_s"].append(round(time.monotonic() - started, 1))
        for kind, texts in prompts(run).items():
            counts = defaultdict(int)
            for i, text in enumerate(texts):
                for base, adapted in generate_pairs(run, text, tmp_path / f"s{train_seed}-{kind}-{i}"):
                    counts["base_subject"] += is_subject(base, combo)
                    counts["adapter_subject"] += is_subject(adapted, combo)
                    counts["base_shape"] += read(base)["shape"] == noun
                    counts["adapter_shape"] += read(adapted)["shape"] == noun
                    counts["same_shape_as_base"] += read(base)["shape"] == read(adapted)["shape"]
                    counts["same_background_as_base"] += read(base)["background"] == read(adapted)["background"]
                    counts["images"] += 1
            result["per_seed"].setdefault(str(train_seed), {})[kind] = dict(counts)
            for k, v in counts.items():
                pooled[kind][k] += v
    for kind, counts in pooled.items():
        n = counts.pop("images")
        result[kind] = {**{f"{k}_rate": round(v / n, 3) for k, v in counts.items()}, "images": n}
    result["wall_s"] = round(time.monotonic() - start, 1)
    (tmp_path / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    with capsys.disabled():
        print("\nquality:", json.dumps(result))

    train_s = max(result["train_s"])
    subject, klass = result["subject"], result["class"]
    assert train_s <= BUDGET_S, f"default run took {train_s:.0f} s (> {BUDGET_S} s)"
    assert subject["adapter_subject_rate"] >= subject["base_subject_rate"] + 0.25, result
    assert klass["adapter_subject_rate"] <= klass["base_subject_rate"] + 0.1, result    # no leak
    assert klass["adapter_shape_rate"] >= klass["base_shape_rate"] - 0.15, result       # still the class
    assert klass["same_shape_as_base_rate"] >= 0.6, result                               # seed by seed
    # (backgrounds chosen by a seed shift more easily; same_background_as_base is reported, not asserted)
