"""The toy world's text-to-image model: Stable Diffusion's classes at toy size.

A word-level CLIP tokenizer and ``CLIPTextModel`` (hidden 64, 2 layers), an ``AutoencoderKL`` from
3x32x32 to 8x16x16 (8 latent channels so patterns survive the round trip), a
``UNet2DConditionModel`` on 16x16 latents with a plain block at 16x16 and cross-attention
transformer blocks (with ``proj_out``) at 8x8 and 4x4, and a DDIM scheduler with SD 1.x's betas.
Saved as a normal diffusers folder, it loads with ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from persres.testing.tiny import word_tokenizer
from persres.toyworld.scenes import SIZE, vocabulary

MAX_TOKENS = 24  # the longest toy prompt is 16 tokens with start and end
LATENT_CHANNELS = 8
TEXT_WIDTH = 64
BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def toy_tokenizer() -> CLIPTokenizer:
    return word_tokenizer(vocabulary(), max_length=MAX_TOKENS)


def toy_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            eos_token_id=end,
            pad_token_id=end,
        )
    )


def toy_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        layers_per_block=1,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def deterministic_posterior(vae: AutoencoderKL) -> None:
    """Make the encoder's log-variance head say what the toy VAE is: deterministic.

    The toy VAE is trained on its posterior mean only (KL weight 1e-7), so its log-variance drifts
    to 0 (std 1, about as large as the latents themselves) while no decoder ever saw a sampled
    latent. Training code that samples the posterior, as diffusers' scripts and persres do, would
    then see latents buried in noise. Zeroing the head's weights and setting its bias to -30
    (diffusers' clamp) gives std e^-15: ``sample()`` equals ``mean`` and nothing else changes.
    """
    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:].zero_()
        vae.quant_conv.bias[half:].fill_(-30.0)


def toy_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers' name for the number of heads
        norm_num_groups=32,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**BETAS, clip_sample=False)


def sampling_scheduler() -> DDIMScheduler:
    # clip_sample=False: latents are not in [-1, 1]; clipping them washes images out.
    return DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def assemble(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
