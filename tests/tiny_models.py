"""Tiny SD1.5- and SDXL-architecture pipelines built from configs, and fixed inputs for them.

No downloads: every component is built from a config with random weights (seeded), and the
tokenizer comes from `tests/assets/tiny-clip-tokenizer/`. The shapes keep every test fast on
one CPU thread while exercising the real diffusers/transformers classes. Imports neither
pytest nor dorabooth, so the compat checks (tests/compat/) can use it under another stack.
"""

from pathlib import Path

import torch

ASSETS = Path(__file__).parent / "assets"
TOKENIZER_DIR = ASSETS / "tiny-clip-tokenizer"


def tiny_tokenizer():
    from transformers import CLIPTokenizer

    # Not CLIPTokenizer(vocab_file=…): transformers 5 ignores the files there.
    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


def tiny_text_encoder(with_projection: bool = False, hidden: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=523,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu" if not with_projection else "gelu",
        bos_token_id=521,
        eos_token_id=522,
        pad_token_id=522,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
        mid_block_add_attention=False,
    ).eval()


def _tiny_unet(seed: int, **arch):
    """A small UNet2DConditionModel: 4 latent channels, blocks (16, 32), one layer each."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, **arch).eval()


def tiny_sd15_unet(seed: int = 0):
    return _tiny_unet(
        seed,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )


def tiny_sdxl_unet(seed: int = 0):
    return _tiny_unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32) hidden states
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids × 8 + pooled text_encoder_2 (32)
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


def make_sd15_pipeline(seed: int = 0):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed=seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_sd15_unet(seed),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def make_sdxl_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed=seed),
        text_encoder_2=tiny_text_encoder(with_projection=True, seed=seed + 1),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_sdxl_unet(seed),
        scheduler=_scheduler(),
    )


MAKERS = {"sd15": make_sd15_pipeline, "sdxl": make_sdxl_pipeline}


def unet_inputs(pipe, batch: int = 2, seed: int = 1) -> dict:
    """Random but fixed UNet inputs matching the pipeline's architecture."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    size = unet.config.sample_size
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return inputs


def text_inputs(pipe, prompts=("a photo of sks dog", "the dog")) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


# ---- outputs and adapters ------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error used by the interop checks (b is the reference)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def unet_output(pipe) -> torch.Tensor:
    return pipe.unet(**unet_inputs(pipe)).sample


@torch.no_grad()
def text_encoder_output(pipe, component: str = "text_encoder") -> torch.Tensor:
    """Penultimate and last hidden states (and projected embeds for SDXL's second encoder), concatenated."""
    out = getattr(pipe, component)(text_inputs(pipe), output_hidden_states=True)
    parts = [out.hidden_states[-2].flatten(), out.last_hidden_state.flatten()]
    if getattr(out, "text_embeds", None) is not None:
        parts.append(out.text_embeds.flatten())
    return torch.cat(parts)


def text_encoder_names(pipe) -> list[str]:
    return [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


@torch.no_grad()
def randomize_adapter_params(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> int:
    """Give every adapter parameter (ours or PEFT's) non-trivial random values; returns how many.

    lora_A/lora_B ~ N(0, std²); magnitudes = their current value (‖W0‖ at init) × (1 + N(0, 0.1²)).
    """
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif "lora_A" in name or "lora_B" in name:
            p.copy_(std * torch.randn(p.shape, generator=g))
        else:
            continue
        n += 1
    return n
