"""The toy world and the tiny SDXL-architecture model the project trains itself (DESIGN §8).

- `world`: seeded PIL scenes and captions; `tokenizer`: the CLIP-compatible BPE files;
- `models`: the stock diffusers/transformers classes in SDXL's layout, tiny;
- `recipe.build`: trains the model from scratch (resumable); `reader.read`: attributes of
  an image by pixel analysis; `scoring.evaluate`: caption-following scores.
"""
__all__ = ["Recipe", "build", "read", "evaluate"]


def __getattr__(name):
    """``Recipe`` and ``build`` load the recipe (and diffusers) on first use, so the world,
    its tokenizer and the reader import in milliseconds."""
    if name in ("Recipe", "build"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read(image):
    """Attributes of a toy-world image (see `reader.read`)."""
    from .reader import read as _read

    return _read(image)


def evaluate(pipe, n=200, seed=1234, **kwargs):
    """Caption-following scores of a pipeline (see `scoring.evaluate`)."""
    from .scoring import evaluate as _evaluate

    return _evaluate(pipe, n=n, seed=seed, **kwargs)
