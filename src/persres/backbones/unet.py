"""The U-Net family: Stable Diffusion 1.x, 2.x and XL (``UNetBackbone(xl=True)``).

Residuals go on the ``proj_out`` of every transformer block (``Transformer2DModel``): a 1x1 Conv2d in
SD 1.x, a Linear in SD 2.x and SDXL. LAG reads the cross-attention (``attn2``) layers of the same block,
which run before its ``proj_out``. The U-Net predicts epsilon or v (the scheduler's ``prediction_type``).

Conditioning: SD 1.x/2.x ``encoder_hidden_states`` (1, T, D) from one text encoder. SDXL: the two
encoders' hidden states side by side (1, T, D1 + D2), the second encoder's pooled projection (1, P) as
``text_embeds`` and six ``time_ids`` (original height and width, crop top and left, target height and
width). Training images here are random square crops resized to the training resolution R, so the ids
are (R, R, 0, 0, R, R): what diffusers' SDXL DreamBooth script computes for photos already at R with a
centre crop. With `buckets` a batch of H x W images says (H, W, 0, 0, H, W) (``join_conditioning``).
Sampling goes through the diffusers pipeline, which builds the same ids itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from persres.backbones import ProbsHook, without_denoiser
from persres.backbones.folder import meta_component, prediction_type
from persres.backbones.records import XL_CONDITIONING, is_xl_config
from persres.backbones.unet_attention import CaptureCrossAttnProcessor
from persres.backbones.vae import Posterior, encode_posterior
from persres.config import MIN_SNR_GAMMA, TIMESTEP_WEIGHTINGS, ResidualConfig, TrainConfig
from persres.errors import ModelError

log = logging.getLogger(__name__)

KOHYA_PREFIX = "lora_unet_"
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the LoRA method's layers (``lora_targets``)
XL_RESOLUTION = 1024  # SDXL's native resolution (its training images and default sampling size)
# classifier-free guidance scale when none is given: StableDiffusionPipeline's and
# StableDiffusionXLPipeline's guidance_scale default (diffusers 0.42)
CFG_SCALE = 7.5


@dataclass(frozen=True)
class Conditioning:
    """What the U-Net is conditioned on for one prompt."""

    hidden: torch.Tensor  # (1, T, D)
    pooled: torch.Tensor | None = None  # SDXL: (1, P)
    time_ids: torch.Tensor | None = None  # SDXL: (1, 6)

    def detach(self) -> Conditioning:
        return Conditioning(
            self.hidden.detach(),
            None if self.pooled is None else self.pooled.detach(),
            None if self.time_ids is None else self.time_ids.detach(),
        )

    def unet_kwargs(self, batch: int, dtype: torch.dtype) -> dict[str, Any]:
        """Keyword arguments of the U-Net call for a batch of ``batch`` images."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden.expand(batch, -1, -1).to(dtype)}
        if self.pooled is not None and self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": self.pooled.expand(batch, -1).to(dtype),
                "time_ids": self.time_ids.expand(batch, -1).to(dtype),
            }
        return kwargs


