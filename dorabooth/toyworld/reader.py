"""Read a toy-world image's attributes back by pixel analysis (no learned weights).

`read(image)` -> {"background", "colour", "shape", "position", "size", "pattern",
"colours"}: every pixel gets its nearest palette colour; the background is the commonest
colour on the border; the object is the largest connected blob of other pixels. The
shape is the template (drawn by the world's own code) with the best IoU inside the
object's box; the pattern is the split (left|right, top|bottom, band) whose parts are
each most uniformly coloured, if that beats one colour clearly.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

from .world import COLOURS, POSITIONS, RESOLUTION, SHAPES, SIZES, shape_mask

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)  # (8, 3)
BOX_HEIGHT = {"square": 0.88, "triangle": 0.9, "star": 0.905}  # drawn height / box side
SPLIT_GAP = 1.0  # pixels either side of a split line that count for neither part


def labels(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index of the nearest palette colour."""
    d = ((img[:, :, None, :].astype(np.float32) - PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    seen = np.zeros_like(mask)
    best = np.zeros_like(mask)
    best_n = 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, blob = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(blob) > best_n:
            best_n = len(blob)
            best = np.zeros_like(mask)
            ys, xs = zip(*blob)
            best[list(ys), list(xs)] = True
    return best


@lru_cache(None)
def _template(shape: str, w: int, h: int) -> np.ndarray:
    """The shape's mask stretched to a (h, w) box, at 4x then area-averaged."""
    big = 256
    m = shape_mask(shape, big / 2, big / 2, big * 0.9, big)
    ys, xs = np.nonzero(m)
    crop = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    img = Image.fromarray((crop * 255).astype(np.uint8)).resize((w, h), Image.BOX)
    return np.asarray(img) > 127


def read_shape(mask: np.ndarray, box) -> tuple[str, float]:
    y0, y1, x0, x1 = box
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    ious = {}
    for s in SHAPES:
        t = _template(s, w, h)
        ious[s] = (crop & t).sum() / max(1, (crop | t).sum())
    best = max(ious, key=ious.get)
    return best, float(ious[best])


def _dominant(lab: np.ndarray, part: np.ndarray):
    """(dominant colour index, its pixel count, part size) over a boolean part mask."""
    vals = lab[part]
    if len(vals) == 0:
        return None, 0, 0
    counts = np.bincount(vals, minlength=len(NAMES))
    return int(counts.argmax()), int(counts.max()), len(vals)


def pattern_parts(pattern: str, mask, box, shape: str):
    """Boolean (first, second) parts of the object for a two-colour pattern."""
    y0, y1, x0, x1 = box
    h = y1 - y0
    ys, xs = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    ys, xs = ys + 0.5, xs + 0.5
    cx = (x0 + x1) / 2
    cy = (y0 + y1) / 2
    if shape == "triangle":  # the world centres a triangle's box lower than its bbox
        cy += h * 0.1 / 1.8
    if pattern == "split-lr":
        return mask & (xs < cx - SPLIT_GAP), mask & (xs > cx + SPLIT_GAP)
    if pattern == "split-tb":
        return mask & (ys < cy - SPLIT_GAP), mask & (ys > cy + SPLIT_GAP)
    half_band = h / BOX_HEIGHT.get(shape, 1.0) / 6  # the band is a third of the box side
    d = np.abs(ys - cy)
    return mask & (d > half_band + SPLIT_GAP), mask & (d < half_band - SPLIT_GAP)


def two_colours(lab, mask, box, shape, pattern):
    """(colour of the first part, colour of the second part) for `pattern`, as names."""
    first, second = pattern_parts(pattern, mask, box, shape)
    a, _, _ = _dominant(lab, first)
    b, _, _ = _dominant(lab, second)
    return (None if a is None else NAMES[a], None if b is None else NAMES[b])


def _prepare(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (RESOLUTION, RESOLUTION):
        image = image.resize((RESOLUTION, RESOLUTION), Image.BOX)
    return np.asarray(image)


def read(image) -> dict:
    """Attributes of a toy-world image (PIL image or (H, W, 3) uint8 array)."""
    img = _prepare(image)
    lab = labels(img)
    border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
    bg = int(np.bincount(border, minlength=len(NAMES)).argmax())
    out = {"background": NAMES[bg], "colour": None, "shape": None, "position": None,
           "size": None, "pattern": None, "colours": None}
    mask = largest_blob(lab != bg)
    if mask.sum() < 4:
        return out
    ys, xs = np.nonzero(mask)
    box = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
    shape, _ = read_shape(mask, box)
    out["shape"] = shape
    colour, n_main, n = _dominant(lab, mask)
    out["colour"] = NAMES[colour]
    # size and position from the box
    side = max(box[1] - box[0], box[3] - box[2]) / RESOLUTION
    out["size"] = "large" if side > (SIZES["small"] + SIZES["large"]) / 2 * 0.88 else "small"
    cx = (box[2] + box[3]) / 2 / RESOLUTION
    cy = (box[0] + box[1]) / 2 / RESOLUTION
    out["position"] = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2
                          + (POSITIONS[p][1] - cy) ** 2)
    # one colour, or the split whose parts are most uniform
    whole = n_main / n
    best, best_purity = None, whole + 0.15
    for pattern in ("split-lr", "split-tb", "band"):
        first, second = pattern_parts(pattern, mask, box, shape)
        a, na, ta = _dominant(lab, first)
        b, nb, tb = _dominant(lab, second)
        if a is None or b is None or a == b:
            continue
        purity = (na + nb) / (ta + tb)
        if purity > best_purity:
            best, best_purity = (pattern, NAMES[a], NAMES[b]), purity
    if best is not None:
        out["pattern"], out["colours"] = best[0], best[1:]
    return out
