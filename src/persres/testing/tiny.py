"""Tiny, randomly initialised Stable Diffusion and Flux pipelines built from configs.

Nothing is downloaded: the same diffusers/transformers classes as Stable Diffusion and Flux.1, a few
thousand parameters each, saved as a normal diffusers folder that every persres command loads
through ``--base`` like a real checkpoint. Used by the tests. Images it
makes are noise: it has never been trained.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    ViTConfig,
    ViTModel,
)

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
BASIC_WORDS = (
    "a photo of an the on in with and at by painting sculpture style red blue green sks zwx dog cat "
    "cup car chair beach snow forest city grass studio ball playing"
).split()


def word_tokenizer(words: Iterable[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which each given word is exactly one token.

    Merges are added until every word tokenizes whole: BPE applies merges by rank, so a naive
    prefix chain per word can be broken by another word's merge; appending the merge a word
    still needs only ever joins pieces, so the loop ends.
    """
    words = sorted({w.lower() for w in words})
    symbols = sorted({ch for w in words for ch in w})
    vocab: dict[str, int] = {}
    for sym in symbols + [f"{s}</w>" for s in symbols]:
        vocab.setdefault(sym, len(vocab))
    merges: list[tuple[str, str]] = []
    for _ in range(sum(len(w) for w in words) + 1):
        tokenizer = _build(vocab, merges, max_length)
        split = {w: tokenizer.tokenize(w) for w in words}
        pending = [pieces for pieces in split.values() if len(pieces) > 1]
        if not pending:
            return tokenizer
        for pieces in pending:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    raise RuntimeError("word_tokenizer did not converge")  # unreachable: each round joins pieces


def _build(vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int) -> CLIPTokenizer:
    full = dict(vocab)
    for special in SPECIAL_TOKENS:
        full.setdefault(special, len(full))
    return CLIPTokenizer(
        vocab=full, merges=list(merges), model_max_length=max_length, pad_token="<|endoftext|>"
    )


def tiny_unet(
    linear_projection: bool = False, sample_size: int = 8, widths: tuple[int, int] = (32, 64)
) -> UNet2DConditionModel:
    """Two resolutions, four transformer blocks (down 1, mid 1, up 2), widths 32 and 64 by default."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=linear_projection,
    )


def tiny_text_config(tokenizer: CLIPTokenizer, **changes: object) -> CLIPTextConfig:
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|endoftext|>"))
    }
    settings: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "pad_token_id": ids["eos_token_id"],
        **ids,
        **changes,
    }
    return CLIPTextConfig(**settings)


def tiny_vae(latent_channels: int = 4, **changes: Any) -> AutoencoderKL:
    """Two blocks of 16 and 32 channels, downsampling by 2; ``changes`` for a family's own VAE settings."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        **changes,
    )


