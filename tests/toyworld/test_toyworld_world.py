"""The toy world renders deterministically and captions what it draws."""
import random

import numpy as np

from dorabooth.toyworld import world


def test_dataset_is_deterministic():
    a_img, a_cap, _ = world.dataset(40, seed=3)
    b_img, b_cap, _ = world.dataset(40, seed=3)
    c_img, _, _ = world.dataset(40, seed=4)
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)


def test_held_out_combinations_never_drawn():
    rng = random.Random(0)
    seen = {world.random_scene(rng).combination for _ in range(3000)}
    assert not seen & set(world.HELD_OUT)
    assert sum(c[1] is not None for c in seen) > 100  # plenty of two-colour objects


def test_captions_phrase_two_colour_objects_position_first():
    s = world.Scene("square", "red", "blue", pattern="split-lr", colour2="white")
    assert world.describe(s) == "a square, left half red, right half white on a blue background"
    band = world.Scene("circle", "blue", "green", pattern="band", colour2="yellow")
    assert world.describe(band, background=False) == "a blue circle with a thick band of yellow"
    rng = random.Random(1)
    caps = [world.caption(world.random_scene(rng), rng) for _ in range(2000)]
    assert 0.07 < caps.count("") / len(caps) < 0.13


def test_two_colour_halves_are_drawn():
    s = world.Scene("square", "red", "blue", pattern="split-lr", colour2="white")
    img = np.asarray(world.render(s))
    assert tuple(img[16, 10]) == world.COLOURS["red"]
    assert tuple(img[16, 22]) == world.COLOURS["white"]
    assert tuple(img[1, 1]) == world.COLOURS["blue"]
