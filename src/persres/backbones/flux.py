"""The Flux family: Flux.1 [dev] and [schnell], an MMDiT transformer (``FluxTransformer2DModel``).

Residual targets. Flux.1 has 19 double-stream blocks (``FluxTransformerBlock``: joint attention over
[text, image] tokens, separate weights per stream) and 38 single-stream blocks
(``FluxSingleTransformerBlock``: one sequence [text, image], attention and MLP side by side). The paper
puts a residual on the output projection of every transformer block, the layer that writes the block's
result back into the image features. Here, found by block type and keyed by module path:

- double blocks: ``transformer_blocks.i.attn.to_out.0`` (3072 -> 3072), the image stream's attention
  output, where what the image takes from the text (joint attention) enters the image features. The
  text stream's output projection (``attn.to_add_out``) is left out: the paper adapts how the image is
  made from the prompt, never the prompt's features (the U-Net's text is a fixed input to its
  cross-attention), and LAG localises image positions only. The block's MLP output (``ff.net.2``) is left
  out too: a double block has no one layer after both attention and MLP (each adds into the image stream
  on its own), and the attention output is the one that carries the text; a choice, not measured.
- single blocks: ``single_transformer_blocks.i.proj_out`` (15360 -> 3072), the block's last layer on the
  concatenated attention and MLP outputs, like the U-Net's ``proj_out``. It sees the text and the image
  tokens alike ([text, image] in one sequence): in training the residual changes the text positions'
  features as well, which later single blocks read. LAG (``flux_attention``) gates the image positions
  by the concept's mask and gives the text positions the residual when that mask is not empty, so that
  every mask 1 is normal sampling and every mask 0 the base.

57 layers on Flux.1; the model's own top-level ``proj_out`` (3072 -> 64, the output layer) is no block's.

Rank. The paper's r = 0.05 m gives 154 on every layer here (m = 3072): 125,841,408 parameters, 1.06% of
the transformer's 11,901,408,320, 100x SD 1.x's 1,239,040. What the paper kept small is the share of the
base: 1,239,040 of SD 1.5's 859,520,964 U-Net parameters, 0.144%. Each unit of rank costs
19 x (3072 + 3072) + 38 x (15360 + 3072) = 817,152 parameters on Flux.1, so the same share is r = 21
(17,160,192, 0.144%); r = 16 gives 13,074,432 (0.110%). The default on Flux (``rank_default``; every front
end's TrainConfig takes it when no `rank` is given, ``persres.backbones.rank_default_for``) is therefore
the fixed rank 21; `rank` still takes a fraction of each layer's width (0.05: the paper's rule) or any
fixed rank. A choice from the paper's share; the toy
transformer world has not measured it yet.

Training, as diffusers' reference trainer (examples/dreambooth/train_dreambooth_lora_flux.py, its defaults):
flow matching with the velocity target. Timestep index i uniform in [0, 1000) (``--weighting_scheme
none``: no logit-normal sampling, loss weight 1), sigma = the training scheduler's ``sigmas[i]`` (Flux.1-dev
ships ``use_dynamic_shifting``, so its training table is unshifted: sigma = (1000 - i) / 1000),
x_t = (1 - sigma) x_0 + sigma noise, target = noise - x_0, and the transformer is given sigma (the
timestep / 1000). The guidance embedding of a guidance-distilled model (Flux.1-dev, ``guidance_embeds``) is
fed 1.0 in training: what diffusers' README_flux.md commands and kohya's Flux examples pass
(``--guidance_scale=1``; the script's own default is 3.5). Schnell has no guidance embedding.

Latents: a VAE posterior sample, (z - shift_factor) x scaling_factor (Flux.1: 0.1159, 0.3611), 16
channels at 1/8 of the image. They stay (N, 16, h, w) through noise and target; ``predict`` packs them
2x2 into (N, hw/4, 64) tokens with image position ids (0, row, col), as FluxPipeline does, and unpacks the
prediction (packing only permutes entries, so the loss is the reference trainer's).

Conditioning (``FluxConditioning``): the T5 sequence padded to 512 tokens (FluxPipeline's
``max_sequence_length``, which sampling uses too: Flux has no text attention mask, so the padding is read
and must be the same in training and sampling), the pooled CLIP embedding, and zero text position ids.
Sampling keeps the pipeline's own flow-matching Euler scheduler.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from torch import nn

from persres.backbones import RANK_DEFAULTS, ProbsHook, flux_attention, without_denoiser
from persres.backbones.folder import meta_component
from persres.backbones.records import FLUX_GUIDANCE, FLUX_RECORD, FLUX_TEXT_WIDTH
from persres.backbones.vae import Posterior, encode_posterior
from persres.config import ResidualConfig
from persres.errors import ConfigError, ModelError
from persres.quiet import LENGTH_EMITTER, LENGTH_NOTICE, message_hidden

FLUX_RESOLUTION = 1024  # Flux.1's native resolution
TEXT_LENGTH = 512  # T5 tokens per prompt: FluxPipeline's max_sequence_length default, and the trainer's
TRAINING_GUIDANCE = 1.0  # the guidance embedding's value in training (see the module's notes)
CLIP_CUT = "truncated because CLIP can only handle"  # diffusers' (0.42) warning of the pooled prompt's cut
# the guidance embedding's value in sampling when none is given: FluxPipeline's guidance_scale default
# and Flux.1-dev's model card; a distilled guidance, not classifier-free (no negative prompt is run)
SAMPLING_GUIDANCE = 3.5
NO_GUIDANCE = 1.0  # a model without a guidance embedding, by default: one call a step, as schnell samples
DEFAULT_RANK = int(RANK_DEFAULTS["FluxPipeline"])  # 21: the paper's share of its base, 0.144%, on Flux.1
KOHYA_PREFIX = "lora_unet_"  # kohya's Flux LoRA files keep the U-Net prefix (sd-scripts' lora_flux)
KOHYA_VERSION = "flux1"  # kohya's ss_base_model_version for Flux.1
# diffusers' module path -> the original (BFL) name, which ComfyUI and kohya use
DOUBLE_TARGET = re.compile(r"transformer_blocks\.(\d+)\.attn\.to_out\.0")
SINGLE_TARGET = re.compile(r"single_transformer_blocks\.(\d+)\.proj_out")
# The LoRA method's layers: diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, its
# ``target_modules`` when ``--lora_layers`` is not given (the list since huggingface/diffusers#9646, which
# added ``--lora_layers`` and the MLP layers to the attention-only default). peft matches each as a
# suffix of a module path: in the double blocks both streams' attention projections (image: to_q/k/v,
# to_out.0; text: add_*_proj, to_add_out) and both MLPs (ff, ff_context); in the single blocks only
# attn.to_q/k/v (they have no to_out, and proj_mlp/proj_out are not in the list). On Flux.1:
# 19 x 12 + 38 x 3 = 342 layers.
FLUX_LORA_TARGETS = (
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)


@dataclass(frozen=True)
class FluxConditioning:
    """What the Flux transformer is conditioned on for one prompt."""

    hidden: torch.Tensor  # (1, T, D): T5's sequence, T = sequence_length(pipe), 512 for Flux.1
    pooled: torch.Tensor  # (1, P): CLIP's pooled embedding
    text_ids: torch.Tensor  # (T, 3): the text's position ids (zeros)

    def detach(self) -> FluxConditioning:
        return FluxConditioning(self.hidden.detach(), self.pooled.detach(), self.text_ids.detach())

    def transformer_kwargs(self, batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Keyword arguments of the transformer call for a batch of ``batch`` images."""
        return {
            "encoder_hidden_states": self.hidden.expand(batch, -1, -1).to(dtype),
            "pooled_projections": self.pooled.expand(batch, -1).to(dtype),
            "txt_ids": self.text_ids.to(dtype),
        }


