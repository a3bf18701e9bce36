"""Subject images: safe reading, skipping with reasons, crops and buckets, captions, data order."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dorabooth import data


def _save(path, size=(40, 30), mode="RGB", color=(200, 30, 30), **kw):
    Image.new(mode, size, color).save(path, **kw)
    return path


def test_rgba_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 10, 20))
    im.save(tmp_path / "a.png")
    out = np.asarray(data.load_image(tmp_path / "a.png"))
    assert out.shape == (20, 20, 3)
    assert tuple(out[5, 15]) == (255, 255, 255)          # transparent → white
    assert tuple(out[5, 2]) == (0, 0, 255)


@pytest.mark.parametrize("mode,color", [("L", 128), ("P", 3), ("CMYK", (0, 255, 255, 0)), ("LA", (10, 255)),
                                        ("I;16", 65535)])
def test_modes_become_rgb(tmp_path, mode, color):
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    Image.new(mode, (16, 12), color).save(path)
    im = data.load_image(path)
    assert im.mode == "RGB" and im.size == (16, 12)
    if mode == "I;16":
        assert np.asarray(im).min() == 255                 # full-scale 16-bit white stays white


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))             # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                      # rotate 90° clockwise to display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = data.load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)                           # portrait after transposing
    a = np.asarray(out).mean(axis=(1, 2))
    assert a[:8].mean() > 200 and a[-8:].mean() < 50      # the stripe is now at the top


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = _save(tmp_path / "big.png", size=(3000, 3000), mode="L", color=0)
    with pytest.raises(data.UnusableImage, match="MP limit"):
        data.load_image(path, max_pixels=1_000_000)


def test_unreadable_file_reason(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(data.UnusableImage, match="not a readable image"):
        data.load_image(tmp_path / "fake.jpg")
    # truncated PNG
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(data.UnusableImage):
        data.load_image(tmp_path / "cut.png")


def test_prepare_skips_bad_images_with_reasons(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _save(src / "good.png", size=(40, 30))
    _save(src / "tiny.png", size=(5, 5))
    (src / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (src / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")   # a drawing, not a photo
    (src / "good.txt").write_text("on a beach")             # a caption and a subject description: not skipped
    (src / "subject.json").write_text("{}")
    (src / ".DS_Store").write_bytes(b"\0")                  # hidden: not skipped
    skipped = []
    examples, skips = data.prepare_images(src, tmp_path / "dst", resolution=16, multiple=8, buckets=False,
                                          prompt_for=lambda c: "a photo of sks dog", on_skip=skipped.append)
    assert [e.source for e in examples] == ["good.png"]
    assert {s.path for s in skips} == {"logo.svg", "tiny.png", "broken.jpg"} == {s.path for s in skipped}
    assert any("short side" in s.reason for s in skips)
    assert skips[0].reason == "not an image: .svg files are not read; save it as .png or .jpg"
    assert data.check_images(src, 16) == skips                 # what the trainer's preflight reports
    out = Image.open(tmp_path / "dst" / examples[0].path)
    assert out.size == (16, 16)
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    assert len(manifest["examples"]) == 1 and len(manifest["skipped"]) == 3
    again, _ = data.read_manifest(tmp_path / "dst")
    assert again == examples


def test_no_usable_images_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"no usable images in .*a.png"):
        data.prepare_images(src, tmp_path / "dst", resolution=16, multiple=8, buckets=False,
                            prompt_for=lambda c: "x")
    with pytest.raises(FileNotFoundError, match="--images"):
        data.list_images(tmp_path / "missing")


def test_fit_center_crop_records_sdxl_geometry():
    im = Image.new("RGB", (100, 50))
    crop, (top, left) = data.fit(im, (32, 32))
    assert crop.size == (32, 32)
    assert (top, left) == (0, (64 - 32) // 2)             # resized to 64×32, cropped in the middle


def test_buckets_keep_area_and_pick_nearest_aspect():
    sizes = data.bucket_sizes(64, 8)
    assert (64, 64) in sizes
    assert all(h % 8 == 0 and w % 8 == 0 and h * w <= 64 * 64 and max(h, w) / min(h, w) <= 2 for h, w in sizes)
    h, w = data.nearest_bucket(200, 100, sizes)              # wide image → a wide bucket
    assert w > h
    assert data.nearest_bucket(50, 50, sizes) == (64, 64)


def test_prepare_with_buckets_keeps_aspect(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _save(src / "wide.png", size=(80, 40))
    _save(src / "tall.png", size=(40, 80))
    examples, _ = data.prepare_images(src, tmp_path / "dst", resolution=32, multiple=8, buckets=True,
                                      prompt_for=lambda c: "p")
    sizes = {e.source: e.size for e in examples}
    assert sizes["wide.png"][1] > sizes["wide.png"][0] and sizes["tall.png"][0] > sizes["tall.png"][1]


def _scene(width, height, shapes, seed=0):
    """A photo-like RGB image: a diagonal gradient, a little noise, filled rectangles (x0, y0, x1, y1, rgb)."""
    yy, xx = np.mgrid[0:height, 0:width]
    a = np.stack([xx / width * 200 + 30, yy / height * 150 + 60, np.full(xx.shape, 110.0)], -1)
    a += np.random.default_rng(seed).normal(0, 3, a.shape)
    for x0, y0, x1, y1, rgb in shapes:
        a[y0:y1, x0:x1] = rgb
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_a_blank_photo_is_recognised():
    assert data.looks_blank(Image.new("RGB", (300, 200), (250, 250, 248)))           # white
    assert data.looks_blank(Image.new("L", (64, 64), 3))                             # black
    noisy = np.random.default_rng(0).normal(128, 2, (120, 160, 3)).clip(0, 255).astype(np.uint8)
    assert data.looks_blank(Image.fromarray(noisy))                                 # sensor noise only
    assert not data.looks_blank(_scene(160, 120, [(60, 40, 100, 80, (200, 20, 20))]))


def test_the_share_of_the_subject_the_square_crop_cuts_off():
    wide, square = (300, 150), (64, 64)                   # the crop keeps the middle 150 × 150
    centred = _scene(*wide, [(110, 40, 190, 110, (220, 20, 20))])
    assert data.cut_off_share(centred, square) == 0
    long = _scene(*wide, [(30, 50, 270, 100, (20, 20, 220))])                       # a dachshund, side on
    assert data.cut_off_share(long, square) == pytest.approx(1 - 150 / 240, abs=0.03)
    tall = _scene(150, 300, [(55, 20, 95, 280, (30, 30, 30))])                       # a person, head to toe
    assert data.cut_off_share(tall, square) == pytest.approx(1 - 150 / 260, abs=0.03)
    assert data.cut_off_share(tall, (64, 32)) == 0                                   # a tall bucket keeps it
    aside = _scene(*wide, [(130, 55, 170, 95, (220, 20, 20)), (10, 60, 40, 90, (240, 240, 20))])
    assert data.cut_off_share(aside, square) == 0                                    # a separate thing at the side
    assert data.cut_off_share(_scene(150, 150, [(0, 40, 150, 110, (20, 20, 220))]), square) == 0   # nothing cropped


@pytest.mark.parametrize("block", [1, 4, 16])
def test_a_busy_background_gives_no_cut_off_verdict(block):
    rng = np.random.default_rng(block)
    texture = rng.uniform(0, 255, (150 // block + 1, 300 // block + 1, 3)).repeat(block, 0).repeat(block, 1)
    image = Image.fromarray(texture[:150, :300].astype(np.uint8))
    assert data.cut_off_share(image, (64, 64)) == 0
    assert not data.looks_blank(image)


def test_captions(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  sks dog\n on a beach ")
    _save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("on the grass")
    _save(tmp_path / "c.png")
    base = "a photo of sks dog"
    assert data.instance_caption(data.read_caption(tmp_path / "a.png"), "sks", base) == "sks dog on a beach"
    assert data.instance_caption(data.read_caption(tmp_path / "b.png"), "sks", base) == f"{base}, on the grass"
    assert data.instance_caption(data.read_caption(tmp_path / "c.png"), "sks", base) == base
    assert data.instance_caption("tasks galore", "sks", base).startswith(base)   # token must be a word


def test_to_tensor_and_flip():
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), (255, 255, 255))
    t = data.to_tensor(im)
    assert t.shape == (3, 2, 4) and t.min() == -1 and t.max() == 1
    assert t[0, 0, 0] == 1 and data.to_tensor(im, flip=True)[0, 0, 3] == 1


def test_flipped_crop_left_mirrors_the_crop():
    e = data.Example("p", "x", (32, 32), (50, 100), (0, 10), "s")   # resized 64 wide, crop at left 10
    assert data.flipped_crop_left(e) == 64 - 32 - 10


def test_batch_stream_is_seeded_resumable_and_covers_every_image():
    groups = {(16, 16): [0, 1, 2, 3, 4], (16, 24): [5, 6]}
    stream = data.batch_stream(groups, 2, seed=3)
    first = [next(stream) for _ in range(12)]
    for batch in first:
        assert len(batch) == 2 and len({tuple(groups_key(groups, i)) for i in batch}) == 1
    assert set(i for b in first[:4] for i in b) <= set(range(7))
    assert sorted({i for b in first for i in b}) == list(range(7))
    resumed = data.batch_stream(groups, 2, seed=3, start=5)
    assert [next(resumed) for _ in range(7)] == first[5:]
    other = data.batch_stream(groups, 2, seed=4)
    assert [next(other) for _ in range(12)] != first


def groups_key(groups, i):
    return next(k for k, v in groups.items() if i in v)


def test_class_examples_fit_every_size(tmp_path):
    _save(tmp_path / "c0.png", size=(30, 30))
    (tmp_path / "bad.png").write_bytes(b"x")
    skipped = []
    examples, images = data.class_examples(tmp_path, "a photo of dog", (16, 8), on_skip=skipped.append)
    assert len(examples) == 1 and images[0].size == (8, 16) and examples[0].prompt == "a photo of dog"
    assert skipped[0].path == "bad.png"
    assert torch.is_tensor(data.to_tensor(images[0]))
