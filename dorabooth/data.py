"""Subject and class images → training tensors.

Owns: reading user images safely (bounded decoding, EXIF orientation, RGB, alpha composited
on white), skipping unusable ones with a reason, fitting to a square or an aspect bucket
(resize to cover, centre crop, recording SDXL's original size and crop corner), captions
from ``name.txt`` beside an image, the prepared ``instance/`` folder of a run, and the
seeded, resumable order in which examples are drawn.

torch and the file writers are imported inside the functions that use them: the command line
lists and checks ``--images`` (``list_images``) before it loads torch.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
COMPANION_SUFFIXES = (".txt", ".json")   # captions next to the photos, a subject description: not skipped
MAX_PIXELS = 64_000_000           # ~8000 × 8000; bigger files are refused before decoding
MAX_FILE_BYTES = 200 * 2**20
MANIFEST = "manifest.json"


class UnusableImage(ValueError):
    """An input image that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Example:
    """One prepared training image.

    ``original_size`` (h, w) is the size of the photo as given and ``crop_top_left``
    (top, left) the corner of the crop in the resized photo: SDXL's micro-conditioning.
    """

    path: str                            # the prepared PNG (already at ``size``)
    prompt: str
    size: tuple[int, int]                # (h, w) in pixels
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    source: str = ""                     # file name the user gave


# ---- reading ------------------------------------------------------------------------------
def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB image from a user file: EXIF-rotated, alpha composited on white, size-bounded.

    Raises :class:`UnusableImage` (never a bare PIL error) for unreadable files and
    images over ``max_pixels`` (decompression bombs are refused before decoding).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UnusableImage(f"cannot read the file ({e.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise UnusableImage(f"file is {size / 2**20:.0f} MiB; use images under {MAX_FILE_BYTES // 2**20} MiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size                            # header only: nothing decoded yet
                if w * h > max_pixels:
                    raise UnusableImage(f"image is {w}×{h} px ({w * h / 1e6:.0f} MP), over the "
                                        f"{max_pixels / 1e6:.0f} MP limit; downscale it first")
                im.seek(0)                                # first frame of animations
                im.load()
                image = _to_rgb(ImageOps.exif_transpose(im))
        except UnusableImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UnusableImage("image is too large to decode safely (decompression bomb); downscale it") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UnusableImage(f"not a readable image ({type(e).__name__}: {e}); re-save it as PNG or JPEG") from None
    return image


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):     # 16/32-bit greyscale → 8-bit
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def read_caption(image_path: str | Path) -> str | None:
    """The caption in ``name.txt`` beside ``name.jpg`` (first non-empty text), or None."""
    txt = Path(image_path).with_suffix(".txt")
    if not txt.is_file():
        return None
    text = " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
    return text or None


def instance_caption(caption: str | None, token: str, instance_prompt: str) -> str:
    """The training prompt for one subject image.

    No caption → the instance prompt. A caption that names the token is used as written;
    one that does not gets the instance prompt in front ("a photo of sks dog, on a beach").
    """
    if not caption:
        return instance_prompt
    if re.search(rf"(?<!\w){re.escape(token)}(?!\w)", caption):
        return caption
    return f"{instance_prompt}, {caption}"


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file; point --images at the folder that holds the photos")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist; point --images at a folder of photos")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def other_files(folder: str | Path) -> list[Skipped]:
    """The files of an images folder that are not read: neither images nor captions/descriptions
    (``COMPANION_SUFFIXES``) nor hidden; each with the reason (an .svg is a drawing, not a photo)."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        suffix = p.suffix.lower()
        if p.is_file() and not p.name.startswith(".") and suffix not in IMAGE_SUFFIXES + COMPANION_SUFFIXES:
            what = f"{suffix} files are" if suffix else "files without an extension are"
            out.append(Skipped(p.name, f"not an image: {what} not read; save it as .png or .jpg"))
    return out


# ---- geometry -------------------------------------------------------------------------------
def bucket_sizes(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(h, w) sizes, multiples of ``multiple``, with area ≤ resolution² and aspect ≤ ``max_ratio``.

    For each width the tallest allowed height is taken (kohya-style buckets), plus the
    transposes; the square ``resolution × resolution`` is always included.
    """
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    w = multiple
    while w <= resolution * max_ratio:
        h = (area // w) // multiple * multiple
        if h >= multiple and max(h, w) / min(h, w) <= max_ratio:
            sizes.add((h, w))
            sizes.add((w, h))
        w += multiple
    return sorted(sizes)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket (h, w) whose log aspect ratio is closest to the image's; larger area on ties."""
    target = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - target), -hw[0] * hw[1]))