@dataclass(frozen=True)
class UNetBackbone:
    """Stable Diffusion 1.x/2.x (``xl=False``) or XL (``xl=True``); see the module's notes."""

    xl: bool = False

    @property
    def name(self) -> str:
        return "Stable Diffusion XL" if self.xl else "Stable Diffusion 1.x/2.x"

    @property
    def pipeline_class(self) -> type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]:
        return StableDiffusionXLPipeline if self.xl else StableDiffusionPipeline

    @property
    def default_resolution(self) -> int:
        return XL_RESOLUTION if self.xl else TrainConfig.resolution

    @property
    def rank_default(self) -> float | int:
        """The paper's rule, 5% of each layer's width (16/32/64 for SD's 320/640/1280 channels)."""
        return ResidualConfig.rank

    def default_guidance(self, denoiser_config: Mapping[str, Any]) -> float:
        """Classifier-free guidance 7.5 (``CFG_SCALE``)."""
        return CFG_SCALE

    @property
    def method_capability(self) -> str | None:
        """SD 1.x/2.x runs every method (None); SDXL only the methods marked ``works_on_sdxl``."""
        return "works_on_sdxl" if self.xl else None

    # -- loading -------------------------------------------------------------------------------
    def denoiser(self, pipe: Any) -> nn.Module:
        """``pipe.unet``; a pipeline without one is refused."""
        unet = getattr(pipe, "unet", None)
        if not is_unet(unet):
            raise without_denoiser(pipe, "a U-Net")
        return unet

    def load_kwargs(self, as_shipped: bool) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments: SD 1.x/2.x drop the safety checker (not needed to train
        or sample here) unless the pipeline is loaded as shipped; SDXL has none."""
        if as_shipped or self.xl:
            return {}
        return {"safety_checker": None, "requires_safety_checker": False}

    def after_load(self, pipe: Any, dtype: torch.dtype) -> None:
        """SDXL's VAE stays in fp32 under fp16: the stock one overflows in half precision (diffusers
        marks it ``force_upcast``)."""
        if self.xl and dtype == torch.float16:
            pipe.vae.to(torch.float32)
            log.info("SDXL: the VAE stays in fp32 (the stock SDXL VAE overflows in fp16)")

    def sampling_scheduler(self, pipe: Any) -> DDIMScheduler:
        """DDIM from the pipeline's scheduler config, without clipping: latents are not in [-1, 1], and a
        config without ``clip_sample`` would wash DDIM's images out."""
        return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)

    def training_scheduler(self, pipe: Any) -> DDPMScheduler:
        """DDPM's noise schedule from the pipeline's scheduler config (its betas and prediction type)."""
        return DDPMScheduler.from_config(pipe.scheduler.config)

    def attended_towers(self, pipe: Any) -> list[tuple[Any, Any]]:
        """Every text tower: SDXL's two sequences sit side by side per position in the cross-attention."""
        return self.text_towers(pipe)

    @property
    def attended_folders(self) -> tuple[tuple[str, str], ...]:
        """The (tokenizer, text encoder) subfolders of ``attended_towers``, read before loading."""
        first = (("tokenizer", "text_encoder"),)
        return (*first, ("tokenizer_2", "text_encoder_2")) if self.xl else first

    def text_towers(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        return pairs

    def skeleton(self, base: str) -> nn.Module:
        """The base's U-Net built from its config on the meta device: its layers' names, kinds and
        shapes, without reading or allocating a weight."""
        return meta_component(UNet2DConditionModel, base, "unet")

    # -- residual targets ----------------------------------------------------------------------
    def residual_targets(self, denoiser: nn.Module) -> dict[str, nn.Module]:
        """The ``proj_out`` of every transformer block, keyed by module path; found by type, not by
        name. The module there may already be wrapped (residuals see through their own wrapper)."""
        found = {
            f"{name}.proj_out" if name else "proj_out": module.proj_out
            for name, module in denoiser.named_modules()
            if isinstance(module, Transformer2DModel)
        }
        if not found:
            raise ModelError(
                f"no transformer blocks (Transformer2DModel) found in {type(denoiser).__name__}; "
                "pass the U-Net of a Stable Diffusion 1.x/2.x pipeline"
            )
        return found

    def default_rank(self, path: str, layer: nn.Linear | nn.Conv2d, config: ResidualConfig) -> int:
        """The paper's rule: ``config.rank`` of the layer's width m_i (min of its in and out channels)."""
        return config.rank_for(min(layer.weight.shape[0], layer.weight.shape[1]), path)

    # -- attention, for LAG and the methods that edit cross-attention ---------------------------
    def attention_layers(self, denoiser: nn.Module, target: str) -> dict[str, Attention]:
        """The cross-attention layers whose maps place the residual at ``target``, in the order they run:
        every ``attn2`` of the transformer block that ``target`` (its ``proj_out``) closes."""
        block = target.removesuffix(".proj_out")
        return cross_attentions(denoiser.get_submodule(block), block)

    def capture_processor(
        self, hook: ProbsHook, keys: torch.Tensor, text_length: int
    ) -> CaptureCrossAttnProcessor:
        """The explicit-softmax ``attn2`` processor; it hands over all T (77) columns, ``keys`` unused."""
        return CaptureCrossAttnProcessor(hook)

    def residual_mask(
        self, denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int
    ) -> torch.Tensor:
        """A block's ``proj_out`` sees its HW positions only: the mask (N, groups, HW) as it is."""
        return mask

    def cross_attention_layers(self, denoiser: nn.Module) -> dict[str, Attention]:
        """Every cross-attention layer of the U-Net, by module path (text keys and values)."""
        return {
            name: module
            for name, module in denoiser.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention
        }

    # -- training --------------------------------------------------------------------------------
    def encode(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> Conditioning:
        """The prompt's conditioning, with gradients where the text side is trainable (no ``no_grad``)."""
        if not self.xl:
            return Conditioning(pipe.encode_prompt(prompt, device, 1, False)[0])
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        size = (resolution, resolution)
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=hidden.dtype, device=device)
        return Conditioning(hidden, pooled, time_ids)

    def prompt_inputs(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline call's prompt as embeddings, encoded now as the pipeline would (with the empty
        prompt's, for classifier-free guidance): sampling then needs no text encoder."""
        with torch.no_grad():
            encoded = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                         do_classifier_free_guidance=True)  # fmt: skip
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if self.xl:
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        return dict(zip(names, encoded, strict=True))

    def text_inputs(self, pipe: Any, prompt: str) -> dict[str, Any]:
        """The pipeline call's prompt as text (its negative is the empty prompt, diffusers' default)."""
        return {"prompt": prompt}

    def sampling_kwargs(self, pipe: Any, guidance: float) -> dict[str, Any]:
        """Classifier-free guidance at ``guidance``."""
        return {"guidance_scale": guidance}

    def join_conditioning(self, conditions: Sequence[Conditioning], size: tuple[int, int]) -> Conditioning:
        """One batch's conditioning from each image's (``encode``'s, (1, ...) each), for a batch of
        ``size`` (H, W) pixels: SDXL's size ids say (H, W, 0, 0, H, W), as ``encode``'s say (R, R, 0, 0,
        R, R) for the square crops (see the module's notes)."""
        hidden = torch.cat([c.hidden for c in conditions])  # (B, T, D)
        if not self.xl:
            return Conditioning(hidden)
        pooled = torch.cat([c.pooled for c in conditions if c.pooled is not None])  # (B, P); encode gives one
        return Conditioning(hidden, pooled, size_ids(size, len(conditions), hidden))

    def posterior(self, pipe: Any, pixels: torch.Tensor, device: torch.device) -> Posterior:
        """The VAE posterior of ``pixels`` (N, 3, H, W) on ``device``, unscaled: (N, 4, h, w) each."""
        return encode_posterior(pipe.vae, pixels, device)

    def latents(self, pipe: Any, posterior: Posterior, generator: torch.Generator) -> torch.Tensor:
        """A sample of ``posterior``, scaled: (N, 4, h, w)."""
        return posterior.sample(generator) * pipe.vae.config.scaling_factor

    def noised(
        self, scheduler: Any, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target): DDPM noise at uniform timesteps; the target is the noise
        (epsilon) or the velocity (v), as the scheduler's ``prediction_type`` says."""
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        steps = torch.randint(scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        steps = steps.to(device)
        noisy = scheduler.add_noise(latents, noise, steps)
        if scheduler.config.prediction_type == "v_prediction":
            return noisy, steps, scheduler.get_velocity(latents, noise, steps)
        return noisy, steps, noise

    @property
    def timestep_weightings(self) -> tuple[str, ...]:
        return TIMESTEP_WEIGHTINGS

    def timestep_weights(self, scheduler: Any, steps: torch.Tensor, weighting: str) -> torch.Tensor | None:
        """Each image's loss weight at its DDPM ``steps`` (B,): none, or min-snr, min(SNR, gamma) / SNR for
        an epsilon target and / (SNR + 1) for v (kohya's ``apply_snr_weight``), SNR = a / (1 - a) of the
        scheduler's cumulative alpha."""
        if weighting == "none":
            return None
        alphas = scheduler.alphas_cumprod.to(steps.device)[steps].float()
        snr = alphas / (1.0 - alphas)
        clipped = snr.clamp(max=MIN_SNR_GAMMA)
        return clipped / (snr + 1.0) if scheduler.config.prediction_type == "v_prediction" else clipped / snr

    def predict(
        self,
        pipe: Any,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        steps: torch.Tensor,
        condition: Conditioning,
    ) -> torch.Tensor:
        """``denoiser``'s output (the pipeline's U-Net, maybe wrapped for distributed training) for
        ``noisy`` at ``steps``, in the U-Net's dtype (a trained text side may be fp32; SDXL's VAE may be
        fp32 under an fp16 U-Net)."""
        noisy = noisy.to(getattr(getattr(pipe, "unet", None), "dtype", noisy.dtype))
        return denoiser(noisy, steps, **condition.unet_kwargs(noisy.shape[0], noisy.dtype)).sample

    # -- files -----------------------------------------------------------------------------------
    def architecture(self, denoiser: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Any]:
        """What a residual file needs of its base beyond layer shapes: proj_out kind and text width, and
        SDXL's added conditioning (``addition_embed_type`` "text_time"; absent for SD 1.x/2.x).

        SD 1.x and SD 2.x U-Nets have the same proj_out paths and widths; this tells them apart.
        ``targets`` are the residual target layers, unwrapped.
        """
        kinds = {"linear" if isinstance(p, nn.Linear) else "conv" for p in targets.values()}
        config = getattr(denoiser, "config", None)
        cross = getattr(config, "cross_attention_dim", None) if config is not None else None
        recorded: dict[str, Any] = {"proj_out": "/".join(sorted(kinds)), "cross_attention_dim": cross}
        added = getattr(config, XL_CONDITIONING[0], None) if config is not None else None
        if added is not None:
            recorded[XL_CONDITIONING[0]] = added
        return recorded

    def kohya_names(self, layers: list[str]) -> dict[str, str]:
        """Module path -> kohya's name. SD 1.x/2.x: the diffusers path with underscores. SDXL: the sgm
        U-Net's block numbering, with L layers per block (SDXL: 2): down_blocks.i.attentions.j ->
        input_blocks.(1 + i (L + 1) + j).1, mid_block.attentions.0 -> middle_block.1,
        up_blocks.i.attentions.j -> output_blocks.(i (L + 1) + j).1."""
        if not self.xl:
            return {layer: KOHYA_PREFIX + layer.replace(".", "_") for layer in layers}
        down = [layer.split(".") for layer in layers if layer.startswith("down_blocks.")]
        per_block = 1 + max((int(parts[3]) for parts in down), default=1)
        names = {}
        for layer in layers:
            parts = layer.split(".")
            if layer.startswith("down_blocks."):
                sgm = f"input_blocks.{1 + int(parts[1]) * (per_block + 1) + int(parts[3])}.1"
            elif layer.startswith("up_blocks."):
                sgm = f"output_blocks.{int(parts[1]) * (per_block + 1) + int(parts[3])}.1"
            else:
                sgm = "middle_block.1"
            names[layer] = KOHYA_PREFIX + f"{sgm}.{parts[-1]}".replace(".", "_")
        return names

    def kohya_model_version(self, conv: bool, base: str | None) -> str:
        """kohya's ``ss_base_model_version``: sd_v1 (Conv2d proj_out), sd_v2 (Linear proj_out, the
        ``use_linear_projection`` of SD 2.x), sd_v2_v (SD 2.x with v-prediction, e.g. the 768 px model,
        read from ``base``'s scheduler config when it is at hand) or sdxl_base_v1-0."""
        if self.xl:
            return "sdxl_base_v1-0"
        if conv:
            return "sd_v1"
        return "sd_v2_v" if base and prediction_type(base) == "v_prediction" else "sd_v2"

    @property
    def diffusers_lora_prefix(self) -> str | None:
        """Keys of a diffusers-format LoRA file start with the component's name: ``unet.``."""
        return "unet."

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """``to_q, to_k, to_v, to_out.0`` of every attention layer (self- and cross-attention), as
        diffusers' examples/dreambooth/train_dreambooth_lora.py (and ``_sdxl.py``) set ``target_modules``;
        the script's ``add_k_proj``/``add_v_proj`` are absent from SD 1.x/2.x and XL U-Nets."""
        return UNET_LORA_TARGETS


def size_ids(size: tuple[int, int], batch: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's six size ids for images of ``size`` (H, W) pixels, neither cropped nor rescaled: (batch, 6)."""
    return torch.tensor([[*size, 0, 0, *size]] * batch, dtype=like.dtype, device=like.device)


def is_unet(denoiser: object) -> bool:
    return isinstance(denoiser, UNet2DConditionModel)


SD = UNetBackbone(xl=False)
SDXL = UNetBackbone(xl=True)


def backbone_of_unet(denoiser: nn.Module) -> UNetBackbone:
    """SDXL for a U-Net with its added conditioning, else SD 1.x/2.x."""
    return SDXL if is_xl_config(getattr(denoiser, "config", None)) else SD


def cross_attentions(block: nn.Module, prefix: str) -> dict[str, Attention]:
    """The cross-attention layers (``attn2``) inside ``block``, keyed by full module path."""
    return {
        f"{prefix}.{name}": module
        for name, module in block.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }
