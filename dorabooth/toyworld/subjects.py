"""Sample DreamBooth subjects: held-out two-colour combinations, rendered on varied backgrounds.

Each subject is an exact (shape, pattern, colour pair) the base model never saw tied to
anything (`world.HELD_OUT`), so it can draw it only when spelled out in words. A subject
folder holds 6 PNGs and `subject.json` (token, class noun, prompts, description).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from . import world

TOKENS = ("sks", "ohwx", "zwx")
N_IMAGES = 6
IMAGE_RESOLUTION = 64  # twice the model's; trainers resize


def subject_scene(index: int, background: str, jitter=(0, 0)) -> world.Scene:
    shape, pattern, a, b = world.HELD_OUT[index]
    return world.Scene(shape, a, background, pattern=pattern, colour2=b, jitter=jitter)


def subject_info(index: int) -> dict:
    shape, pattern, a, b = world.HELD_OUT[index]
    token = TOKENS[index]
    description = world.describe(subject_scene(index, "black"), background=False, size=False)
    return {
        "name": f"{a}-{b}-{shape}",
        "token": token,
        "class_noun": shape,
        "instance_prompt": f"a {token} {shape}",
        "class_prompt": f"a {shape}",
        "description": description,
        "combination": {"shape": shape, "pattern": pattern, "colour": a, "colour2": b},
    }


def write_subjects(folder, seed: int = 0) -> list[Path]:
    """Write every sample subject under `folder`; returns their folders."""
    rng = random.Random(seed)
    out = []
    for i in range(len(world.HELD_OUT)):
        info = subject_info(i)
        combo = info["combination"]
        backgrounds = [c for c in world.COLOURS if c not in (combo["colour"], combo["colour2"])]
        rng.shuffle(backgrounds)
        d = Path(folder) / info["name"]
        d.mkdir(parents=True, exist_ok=True)
        names = []
        for k in range(N_IMAGES):
            jitter = (rng.randint(-1, 1), rng.randint(-1, 1))
            scene = subject_scene(i, backgrounds[k % len(backgrounds)], jitter)
            name = f"{k:02d}.png"
            world.render(scene, IMAGE_RESOLUTION).save(d / name)
            names.append(name)
        (d / "subject.json").write_text(json.dumps({**info, "images": names}, indent=2) + "\n")
        out.append(d)
    return out
