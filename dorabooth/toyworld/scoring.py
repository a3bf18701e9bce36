"""Caption following of a toy pipeline, measured by the attribute reader.

`evaluate(pipe, n, seed)` draws `n` random scenes (held-out seed), captions each with a
random subset of its attributes, generates one image per caption with the pipeline's
sampler (25 steps, guidance 5) and scores each attribute over the captions that name it:
background, colour (one-colour objects), shape, position, size, and `two_colour`
(both colours in the right parts of the named pattern).
"""
from __future__ import annotations

import random

import torch

from . import reader, world

STEPS = 25
GUIDANCE = 5.0


def eval_captions(n: int, seed: int):
    """`n` (scene, flags, caption) triples; never an empty caption."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        scene = world.random_scene(rng, two_colour_share=0.5, exclude=())
        flags = dict(size=rng.random() < 0.4, position=rng.random() < 0.7,
                     background=rng.random() < 0.7,
                     colours=rng.random() < (0.9 if scene.pattern else 0.8),
                     shape=rng.random() < 0.85)
        items.append((scene, flags, world.describe(scene, **flags)))
    return items


def score(scene: world.Scene, flags: dict, image) -> dict:
    """{attribute: correct} for the attributes the caption named."""
    r = reader.read(image)
    out = {}
    if flags["background"]:
        out["background"] = r["background"] == scene.background
    if flags["shape"]:
        out["shape"] = r["shape"] == scene.shape
    if flags["colours"] and scene.pattern is None:
        out["colour"] = r["colour"] == scene.colour
    if flags["colours"] and scene.pattern is not None:
        out["two_colour"] = two_colour_right(image, scene, r)
        out["pattern"] = r["pattern"] == scene.pattern
    if flags["size"] and scene.pattern is None:
        out["size"] = r["size"] == scene.size
    if flags["position"] and scene.position != "centre":
        out["position"] = r["position"] == scene.position
    return out


def two_colour_right(image, scene: world.Scene, r: dict) -> bool:
    """Both named colours in the named parts of whatever object was drawn."""
    img = reader._prepare(image)
    lab = reader.labels(img)
    mask = reader.figure(img)[0]                      # the object as read() finds it
    if mask.sum() < 4:
        return False
    import numpy as np

    ys, xs = np.nonzero(mask)
    box = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    got = reader.two_colours(lab, mask, box, r["shape"], scene.pattern)
    return got == (scene.colour, scene.colour2)


@torch.no_grad()
def generate(pipe, prompts, seed: int, batch: int = 20, steps: int = STEPS,
             guidance: float = GUIDANCE):
    images = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        images += pipe(prompts[i:i + batch], num_inference_steps=steps,
                       guidance_scale=guidance, generator=g,
                       output_type="pil").images
    return images


def evaluate(pipe, n: int = 200, seed: int = 1234, return_images: bool = False):
    """{attribute: accuracy} (+ counts) over `n` held-out captions, one image each."""
    pipe.set_progress_bar_config(disable=True)
    items = eval_captions(n, seed)
    images = generate(pipe, [c for _, _, c in items], seed)
    tallies: dict[str, list[bool]] = {}
    for (scene, flags, _), image in zip(items, images):
        for k, ok in score(scene, flags, image).items():
            tallies.setdefault(k, []).append(ok)
    result = {k: round(sum(v) / len(v), 3) for k, v in sorted(tallies.items())}
    result.update({f"n_{k}": len(v) for k, v in sorted(tallies.items())})
    if return_images:
        return result, items, images
    return result
