"""Tiny base-model folders, subject photos and fast TrainConfigs for trainer/generator/CLI tests.

The models are tests/tiny_models.py pipelines saved as diffusers folders (what ``--model``
takes); runs are 2-step, 16 px, rank 4, with 2 class images drawn in 2 sampler steps.
"""

from pathlib import Path

import numpy as np
from PIL import Image

from tiny_models import make_sd15_pipeline, make_sdxl_pipeline


def make_sd2_pipeline(seed: int = 0):
    """SD 2.x-like: OpenCLIP-style (gelu) text encoder and a v-prediction scheduler."""
    from diffusers import DDIMScheduler

    from tiny_models import tiny_text_encoder

    pipe = make_sd15_pipeline(seed)
    pipe.text_encoder = tiny_text_encoder(with_projection=False, seed=seed)
    pipe.text_encoder.config.hidden_act = "gelu"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    return pipe


MAKERS = {"sd15": make_sd15_pipeline, "sdxl": make_sdxl_pipeline, "sd2": make_sd2_pipeline}


def save_model(kind: str, folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        MAKERS[kind]().save_pretrained(folder, safe_serialization=True)
    return folder


def make_subject(folder: Path, n: int = 3, seed: int = 0) -> Path:
    """``n`` small photos of a "subject": a red square on varied backgrounds, odd sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = 24 + 4 * i, 20 + 6 * i
        a = np.empty((h, w, 3), np.uint8)
        a[:] = rng.integers(0, 255, 3)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = (220, 30, 30)
        Image.fromarray(a).save(folder / f"photo{i}.png")
    return folder


def straight_and_resumed(config, a: Path, b: Path) -> tuple[Path, Path]:
    """Train ``config(a)`` straight through, and ``config(b)`` stopped after step 2 then ``--resume``d
    to the end (a 5-step config with checkpoints at 2 and 4); returns both run folders."""
    import threading

    from dorabooth.config import TrainConfig
    from dorabooth.train import train

    train(config(a))
    stop = threading.Event()
    halted = config(b)
    first = train(halted, on_event=lambda e: e["type"] == "step" and e["step"] == 2 and stop.set(), stop=stop)
    assert first.stopped and first.step == 2
    assert train(TrainConfig(**{**halted.to_dict(), "resume": True})).step == 5
    return a, b


def quick(**overrides) -> dict:
    """TrainConfig keyword arguments for a 2-step run (model/images/out must be added); attention
    adapters and the typed token, as the tests using it were written for (the toy default is every
    Linear layer and two pivotal tokens)."""
    return {"class_noun": "dog", "steps": 2, "rank": 4, "lr": 1e-3, "targets": "attn", "num_class_images": 2,
            "pivotal_tokens": 0,
            "class_image_steps": 2, "sample_every": 0, "train_text_encoders": False, "validation_prompts": ["a photo of sks dog"],
            **overrides}