def fit(image: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """Resize to cover ``size`` (h, w), then centre-crop. Returns the crop and its (top, left)."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    rh, rw = max(h, round(image.height * scale)), max(w, round(image.width * scale))
    resized = image.resize((rw, rh), Image.Resampling.LANCZOS) if (rw, rh) != image.size else image
    top, left = (rh - h) // 2, (rw - w) // 2
    return resized.crop((left, top, left + w, top + h)), (top, left)


def to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    """PIL RGB → (3, h, w) float32 in [-1, 1], optionally mirrored left–right."""
    import torch

    a = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)   # (3, h, w)
    if flip:
        a = a.flip(-1)
    return a.float().div(127.5).sub(1.0)


def flipped_crop_left(example: Example) -> int:
    """SDXL crop corner's ``left`` after a horizontal flip of the resized photo."""
    top, left = example.crop_top_left
    h0, w0 = example.original_size
    h, w = example.size
    resized_w = max(w, round(w0 * max(h / h0, w / w0)))
    return resized_w - w - left


# ---- what a person would notice by eye ------------------------------------------------------
BLANK_STD = 4.0          # luminance standard deviation (of 0–255) below which a photo is blank
SUBJECT_DISTANCE = 48.0  # RGB distance (of 0–255 per channel) from the background that counts as subject


def looks_blank(image: Image.Image) -> bool:
    """Near-uniform pixels (an empty, black or blown-out photo): the luminance of a 64 × 64
    thumbnail varies by less than ``BLANK_STD`` of 255."""
    thumb = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
    return float(thumb.std()) < BLANK_STD


def cut_off_share(image: Image.Image, size: tuple[int, int]) -> float:
    """The share (0–1) of the subject that :func:`fit` to ``size`` (h, w) crops away.

    "Subject" is what stands out from the background, joined to the middle of the crop:
    pixels further than ``SUBJECT_DISTANCE`` from a background drawn in from the photo's
    border (a Coons patch through the four edges, each median-smoothed so a subject touching
    one briefly does not count as background; linear gradients are reproduced exactly), kept
    where they connect (4-neighbours) to the centre half of the crop. So a subject that runs
    past the crop counts, and a separate object at the side does not. When the border itself
    is busy (its median pixel is off that background by a quarter of the threshold), or
    what stands out is under 1 % or over 60 % of the photo, there is no telling, and the
    answer is 0.
    """
    rgb = image.convert("RGB")
    scale = 128 / max(rgb.size)
    w, h = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
    a = np.asarray(rgb.resize((w, h), Image.Resampling.BOX), dtype=np.float32)      # (h, w, 3)
    if min(h, w) < 8:
        return 0.0
    distance = np.linalg.norm(a - _border_background(a), axis=-1)                     # (h, w)
    ring = np.concatenate([distance[0], distance[-1], distance[:, 0], distance[:, -1]])
    subject = distance > SUBJECT_DISTANCE
    if np.median(ring) > SUBJECT_DISTANCE / 4 or not 0.01 <= subject.mean() <= 0.6:
        return 0.0                                   # a busy border: no background to tell a subject from
    ch, cw = size                                # the crop in thumbnail pixels: fit's centre crop
    keep_w = min(w, round(h * cw / ch)) if w * ch > h * cw else w
    keep_h = min(h, round(w * ch / cw)) if w * ch < h * cw else h
    top, left = (h - keep_h) // 2, (w - keep_w) // 2
    centre = np.zeros_like(subject)
    centre[top + keep_h // 4:top + keep_h - keep_h // 4, left + keep_w // 4:left + keep_w - keep_w // 4] = True
    subject = _connected(subject, centre)
    if not subject.any():
        return 0.0
    kept = subject[top:top + keep_h, left:left + keep_w].sum()
    return float(1 - kept / subject.sum())


def _connected(mask: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` (h, w) 4-connected to those of ``seed`` (h, w): grown one step at a time."""
    region = mask & seed
    while True:
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if np.array_equal(grown, region):
            return region
        region = grown


def _border_background(a: np.ndarray) -> np.ndarray:
    """(h, w, 3) background guessed from the border alone: a Coons patch (bilinear blend)
    through the top, bottom, left and right edges, each median-filtered over a quarter of it."""
    h, w, _ = a.shape
    top, bottom, left, right = (_median_smooth(e) for e in (a[0], a[-1], a[:, 0], a[:, -1]))
    u = np.linspace(0, 1, w)[None, :, None]       # (1, w, 1) left → right
    v = np.linspace(0, 1, h)[:, None, None]       # (h, 1, 1) top → bottom
    edges = (1 - v) * top[None] + v * bottom[None] + (1 - u) * left[:, None] + u * right[:, None]
    corners = ((1 - u) * (1 - v) * top[0] + u * (1 - v) * top[-1] + (1 - u) * v * bottom[0] + u * v * bottom[-1])
    return edges - corners


def _median_smooth(edge: np.ndarray) -> np.ndarray:
    """(n, 3) → (n, 3): a running median over n/4 pixels (edges padded by repetition)."""
    k = max(3, len(edge) // 4) | 1
    padded = np.pad(edge, ((k // 2, k // 2), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, k, axis=0)          # (n, 3, k)
    return np.median(windows, axis=-1)


# ---- preparing a folder ---------------------------------------------------------------------
def prepare_images(
    src: str | Path,
    dst: str | Path,
    *,
    resolution: int,
    multiple: int,
    buckets: bool,
    prompt_for,
    min_side: int | None = None,
    on_skip=None,
) -> tuple[list[Example], list[Skipped]]:
    """Validate the images in ``src`` and write them, fitted, as PNGs into ``dst``.

    ``prompt_for(caption_or_None) -> str`` builds each prompt. Images whose short side is
    below ``min_side`` (default resolution / 2) or that cannot be read are skipped with a
    reason (``on_skip(Skipped)`` is called for each). A ``manifest.json`` records every
    example; raises ``ValueError`` naming the folder when no image is left.
    """
    from .formats.files import atomic_file

    src, dst = Path(src), Path(dst)
    min_side = resolution // 2 if min_side is None else min_side
    sizes = bucket_sizes(resolution, multiple) if buckets else [(resolution, resolution)]
    dst.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    skipped: list[Skipped] = []
    paths = list_images(src)
    for skip in other_files(src):
        skipped.append(skip)
        if on_skip is not None:
            on_skip(skip)
    for i, path in enumerate(paths):
        try:
            image = subject_image(path, resolution, min_side)
        except UnusableImage as e:
            skip = Skipped(path.name, str(e))
            skipped.append(skip)
            if on_skip is not None:
                on_skip(skip)
            continue
        size = nearest_bucket(image.width, image.height, sizes)
        crop, corner = fit(image, size)
        out = dst / f"{i:03d}-{_safe_stem(path.stem)}.png"
        with atomic_file(out) as tmp:                 # a full disk leaves no half-written photo
            crop.save(tmp, format="PNG")
        examples.append(Example(out.name, prompt_for(read_caption(path)), size,
                                (image.height, image.width), corner, path.name))
    if not examples:
        raise _no_usable_images(src, skipped)
    write_manifest(dst, examples, skipped)
    return examples, skipped


def subject_image(path: Path, resolution: int, min_side: int | None = None) -> Image.Image:
    """A subject photo as :func:`load_image` reads it, refused (:class:`UnusableImage`) when its
    short side is below ``min_side`` (default resolution / 2)."""
    min_side = resolution // 2 if min_side is None else min_side
    image = load_image(path)
    if min(image.size) < min_side:
        raise UnusableImage(f"image is {image.width}×{image.height} px; the short side must be at "
                            f"least {min_side} px for resolution {resolution} (use a larger photo "
                            f"or a lower --resolution)")
    return image


def check_images(src: str | Path, resolution: int) -> list[Skipped]:
    """The test :func:`prepare_images` applies, without writing anything: raises ``ValueError``
    when no image in ``src`` is usable at ``resolution``; returns the ones that would be skipped."""
    paths = list_images(src)
    skipped, usable = other_files(src), 0
    for path in paths:
        try:
            subject_image(path, resolution)
            usable += 1
        except UnusableImage as e:
            skipped.append(Skipped(path.name, str(e)))
    if not usable:
        raise _no_usable_images(src, skipped)
    return skipped


def _no_usable_images(src, skipped: list[Skipped]) -> ValueError:
    reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:5]) or "the folder has no image files"
    return ValueError(f"no usable images in {src} ({reasons}); add 3–20 photos of the subject "
                      f"({', '.join(IMAGE_SUFFIXES)})")


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60].strip("._") or "image"


def write_manifest(folder: Path, examples: list[Example], skipped: list[Skipped]) -> None:
    from .formats.files import write_json

    data = {"examples": [asdict(e) for e in examples], "skipped": [asdict(s) for s in skipped]}
    write_json(folder / MANIFEST, data)


def read_manifest(folder: str | Path) -> tuple[list[Example], list[Skipped]]:
    data = json.loads((Path(folder) / MANIFEST).read_text())
    examples = [Example(**{**e, "size": tuple(e["size"]), "original_size": tuple(e["original_size"]),
                           "crop_top_left": tuple(e["crop_top_left"])}) for e in data["examples"]]
    return examples, [Skipped(**s) for s in data["skipped"]]


def class_examples(folder: str | Path, prompt: str, size: tuple[int, int],
                   on_skip=None) -> tuple[list[Example], list[Image.Image]]:
    """The usable images of a class folder, fitted to ``size``, with the class prompt."""
    examples, images = [], []
    for path in list_images(folder):
        try:
            image = load_image(path)
        except UnusableImage as e:
            if on_skip is not None:
                on_skip(Skipped(path.name, str(e)))
            continue
        crop, corner = fit(image, size)
        examples.append(Example(str(path), prompt, size, (image.height, image.width), corner, path.name))
        images.append(crop)
    return examples, images


# ---- order ----------------------------------------------------------------------------------
def batch_stream(groups: dict[tuple[int, int], list[int]], batch_size: int, seed: int,
                 start: int = 0) -> Iterator[list[int]]:
    """Endless batches of example indices, each from one size group, in a seeded order.

    Every epoch shuffles all indices with ``seed + epoch``, walks them, and emits a batch
    whenever a group has ``batch_size`` pending (a group smaller than the batch fills up
    with repeats). The order depends only on (seed, batch number), so ``start`` skips to
    batch ``start`` exactly: that is how --resume restores the data order.
    """
    import torch

    n = sum(len(v) for v in groups.values())
    group_of = {i: key for key, idxs in groups.items() for i in idxs}
    produced = 0
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        all_idx = sorted(group_of)
        pending: dict[tuple[int, int], list[int]] = {}
        for pos in order:
            i = all_idx[pos]
            bucket = pending.setdefault(group_of[i], [])
            bucket.append(i)
            if len(bucket) == batch_size:
                if produced >= start:
                    yield list(bucket)
                produced += 1
                bucket.clear()
        for key, rest in pending.items():              # leftovers: top up with repeats
            if rest:
                pool = groups[key]
                batch = (rest + pool * batch_size)[:batch_size]
                if produced >= start:
                    yield batch
                produced += 1
        epoch += 1