@dataclass(frozen=True)
class FluxBackbone:
    """Flux.1 ([dev] with a guidance embedding, [schnell] without); see the module's notes."""

    @property
    def name(self) -> str:
        return "Flux.1"

    @property
    def pipeline_class(self) -> type[FluxPipeline]:
        return FluxPipeline

    @property
    def default_resolution(self) -> int:
        return FLUX_RESOLUTION

    @property
    def rank_default(self) -> float | int:
        """A fixed rank of 21 on every layer: the paper's share of the base (see the module's notes)."""
        return DEFAULT_RANK

    def default_guidance(self, denoiser_config: Mapping[str, Any]) -> float:
        """3.5 fed to the guidance embedding (``SAMPLING_GUIDANCE``) of a guidance-distilled model
        (Flux.1-dev); 1, no guidance, on a model without one (Flux.1-schnell samples so), where a given
        `guidance` above 1 is true classifier-free guidance (``sampling_kwargs``)."""
        return SAMPLING_GUIDANCE if denoiser_config.get("guidance_embeds") else NO_GUIDANCE

    @property
    def method_capability(self) -> str | None:
        """Only the methods marked ``works_on_flux`` train on Flux."""
        return "works_on_flux"

    # -- loading -------------------------------------------------------------------------------
    def denoiser(self, pipe: Any) -> nn.Module:
        """``pipe.transformer``; a pipeline without one is refused."""
        transformer = getattr(pipe, "transformer", None)
        if not is_flux_transformer(transformer):
            raise without_denoiser(pipe, "a Flux transformer")
        return transformer

    def load_kwargs(self, as_shipped: bool) -> dict[str, Any]:
        return {}

    def after_load(self, pipe: Any, dtype: torch.dtype) -> None:
        """T5 prompts padded to the tokenizer's length, at most 512 (``TEXT_LENGTH``): a model trained at a
        shorter one (its tokenizer says so, as the toy Flux base's 32) then reads what it was trained on."""
        pipe.tokenizer_2.model_max_length = sequence_length(pipe)

    def sampling_scheduler(self, pipe: Any) -> Any:
        """The pipeline's own flow-matching Euler scheduler: its shift settings belong to the model."""
        return pipe.scheduler

    @property
    def timestep_weightings(self) -> tuple[str, ...]:
        """none only: min-snr is defined for DDPM's epsilon and v targets, not flow matching's velocity."""
        return ("none",)

    def timestep_weights(self, scheduler: Any, steps: torch.Tensor, weighting: str) -> torch.Tensor | None:
        if weighting != "none":  # checked before training: this is a caller's mistake
            raise ConfigError(f"`timestep_weighting` {weighting} is not offered on {self.name}; use none")
        return None

    def training_scheduler(self, pipe: Any) -> FlowMatchEulerDiscreteScheduler:
        """A fresh copy of the pipeline's scheduler, for its training table of sigmas."""
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    def text_towers(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(CLIP tokenizer, CLIP text encoder) for the pooled embedding, (T5 tokenizer, T5 encoder) for the
        sequence."""
        return [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]

    def attended_towers(self, pipe: Any) -> list[tuple[Any, Any]]:
        """T5 only: the joint attention holds its 512 positions first; CLIP gives the pooled embedding."""
        return [(pipe.tokenizer_2, pipe.text_encoder_2)]

    @property
    def attended_folders(self) -> tuple[tuple[str, str], ...]:
        """The (tokenizer, text encoder) subfolders of ``attended_towers`` (T5's), read before loading."""
        return (("tokenizer_2", "text_encoder_2"),)

    def skeleton(self, base: str) -> nn.Module:
        """The base's transformer built from its config on the meta device: its layers' names, kinds and
        shapes, without reading or allocating a weight."""
        return meta_component(FluxTransformer2DModel, base, "transformer")

    # -- residual targets ----------------------------------------------------------------------
    def residual_targets(self, denoiser: nn.Module) -> dict[str, nn.Module]:
        """Each double block's image attention output (``attn.to_out.0``) and each single block's
        ``proj_out``, keyed by module path; blocks found by type. The module there may already be wrapped."""
        found: dict[str, nn.Module] = {}
        for name, module in denoiser.named_modules():
            if isinstance(module, FluxTransformerBlock):
                found[f"{name}.attn.to_out.0"] = module.attn.to_out[0]
            elif isinstance(module, FluxSingleTransformerBlock):
                found[f"{name}.proj_out"] = module.proj_out
        if not found:
            raise ModelError(
                f"no Flux transformer blocks found in {type(denoiser).__name__}; pass the transformer of a "
                "Flux pipeline"
            )
        return found

    def default_rank(self, path: str, layer: nn.Linear | nn.Conv2d, config: ResidualConfig) -> int:
        """``config.rank``: a fraction of the layer's width m_i (min of its in and out features: 3072 on
        Flux.1), or a fixed rank."""
        return config.rank_for(min(layer.weight.shape[0], layer.weight.shape[1]), path)

    # -- attention -------------------------------------------------------------------------------
    def attention_layers(self, denoiser: nn.Module, target: str) -> dict[str, Attention]:
        """The block's own joint attention, which runs before its residual layer (``flux_attention``)."""
        return dict(flux_attention.attention_layers(denoiser, target))

    def capture_processor(self, hook: ProbsHook, keys: torch.Tensor, text_length: int) -> Any:
        """The joint-attention processor that hands LAG the image queries' probabilities of ``keys``."""
        return flux_attention.FluxCaptureProcessor(hook, keys, text_length)

    def residual_mask(
        self, denoiser: nn.Module, target: str, mask: torch.Tensor, text_length: int
    ) -> torch.Tensor:
        """A block's image mask laid out on its residual layer's tokens (text first in single blocks)."""
        return flux_attention.residual_mask(denoiser, target, mask, text_length)

    def cross_attention_layers(self, denoiser: nn.Module) -> dict[str, Attention]:
        raise ModelError(
            "a Flux transformer has no separate cross-attention layers (text and image share joint "
            "attention); the methods that edit cross-attention keys and values train on Stable Diffusion"
        )

    # -- training --------------------------------------------------------------------------------
    def encode(self, pipe: Any, prompt: str, device: torch.device, resolution: int) -> FluxConditioning:
        """The prompt's T5 sequence (``sequence_length``), pooled CLIP embedding and text ids. A prompt
        longer than CLIP's 77 tokens is cut for the pooled embedding only, as in FluxPipeline: the warnings
        diffusers and transformers log of it are hidden (the T5 sequence, which carries the prompt, is checked
        before training)."""
        with message_hidden(type(pipe).__module__, CLIP_CUT), message_hidden(LENGTH_EMITTER, LENGTH_NOTICE):
            hidden, pooled, text_ids = pipe.encode_prompt(
                prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                max_sequence_length=sequence_length(pipe),
            )  # fmt: skip
        return FluxConditioning(hidden, pooled, text_ids)

    def prompt_inputs(self, pipe: Any, prompt: str, device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline call's prompt as embeddings (T5 sequence and pooled CLIP), encoded now as the
        pipeline would: sampling then needs no text encoder. A model without a guidance embedding also gets
        the empty negative prompt's (``text_inputs``)."""

        def embeddings(text: str) -> dict[str, torch.Tensor]:  # FluxPipeline's names for ``encode``'s parts
            with torch.no_grad():
                condition = self.encode(pipe, text, device, resolution=0)  # no size in Flux's conditioning
            return {"prompt_embeds": condition.hidden, "pooled_prompt_embeds": condition.pooled}

        inputs = embeddings(prompt)
        if not distilled(pipe):
            inputs |= {"negative_" + name: value for name, value in embeddings("").items()}
        return inputs

    def sampling_kwargs(self, pipe: Any, guidance: float) -> dict[str, Any]:
        """The distilled guidance of a guidance-distilled model, else true classifier-free guidance
        (FluxPipeline's ``true_cfg_scale``, with the empty negative prompt of ``text_inputs``), and the T5
        length the prompts were encoded at."""
        if distilled(pipe):
            return {"guidance_scale": guidance, "max_sequence_length": sequence_length(pipe)}
        return {"true_cfg_scale": guidance, "max_sequence_length": sequence_length(pipe)}

    def text_inputs(self, pipe: Any, prompt: str) -> dict[str, Any]:
        """The pipeline call's prompt as text; a model without a guidance embedding gets the empty
        negative prompt that true classifier-free guidance contrasts it with (used when `guidance` > 1)."""
        return {"prompt": prompt} if distilled(pipe) else {"prompt": prompt, "negative_prompt": ""}

    def join_conditioning(
        self, conditions: Sequence[FluxConditioning], size: tuple[int, int]
    ) -> FluxConditioning:
        """One batch's conditioning from each image's (``encode``'s, (1, ...) each): the T5 sequences and
        pooled embeddings along the batch, the shared text ids; ``size`` is not needed (the image ids come
        from the latents' shape)."""
        hidden = torch.cat([c.hidden for c in conditions])  # (B, T, D)
        pooled = torch.cat([c.pooled for c in conditions])  # (B, P)
        return FluxConditioning(hidden, pooled, conditions[0].text_ids)

    def posterior(self, pipe: Any, pixels: torch.Tensor, device: torch.device) -> Posterior:
        """The VAE posterior of ``pixels`` (N, 3, H, W) on ``device``, unshifted: (N, 16, h, w) each."""
        return encode_posterior(pipe.vae, pixels, device)

    def latents(self, pipe: Any, posterior: Posterior, generator: torch.Generator) -> torch.Tensor:
        """A sample of ``posterior``, shifted and scaled: (N, 16, h, w)."""
        config = pipe.vae.config
        return (posterior.sample(generator) - (config.shift_factor or 0.0)) * config.scaling_factor

    def noised(
        self, scheduler: Any, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, timesteps, target): flow matching at a uniform index into the scheduler's
        training sigmas; the target is the velocity noise - latents."""
        device, count = latents.device, latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        index = (torch.rand(count, generator=generator) * scheduler.config.num_train_timesteps).long()
        sigma = scheduler.sigmas[index].to(device, latents.dtype).view(count, 1, 1, 1)  # (N, 1, 1, 1)
        steps = scheduler.timesteps[index].to(device)  # sigma x 1000
        noisy = (1.0 - sigma) * latents + sigma * noise
        return noisy, steps, noise - latents

    def predict(
        self,
        pipe: Any,
        denoiser: nn.Module,
        noisy: torch.Tensor,
        steps: torch.Tensor,
        condition: FluxConditioning,
    ) -> torch.Tensor:
        """``denoiser``'s velocity (the pipeline's transformer, maybe wrapped for distributed training) for
        ``noisy`` (N, C, h, w) at ``steps``, packed for the call and unpacked: (N, C, h, w)."""
        transformer = self.denoiser(pipe)
        dtype = transformer.dtype
        count, _, height, width = noisy.shape
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((count,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pack(noisy.to(dtype)),
            timestep=steps / 1000,  # the transformer multiplies by 1000 again
            guidance=guidance,
            img_ids=image_ids(height // 2, width // 2, noisy.device, dtype),
            return_dict=False,
            **condition.transformer_kwargs(count, dtype),
        )[0]
        return unpack(out, height, width)

    # -- files -----------------------------------------------------------------------------------
    def architecture(self, denoiser: nn.Module, targets: Mapping[str, nn.Module]) -> dict[str, Any]:
        """The denoiser's class, the residual targets' kind (Linear), the text width and whether the model
        has a guidance embedding (dev) or not (schnell): same layer shapes, different models."""
        kinds = {"linear" if isinstance(p, nn.Linear) else "conv" for p in targets.values()}
        config = getattr(denoiser, "config", None)
        return {
            FLUX_RECORD[0]: FLUX_RECORD[1],
            "proj_out": "/".join(sorted(kinds)),
            FLUX_TEXT_WIDTH: int(getattr(config, FLUX_TEXT_WIDTH, 0)),
            FLUX_GUIDANCE: bool(getattr(config, FLUX_GUIDANCE, False)),
        }

    def kohya_names(self, layers: list[str]) -> dict[str, str]:
        """Module path -> kohya's name: the original (BFL) name with underscores after ``lora_unet_``, e.g.
        ``lora_unet_double_blocks_0_img_attn_proj``, ``lora_unet_single_blocks_0_linear2``."""
        return {layer: KOHYA_PREFIX + bfl_name(layer).replace(".", "_") for layer in layers}

    def kohya_model_version(self, conv: bool, base: str | None) -> str:
        return KOHYA_VERSION

    @property
    def diffusers_lora_prefix(self) -> str | None:
        """Keys of a diffusers-format LoRA file start with the component's name: ``transformer.``
        (FluxLoraLoaderMixin's ``transformer_name``; it ignores ``unet.`` keys without a word)."""
        return "transformer."

    @property
    def lora_targets(self) -> tuple[str, ...]:
        """The layers diffusers' Flux DreamBooth-LoRA script adapts by default (``FLUX_LORA_TARGETS``)."""
        return FLUX_LORA_TARGETS


FLUX = FluxBackbone()


def distilled(pipe: Any) -> bool:
    """A guidance-distilled transformer (Flux.1-dev): guidance is an input of the model, not two calls."""
    return bool(pipe.transformer.config.guidance_embeds)


def sequence_length(pipe: Any) -> int:
    """The T5 tokens of a prompt: the tokenizer's ``model_max_length`` (bounded by load_pipeline), at
    most 512, diffusers' and the reference trainers' length for Flux.1."""
    return min(TEXT_LENGTH, int(pipe.tokenizer_2.model_max_length))


def is_flux_transformer(denoiser: object) -> bool:
    return isinstance(denoiser, FluxTransformer2DModel)


def bfl_name(path: str) -> str:
    """The original (Black Forest Labs) name of a residual target, which ComfyUI and kohya use:
    ``transformer_blocks.i.attn.to_out.0`` -> ``double_blocks.i.img_attn.proj``,
    ``single_transformer_blocks.i.proj_out`` -> ``single_blocks.i.linear2``."""
    double, single = DOUBLE_TARGET.fullmatch(path), SINGLE_TARGET.fullmatch(path)
    if double:
        return f"double_blocks.{double.group(1)}.img_attn.proj"
    if single:
        return f"single_blocks.{single.group(1)}.linear2"
    raise ModelError(
        f"{path} is not a Flux residual target (a double block's attn.to_out.0 or a single block's proj_out)"
    )


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): 2x2 patches as tokens, row-major, as FluxPipeline packs them."""
    count, channels, height, width = latents.shape
    patches = latents.view(count, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(count, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, h/2 * w/2, 4C) -> (N, C, h, w): the inverse of ``pack``."""
    count, _, features = tokens.shape
    patches = tokens.view(count, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(count, features // 4, height, width)


def image_ids(rows: int, columns: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows x columns, 3) position ids of the packed image tokens: (0, row, column)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)
