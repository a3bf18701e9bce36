"""The labelled set of toy-model generations that measures the toy reader's shape accuracy.

    python bench/reader_set.py [--out tests/assets/reader-set] [--seed 0] [--per-shape 80]
    python bench/reader_set.py --sheets DIR       # contact sheets to label by eye
    python bench/reader_set.py --relabel          # after editing eye.json
    python bench/reader_set.py --score            # the reader on it

The reader (``dorabooth.toyworld.reader``) was first checked on renders only; eval scores
*generated* images, which are softer (blobby small stars, rounded corners). This builds
``--per-shape`` generations of each shape with the shipped toy model (``Session("toy")``,
the eval's sampler defaults: 20 steps, guidance 5), one seed per image, from prompts whose
shape is known, mixed like the images eval reads:

- ``two-colour``: a split or banded object, with or without a background
  ("a star, left half yellow, right half blue on a red background") — subject prompts;
- ``one-colour``: a large one-colour object ("a blue star on a white background");
- ``small``: a small object at a position ("a small red star at the left");
- ``class``: the bare class prompt and the eval's class variants ("a star",
  "a star on a black background").

Labels are NOT produced by a reader: an image's label is the shape its prompt asked for,
unless a person looking at it saw something else (``eye.json``: index → the shape seen, or
null when no shape can be told — nothing drawn, part of the object in the background's
colour, two objects, a shapeless blob; null images are left out of the accuracy). The
reviewer labels from the contact sheets (``--sheets``: 4× upscaled, grouped by prompted
shape, indices only, no reader output), before the reader is scored on the set.

Writes ``images.png`` (every image as a 32×32 tile, row-major, 20 per row; lossless) and
``labels.json`` (prompt, group, prompted shape, what else the prompt asked, seed, label per
image). Deterministic for a seed (CPU, fp32, torch 2.13); a rebuild reports how many pixels
moved against the committed images.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dorabooth.toyworld import world  # noqa: E402  (after the path: the checkout's package)

OUT = REPO / "tests" / "assets" / "reader-set"
TILE = world.RESOLUTION
PER_ROW = 20
GROUPS = ("two-colour", "one-colour", "small", "class")


def prompts(seed: int, per_shape: int) -> list[dict]:
    """``per_shape`` prompts per shape, a quarter from each group, in a seeded order; ``asked``
    holds what the prompt names besides the shape (colours, pattern, background)."""
    rng = random.Random(seed)
    names = list(world.COLOURS)
    items = []
    for shape in world.SHAPES:
        for k in range(per_shape):
            group = GROUPS[k % len(GROUPS)]
            colour, background = rng.sample(names, 2)
            bg = rng.random() < 0.7
            asked = {"background": background} if bg else {}
            if group == "two-colour":
                colour2 = rng.choice([c for c in names if c not in (colour, background)])
                scene = world.Scene(shape, colour, background, pattern=rng.choice(world.PATTERNS), colour2=colour2)
                text = world.describe(scene, background=bg)
                asked.update(pattern=scene.pattern, colours=[colour, colour2])
            elif group == "one-colour":
                text = world.describe(world.Scene(shape, colour, background), background=bg, size=rng.random() < 0.3)
                asked["colour"] = colour
            elif group == "small":
                scene = world.Scene(shape, colour, background, position=rng.choice(list(world.POSITIONS)), size="small")
                text = world.describe(scene, background=bg)
                asked["colour"] = colour
            else:
                text = rng.choice([f"a {shape}", f"a {shape} on a {background} background"])
                asked = {"background": background} if "background" in text else {}
            items.append({"prompt": text, "group": group, "prompted": shape, "asked": asked})
    rng.shuffle(items)
    for i, item in enumerate(items):
        item["seed"] = seed * 100_000 + i
    return items


def generate(items: list[dict], batch: int = 20) -> np.ndarray:
    """(N, 32, 32, 3) uint8: one image per item from its own seeded generator, batched."""
    import torch

    from dorabooth.generate import Session

    torch.set_num_threads(1)
    session = Session("toy", device="cpu", dtype=torch.float32)
    how = session.sampling("")                      # the eval's defaults: steps, guidance, size
    out = np.empty((len(items), TILE, TILE, 3), np.uint8)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        with torch.no_grad():
            images = session.pipe(prompt=[it["prompt"] for it in chunk], num_inference_steps=how.steps,
                                  guidance_scale=how.guidance, width=how.width, height=how.height,
                                  generator=[torch.Generator().manual_seed(it["seed"]) for it in chunk]).images
        for k, im in enumerate(images):
            out[start + k] = np.asarray(im.convert("RGB"))
        print(f"{start + len(chunk)}/{len(items)} images", file=sys.stderr)
    return out


def to_sheet(images: np.ndarray) -> Image.Image:
    rows = -(-len(images) // PER_ROW)
    sheet = np.zeros((rows * TILE, PER_ROW * TILE, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, PER_ROW)
        sheet[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = im
    return Image.fromarray(sheet)


def load(folder: Path = OUT) -> tuple[np.ndarray, list[dict]]:
    """The set's images (N, 32, 32, 3) and items (with ``label``)."""
    items = json.loads((folder / "labels.json").read_text())["images"]
    sheet = np.asarray(Image.open(folder / "images.png").convert("RGB"))
    images = np.stack([sheet[(i // PER_ROW) * TILE:(i // PER_ROW + 1) * TILE,
                             (i % PER_ROW) * TILE:(i % PER_ROW + 1) * TILE] for i in range(len(items))])
    return images, items


def review_sheets(images: np.ndarray, items: list[dict], folder: Path, scale: int = 4, cols: int = 10) -> None:
    """One contact sheet per prompted shape, indices under the tiles, nothing else."""
    side = TILE * scale
    for shape in world.SHAPES:
        idx = [i for i, it in enumerate(items) if it["prompted"] == shape]
        rows = -(-len(idx) // cols)
        sheet = Image.new("RGB", (cols * (side + 4) + 4, rows * (side + 16) + 4), (128, 128, 128))
        draw = ImageDraw.Draw(sheet)
        for k, i in enumerate(idx):
            r, c = divmod(k, cols)
            x, y = 4 + c * (side + 4), 4 + r * (side + 16)
            sheet.paste(Image.fromarray(images[i]).resize((side, side), Image.NEAREST), (x, y))
            draw.text((x, y + side + 2), str(i), fill=(0, 0, 0))
        sheet.save(folder / f"sheet-{shape}.png")


def build(out: Path, seed: int, per_shape: int) -> None:
    items = prompts(seed, per_shape)
    images = generate(items)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images.png").is_file():
        old, _ = load(out)
        if old.shape == images.shape:
            moved = int((np.abs(old.astype(int) - images.astype(int)) > 2).any(-1).sum())
            print(f"rebuild: {moved} of {images.shape[0] * TILE * TILE} pixels differ by > 2 levels from the "
                  f"committed images", file=sys.stderr)
    to_sheet(images).save(out / "images.png", optimize=True)
    write_labels(out, items, seed, per_shape)


def write_labels(out: Path, items: list[dict], seed: int, per_shape: int) -> None:
    """``labels.json``: each item's label is its prompted shape unless ``eye.json`` saw otherwise."""
    eye = json.loads((out / "eye.json").read_text())["seen"] if (out / "eye.json").is_file() else {}
    for i, item in enumerate(items):
        item["label"] = eye[str(i)]["shape"] if str(i) in eye else item["prompted"]
    lines = ",\n".join(json.dumps(item) for item in items)
    (out / "labels.json").write_text(f'{{"seed": {seed}, "per_shape": {per_shape}, "images": [\n{lines}\n]}}\n')


def relabel(out: Path) -> None:
    """Rewrite ``labels.json`` from the prompts and an edited ``eye.json`` (nothing is generated)."""
    data = json.loads((out / "labels.json").read_text())
    items = prompts(data["seed"], data["per_shape"])
    if [it["prompt"] for it in items] != [it["prompt"] for it in data["images"]]:
        raise SystemExit(f"{out}/labels.json: its prompts are not this script's for seed {data['seed']}; rebuild")
    write_labels(out, items, data["seed"], data["per_shape"])


def score(folder: Path) -> dict:
    """The reader on the set's labelled images (null ones left out): shape accuracy per label,
    and how often its colour / pattern / background readings agree with the prompt (an
    agreement, not an accuracy: the model does not always draw what it is asked)."""
    from dorabooth.toyworld import reader

    images, items = load(folder)
    hits: dict[str, list[bool]] = {}
    agree: dict[str, list[bool]] = {}
    for image, item in zip(images, items):
        if item["label"] is None:
            continue
        r = reader.read(image)
        hits.setdefault(item["label"], []).append(r["shape"] == item["label"])
        asked = item["asked"]
        if "background" in asked:
            agree.setdefault("background", []).append(r["background"] == asked["background"])
        if "colour" in asked:
            agree.setdefault("colour", []).append(r["colour"] == asked["colour"])
        if "colours" in asked:
            agree.setdefault("two_colour", []).append((r["pattern"], list(r["colours"] or ()))
                                                      == (asked["pattern"], asked["colours"]))
    return {"shape": {s: {"correct": sum(hits[s]), "n": len(hits[s]), "accuracy": round(sum(hits[s]) / len(hits[s]), 3)}
                      for s in world.SHAPES if s in hits},
            "left_out": sum(item["label"] is None for item in items),
            "agrees_with_prompt": {k: {"agree": sum(v), "n": len(v)} for k, v in agree.items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shape", type=int, default=80)
    p.add_argument("--score", action="store_true", help="score the reader on an existing set")
    p.add_argument("--relabel", action="store_true", help="apply an edited eye.json to labels.json")
    p.add_argument("--sheets", type=Path, metavar="DIR", help="write the review contact sheets to DIR")
    a = p.parse_args(argv)
    if a.sheets:
        images, items = load(a.out)
        a.sheets.mkdir(parents=True, exist_ok=True)
        review_sheets(images, items, a.sheets)
    elif a.relabel:
        relabel(a.out)
    elif a.score:
        print(json.dumps(score(a.out), indent=1))
    else:
        build(a.out, a.seed, a.per_shape)


if __name__ == "__main__":
    main()
