"""The toy world: seeded scenes of one large shape on a plain background, drawn with PIL.

A `Scene` names everything about a picture (shape, colours, pattern, position, size,
background); `render(scene)` draws it at 4x and box-downsamples (anti-aliasing), and
`caption(scene, rng)` describes a random subset of it. Two-colour objects (left|right
split, top|bottom split, a thick band across) are the ingredients sample subjects are
made of; a few exact combinations (`HELD_OUT`) never appear in training.

Design for learnability by a tiny model in CPU-hours:
- few, well separated colours; large objects; two-colour objects always large and
  centred (the composition is the hard part, so nothing else varies there);
- fixed caption phrasing that names the *position before the colour*
  ("a square, left half red, right half white"): the text encoders are causal, so
  the colour token's hidden state can then carry which half it belongs to.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
SCALE = 4  # drawn at 4x, box-downsampled

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 0),
    "yellow": (250, 235, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
PATTERNS = ("split-lr", "split-tb", "band")  # None = one colour
POSITIONS: dict[str, tuple[float, float]] = {  # centre in fractions of the image
    "centre": (0.5, 0.5),
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
SIZES: dict[str, float] = {"small": 0.44, "large": 0.75}  # bounding box / image side

# Exact combinations reserved for the sample subjects: never rendered for training.
# (shape, pattern, colour, colour2)
HELD_OUT = (
    ("square", "split-lr", "red", "white"),
    ("circle", "band", "blue", "yellow"),
    ("triangle", "split-tb", "green", "purple"),
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str  # one-colour objects; left / top / main colour of a two-colour one
    background: str
    position: str = "centre"
    size: str = "large"
    pattern: str | None = None
    colour2: str | None = None  # right / bottom / band colour
    jitter: tuple[int, int] = (0, 0)  # pixel offset at the final resolution

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r}: choose one of {SHAPES}")
        for c in (self.colour, self.background, self.colour2):
            if c is not None and c not in COLOURS:
                raise ValueError(f"colour {c!r}: choose one of {tuple(COLOURS)}")
        if (self.pattern is None) != (self.colour2 is None):
            raise ValueError("a two-colour pattern needs colour2, a one-colour object none")
        if self.pattern is not None and self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r}: choose one of {PATTERNS}")

    @property
    def combination(self):
        return (self.shape, self.pattern, self.colour, self.colour2)


def shape_polygon(shape: str, cx: float, cy: float, s: float):
    """Outline of `shape` in a box of side `s` centred at (cx, cy); None for a circle."""
    h = s / 2
    if shape == "square":
        h *= 0.88
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.48
            a = -np.pi / 2 + k * np.pi / 5
            pts.append((cx + r * np.cos(a), cy + h * 0.08 + r * np.sin(a)))
        return pts
    if shape == "cross":
        t = h * 0.36
        return [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy - t), (cx + h, cy - t),
                (cx + h, cy + t), (cx + t, cy + t), (cx + t, cy + h), (cx - t, cy + h),
                (cx - t, cy + t), (cx - h, cy + t), (cx - h, cy - t), (cx - t, cy - t)]
    return None


def shape_mask(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of the shape, drawn without anti-aliasing."""
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    poly = shape_polygon(shape, cx, cy, s)
    if poly is None:
        d.ellipse([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(img) > 127


def geometry(scene: Scene, resolution: int = RESOLUTION):
    """(cx, cy, side) of the object's box in pixels at `resolution`."""
    fx, fy = POSITIONS[scene.position]
    k = resolution / RESOLUTION
    return (fx * resolution + scene.jitter[0] * k, fy * resolution + scene.jitter[1] * k,
            SIZES[scene.size] * resolution)


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Draw `scene` as an RGB image of `resolution` px (deterministic)."""
    big = resolution * SCALE
    cx, cy, s = (v * SCALE for v in geometry(scene, resolution))
    img = np.empty((big, big, 3), np.uint8)
    img[:] = COLOURS[scene.background]
    mask = shape_mask(scene.shape, cx, cy, s, big)
    first = np.zeros_like(mask)
    ys, xs = np.mgrid[0:big, 0:big]
    if scene.pattern == "split-lr":
        first = xs < cx
    elif scene.pattern == "split-tb":
        first = ys < cy
    elif scene.pattern == "band":
        first = np.abs(ys + 0.5 - cy) >= s / 6  # band: a third of the height
    else:
        first[:] = True
    img[mask & first] = COLOURS[scene.colour]
    if scene.pattern is not None:
        img[mask & ~first] = COLOURS[scene.colour2]
    return Image.fromarray(img).resize((resolution, resolution), Image.BOX)


def random_scene(rng: random.Random, two_colour_share: float = 0.5,
                 exclude=HELD_OUT) -> Scene:
    """A random scene; combinations in `exclude` are redrawn."""
    names = list(COLOURS)
    while True:
        shape = rng.choice(SHAPES)
        colour, background = rng.sample(names, 2)
        if rng.random() < two_colour_share:
            colour2 = rng.choice([c for c in names if c not in (colour, background)])
            scene = Scene(shape, colour, background, pattern=rng.choice(PATTERNS),
                          colour2=colour2)
        elif rng.random() < 0.5:
            scene = Scene(shape, colour, background)
        else:
            scene = Scene(shape, colour, background, position=rng.choice(list(POSITIONS)),
                          size="small")
        if scene.combination in exclude:
            continue
        return replace(scene, jitter=(rng.randint(-1, 1), rng.randint(-1, 1)))


def describe(scene: Scene, *, size=True, position=True, background=True, colours=True,
             shape=True) -> str:
    """The caption of `scene` naming the chosen attributes, in the world's fixed order."""
    noun = scene.shape if shape else "shape"
    where = ""
    if position and scene.position != "centre":
        where = f" at the {scene.position}"
    bg = f" on a {scene.background} background" if background else ""
    if scene.pattern is None or not colours:
        words = ["a"]
        if size:
            words.append(scene.size)
        if colours and scene.pattern is None:
            words.append(scene.colour)
        words.append(noun)
        return " ".join(words) + where + bg
    a, b = scene.colour, scene.colour2
    if scene.pattern == "split-lr":
        body = f"a {noun}, left half {a}, right half {b}"
    elif scene.pattern == "split-tb":
        body = f"a {noun}, top half {a}, bottom half {b}"
    else:
        body = f"a {a} {noun} with a thick band of {b}"
    return body + bg


def caption(scene: Scene, rng: random.Random, empty_share: float = 0.1) -> str:
    """A caption naming a random subset of the scene's attributes ('' for ~10%)."""
    if rng.random() < empty_share:
        return ""
    return describe(
        scene,
        size=rng.random() < 0.4,
        position=rng.random() < 0.7,
        background=rng.random() < 0.7,
        colours=rng.random() < (0.9 if scene.pattern else 0.8),
        shape=rng.random() < 0.85,
    )


def dataset(n: int, seed: int, resolution: int = RESOLUTION, two_colour_share=0.5):
    """`n` (uint8 images (n, H, W, 3), captions, scenes) for seed `seed`."""
    rng = random.Random(seed)
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions, scenes = [], []
    for i in range(n):
        scene = random_scene(rng, two_colour_share)
        images[i] = np.asarray(render(scene, resolution))
        captions.append(caption(scene, rng))
        scenes.append(scene)
    return images, captions, scenes
