"""The recipe runs end to end in a few steps; the shipped model loads with stock diffusers."""
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from dorabooth.toyworld import build

ASSET = Path(__file__).resolve().parents[2] / "assets" / "toy-sdxl"


def test_five_step_recipe_makes_a_loadable_pipeline(tmp_path):
    events = []
    folder = build(tmp_path / "toy", steps=5, seed=1, on_event=events.append)
    stages = {e["stage"] for e in events}
    assert {"data", "vae", "latents", "decoder", "joint", "pipeline"} <= stages
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert (folder / "tokenizer" / "vocab.json").exists()
    assert (folder / "tokenizer" / "merges.txt").exists()
    image = pipe("a red star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.skipif(not (ASSET / "model_index.json").exists(),
                    reason="assets/toy-sdxl not built yet (python -m dorabooth.toyworld build)")
def test_shipped_model_loads_with_stock_diffusers_and_draws_64px():
    pipe = StableDiffusionXLPipeline.from_pretrained(ASSET)
    assert sum(f.stat().st_size for f in ASSET.rglob("*") if f.is_file()) <= 25 * 2**20
    assert not list(ASSET.rglob("*.bin")) and not list(ASSET.rglob("*.pt"))
    g = torch.Generator().manual_seed(0)
    out = pipe("a red circle on a blue background", height=64, width=64,
               num_inference_steps=4, generator=g, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(out)).all()
