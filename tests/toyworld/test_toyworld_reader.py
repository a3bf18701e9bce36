"""The attribute reader is >= 98 % right per attribute on fresh renders."""
import random

from dorabooth.toyworld import read, world


def test_reader_accuracy_on_fresh_renders():
    rng = random.Random(2024)
    hits: dict[str, list[bool]] = {}
    for _ in range(400):
        s = world.random_scene(rng, exclude=())
        r = read(world.render(s))
        checks = {"background": r["background"] == s.background, "shape": r["shape"] == s.shape,
                  "position": r["position"] == s.position, "size": r["size"] == s.size,
                  "pattern": r["pattern"] == s.pattern}
        if s.pattern is None:
            checks["colour"] = r["colour"] == s.colour
        else:
            checks["colours"] = r["colours"] == (s.colour, s.colour2)
        for k, ok in checks.items():
            hits.setdefault(k, []).append(ok)
    accuracy = {k: sum(v) / len(v) for k, v in hits.items()}
    assert min(accuracy.values()) >= 0.98, accuracy


def test_reader_handles_64px_and_held_out_subjects():
    for shape, pattern, a, b in world.HELD_OUT:
        s = world.Scene(shape, a, "black", pattern=pattern, colour2=b)
        r = read(world.render(s, resolution=64))
        assert (r["shape"], r["pattern"], r["colours"]) == (shape, pattern, (a, b))