def tiny_sdxl_unet(sample_size: int = 8) -> UNet2DConditionModel:
    """SDXL's layout at toy size: a plain block at the top resolution, then a cross-attention block of 2
    transformer layers (down 2 blocks, mid 1, up 3: six proj_out, the down ones after 2 layers each),
    Linear proj_out, text_time conditioning on the pooled text embedding and the six size/crop ids."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + text_encoder_2's projection
        cross_attention_dim=64,  # both encoders' hidden states side by side: 32 + 32
        norm_num_groups=8,
    )


def tiny_sdxl_pipeline(seed: int = 0, words: Iterable[str] = BASIC_WORDS) -> StableDiffusionXLPipeline:
    """A complete, random Stable Diffusion XL pipeline: two CLIP text encoders (the second with a
    projection, for the pooled embedding), their tokenizers, VAE, U-Net, SDXL's Euler scheduler."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    tokenizer_2 = word_tokenizer(words)
    tokenizer_2.pad_token = "!" if "!" in tokenizer_2.get_vocab() else tokenizer_2.pad_token
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        text_encoder_2=CLIPTextModelWithProjection(tiny_text_config(tokenizer_2, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_sdxl_pipeline(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    folder = Path(folder)
    tiny_sdxl_pipeline(seed).save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_pipeline(
    linear_projection: bool = False,
    seed: int = 0,
    words: Iterable[str] = BASIC_WORDS,
    widths: tuple[int, int] = (32, 64),
) -> StableDiffusionPipeline:
    """A complete, random Stable Diffusion pipeline: U-Net, VAE (downsamples by 2), CLIP text encoder."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    vae = tiny_vae()
    scheduler = PNDMScheduler(  # as Stable Diffusion 1.x ships; persres samples with DDIM from its config
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=tiny_unet(linear_projection, widths=widths),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(
    folder: str | os.PathLike[str],
    linear_projection: bool = False,
    seed: int = 0,
    widths: tuple[int, int] = (32, 64),
) -> Path:
    """Write a tiny random pipeline as a diffusers folder (safetensors) and return its path."""
    folder = Path(folder)
    tiny_pipeline(linear_projection, seed, widths=widths).save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_clip(folder: str | os.PathLike[str], seed: int = 0, words: Iterable[str] = BASIC_WORDS) -> Path:
    """A random CLIPModel (ViT-B/32 layout at toy width) with its tokenizer, as a model folder that the
    ``*WithProjection`` towers load from (``projection_dim`` is set in both sub-configs for that)."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    special = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("bos_token_id", "<|startoftext|>"),
            ("eos_token_id", "<|endoftext|>"),
            ("pad_token_id", "<|endoftext|>"),
        )
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 16,
        **special,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 224,
        "patch_size": 32,
        "projection_dim": 16,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_dino(folder: str | os.PathLike[str], seed: int = 0) -> Path:
    """A random ViT-S/16-layout model at toy width (DINO's architecture class), as a model folder."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
    )
    folder = Path(folder)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


METASPACE = "\u2581"  # SentencePiece's word-start mark, which T5's tokenizer puts before each word
# Flux.1's VAE latents: shift_factor and scaling_factor of black-forest-labs/FLUX.1-dev's vae/config.json
FLUX_VAE_SHIFT, FLUX_VAE_SCALE = 0.1159, 0.3611
# Flux.1-dev's scheduler/scheduler_config.json
FLUX_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def t5_word_tokenizer(words: Iterable[str], max_length: int = 512) -> T5Tokenizer:
    """A T5 (SentencePiece Unigram) tokenizer built in memory in which each given word is one token
    (``▁word``); other words fall back to letters, digits and punctuation. Special tokens as T5's:
    ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 (no sentinel tokens)."""
    words = sorted({w.lower() for w in words})
    pieces = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (METASPACE, -2.0)]
    vocab += [(f"{METASPACE}{word}", -1.0) for word in words]
    vocab += [(piece, -5.0) for piece in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_flux_transformer(guidance: bool = True) -> FluxTransformer2DModel:
    """Flux.1's layout at toy size: 2 double-stream and 2 single-stream blocks, width 32 (2 heads of 16;
    the rope axes sum to the head width), 64 input channels (16 latent channels packed 2x2), a guidance
    embedding as Flux.1-dev (``guidance=False``: as schnell)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 width
        pooled_projection_dim=32,  # the CLIP width
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_flux_vae() -> AutoencoderKL:
    """16 latent channels as Flux.1's VAE, with its shift and scale, no quant convs; downsamples by 2."""
    return tiny_vae(
        16,
        shift_factor=FLUX_VAE_SHIFT,
        scaling_factor=FLUX_VAE_SCALE,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def t5_encoder_config(
    tokenizer: Any, width: int, head_width: int, ff: int, buckets: int, max_distance: int = 128
) -> T5Config:
    """A 2-layer, 4-head T5 v1.1 encoder's config (gated GELU, as Flux's T5-XXL) for a word tokenizer."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=head_width,
        d_ff=ff,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def tiny_flux_pipeline(
    seed: int = 0, words: Iterable[str] = BASIC_WORDS, guidance: bool = True
) -> FluxPipeline:
    """A complete, random Flux.1 pipeline: CLIP text encoder (pooled embedding) and tokenizer, a 2-layer T5
    encoder and T5 tokenizer (the sequence), 16-channel VAE, transformer, Flux.1-dev's flow-matching Euler
    scheduler."""
    torch.manual_seed(seed)
    tokenizer = word_tokenizer(words)
    tokenizer_2 = t5_word_tokenizer(words)
    t5 = t5_encoder_config(tokenizer_2, width=32, head_width=8, ff=37, buckets=8)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_flux_vae(),
        text_encoder=CLIPTextModel(tiny_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(t5),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(guidance),
    )


def save_tiny_flux_pipeline(folder: str | os.PathLike[str], seed: int = 0, guidance: bool = True) -> Path:
    """Write a tiny random Flux pipeline as a diffusers folder (safetensors) and return its path."""
    folder = Path(folder)
    tiny_flux_pipeline(seed, guidance=guidance).save_pretrained(folder, safe_serialization=True)
    return folder
