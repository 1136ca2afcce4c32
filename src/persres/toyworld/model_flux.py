"""The toy world's Flux-shaped model: Flux.1's classes at toy size.

- ``FluxTransformer2DModel``: 2 double-stream and 4 single-stream blocks, 6 heads of 32 (width 192; the
  rope axes (8, 12, 12) sum to the head width), 32 input channels: the U-Net world's 8-channel latents
  packed 2x2 (FluxPipeline reads ``in_channels // 4`` latent channels), so a 32x32 image is 16x16x8
  latents, 64 tokens. No guidance embedding (``guidance_embeds=False``, as Flux.1 [schnell]): the toy is
  trained by flow matching and never guidance-distilled, so there is nothing a guidance input could have
  learned; sampling uses true classifier-free guidance (FluxPipeline's ``true_cfg_scale`` with a
  ``negative_prompt``, "" for the empty caption the model was trained on 10% of the time).
- ``CLIPTextModel`` for the pooled embedding: the U-Net world's word-level tokenizer and text model.
- ``T5EncoderModel`` for the sequence (T5 v1.1's gated-GELU, width 64, 2 layers) with a T5 tokenizer
  in which every toy word is one token (``persres.testing.tiny.t5_word_tokenizer``), prompts padded to
  32 tokens (the tokenizer's ``model_max_length``; the longest toy caption is 14). Not FluxPipeline's
  default 512: Flux has no text mask, so the transformer reads every padding token, and 512 of them
  beside 64 image tokens make a training step 8x as long on a CPU (width 128, batch 32, one thread:
  3.5 s against 0.42 s) and every sampling step about as much. Sampling passes
  ``max_sequence_length=32``, as users of Flux.1 [schnell] pass its 256.
- ``AutoencoderKL``: the U-Net world's trained VAE (``models/toyworld-base/vae``), its weights as they are;
  only ``shift_factor`` (the latents' mean) and ``scaling_factor`` (1 / their std about it) are set, as
  Flux's VAE states them and FluxPipeline reads them.
- ``FlowMatchEulerDiscreteScheduler`` with Flux.1-dev's settings (dynamic shifting: the training table is
  unshifted, sampling shifts by the image's token count).

Saved as a normal diffusers folder, it loads with ``FluxPipeline.from_pretrained``; sample at
``height=32, width=32`` (FluxPipeline's default size is 1024) with ``max_sequence_length=32``,
``negative_prompt=""`` and ``true_cfg_scale`` above 1.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from persres.testing.tiny import t5_encoder_config, t5_word_tokenizer
from persres.toyworld.model import LATENT_CHANNELS, TEXT_WIDTH, toy_text_encoder, toy_tokenizer
from persres.toyworld.scenes import vocabulary

T5_WIDTH = 64
HEAD_WIDTH = 32
ROPE_AXES = (8, 12, 12)  # (unused, row, column): sums to HEAD_WIDTH
ToyFlux = FluxPipeline  # what ``toy_flux_pipeline`` builds, named for the trainer
SCHEDULER = {  # Flux.1-dev's scheduler_config.json
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def flux_tokenizers(text_length: int) -> tuple[CLIPTokenizer, T5Tokenizer]:
    """The CLIP word tokenizer (24 tokens) and the T5 word tokenizer (``text_length`` tokens)."""
    return toy_tokenizer(), t5_word_tokenizer(vocabulary(), max_length=text_length)


def toy_t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    config = t5_encoder_config(
        tokenizer, T5_WIDTH, head_width=16, ff=2 * T5_WIDTH, buckets=16, max_distance=32
    )
    return T5EncoderModel(config)


def toy_flux_transformer(heads: int = 6, double: int = 2, single: int = 4) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=HEAD_WIDTH,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=ROPE_AXES,
    )


def flux_text_encoders(
    tokenizer: CLIPTokenizer, tokenizer_2: T5Tokenizer
) -> tuple[CLIPTextModel, T5EncoderModel]:
    return toy_text_encoder(tokenizer), toy_t5_encoder(tokenizer_2)


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, pixels: torch.Tensor) -> tuple[float, float]:
    """(mean, std about it) of the posterior means of ``pixels``: Flux's ``shift_factor`` and
    1 / ``scaling_factor``."""
    latents = vae.encode(pixels).latent_dist.mean
    return latents.mean().item(), latents.std().item()


def as_flux_vae(vae: AutoencoderKL, shift: float, std: float) -> AutoencoderKL:
    """``vae`` (the U-Net world's) stating its latents' shift and scale as Flux's VAE does."""
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    return vae


def toy_flux_pipeline(
    vae: AutoencoderKL, text_length: int, heads: int = 6, double: int = 2, single: int = 4
) -> FluxPipeline:
    """A fresh toy Flux pipeline around ``vae``: random transformer and text encoders (torch's seed)."""
    tokenizer, tokenizer_2 = flux_tokenizers(text_length)
    text_encoder, text_encoder_2 = flux_text_encoders(tokenizer, tokenizer_2)
    transformer = toy_flux_transformer(heads, double, single)
    return assemble_flux(transformer, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2)


def assemble_flux(
    transformer: FluxTransformer2DModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    text_encoder_2: T5EncoderModel,
    tokenizer: CLIPTokenizer,
    tokenizer_2: T5Tokenizer,
) -> FluxPipeline:
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
