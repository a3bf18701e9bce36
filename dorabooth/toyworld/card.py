"""Package a finished build: the pipeline folder, its scores (eval.json) and a samples grid."""
from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw

from .scoring import generate

GRID_PROMPTS = [
    "a red circle on a blue background",
    "a yellow star on a black background",
    "a white triangle on a green background",
    "a purple square on a orange background",
    "a green cross on a white background",
    "a small blue circle at the left on a yellow background",
    "a square, left half red, right half white",
    "a circle, left half orange, right half blue on a black background",
    "a star, top half yellow, bottom half green on a purple background",
    "a triangle, top half green, bottom half purple",
    "a blue circle with a thick band of yellow",
    "a black cross with a thick band of red on a white background",
]


def samples_grid(pipe, prompts=GRID_PROMPTS, per_prompt: int = 4, seed: int = 0,
                 zoom: int = 4) -> Image.Image:
    """One row per prompt, `per_prompt` samples each, upscaled `zoom`x, caption on the left."""
    rows = [generate(pipe, [p] * per_prompt, seed + 10 * i) for i, p in enumerate(prompts)]
    cell = rows[0][0].size[0] * zoom
    label_w = 330
    grid = Image.new("RGB", (label_w + per_prompt * cell, len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        draw.text((4, r * cell + cell // 2 - 6), prompt, fill="black")
        for c, im in enumerate(images):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (label_w + c * cell, r * cell))
    return grid


def package(build_dir, dest, n_eval: int = 200, seed: int = 1234, on_event=None) -> dict:
    """Save a build's final EMA checkpoint as a pipeline in `dest`; score, time, draw it.

    Writes `dest/samples.png` and `dest/eval.json`; returns the numbers.
    """
    import json
    import time

    from diffusers import StableDiffusionXLPipeline

    from .recipe import pipeline_from_checkpoint, save_pipeline
    from .scoring import evaluate

    build_dir, dest = Path(build_dir), Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    save_pipeline(pipeline_from_checkpoint(build_dir), dest)
    pipe = StableDiffusionXLPipeline.from_pretrained(dest, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    generate(pipe, ["a red star on a blue background"] * 4, seed)
    four_s = time.time() - start
    scores = evaluate(pipe, n=n_eval, seed=seed)
    samples_grid(pipe).save(dest / "samples.png")
    state = json.loads((build_dir / "joint" / "state.json").read_text())
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    numbers = {"eval": scores, "eval_captions": n_eval, "eval_seed": seed,
               "four_images_s": round(four_s, 2), "joint_steps": state["step"],
               "joint_minutes": round(state["elapsed_s"] / 60, 1), "seed": state["seed"],
               "folder_mb": round(size / 2**20, 2)}
    (dest / "eval.json").write_text(json.dumps(numbers, indent=1) + "\n")
    if on_event is not None:
        on_event({"stage": "package", **numbers})
    return numbers
