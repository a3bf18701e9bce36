"""The toy world and the tiny SDXL-architecture model the project trains itself (DESIGN §8).

- `world`: seeded PIL scenes and captions; `tokenizer`: the CLIP-compatible BPE files;
- `models`: the stock diffusers/transformers classes in SDXL's layout, tiny;
- `recipe.build`: trains the model from scratch (resumable); `reader.read`: attributes of
  an image by pixel analysis; `scoring.evaluate`: caption-following scores.
"""
from .recipe import Recipe, build

__all__ = ["Recipe", "build", "read", "evaluate"]


def read(image):
    """Attributes of a toy-world image (see `reader.read`)."""
    from .reader import read as _read

    return _read(image)


def evaluate(pipe, n=200, seed=1234, **kwargs):
    """Caption-following scores of a pipeline (see `scoring.evaluate`)."""
    from .scoring import evaluate as _evaluate

    return _evaluate(pipe, n=n, seed=seed, **kwargs)
