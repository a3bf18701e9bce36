"""The toy model's architecture: stock diffusers / transformers classes, SDXL layout, tiny.

32 px images -> a 2x VAE -> 16x16x4 latents. The UNet's first (16x16) level has no
attention (cross-attention there cost ~6x per step on CPU); cross-attention runs at 8x8
and 4x4 and in the mid block. Two causal CLIP text encoders (hidden 64) are concatenated
to a 128-dim context, as SDXL does; text encoder 2's projection feeds `text_time`.
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TEXT_HIDDEN = 64
TIME_EMBED_DIM = 8  # addition_time_embed_dim; SDXL's time ids are 6 numbers


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
        force_upcast=False,
    )


def text_config(vocab_size: int, bos: int, eos: int, projection_dim: int = TEXT_HIDDEN):
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=projection_dim, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
    )


def make_text_encoders(vocab_size: int, bos: int, eos: int):
    te1 = CLIPTextModel(text_config(vocab_size, bos, eos))
    te2 = CLIPTextModelWithProjection(text_config(vocab_size, bos, eos))
    return te1, te2


def make_unet(channels=(32, 64, 128)) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=channels, layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=(1, 2, 4),  # diffusers' name for the number of heads
        transformer_layers_per_block=1, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * TIME_EMBED_DIM,
    )


def make_scheduler() -> DDIMScheduler:
    """DDPM linear betas, v-prediction (epsilon ignored captions at this budget)."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="trailing",
    )
