"""LoRA (Hu et al. 2021) as diffusers' DreamBooth-LoRA trains Stable Diffusion 1.x.

peft adapters on ``to_q, to_k, to_v, to_out.0`` of every attention layer of the U-Net (self- and
cross-attention), added through diffusers' own integration (``unet.add_adapter(LoraConfig(...))``),
exactly as ``examples/dreambooth/train_dreambooth_lora.py`` does: rank r, ``lora_alpha = r`` (scale
1), ``init_lora_weights="gaussian"`` (down factor N(0, 1/r^2), up factor zero, so training starts at
the base model). The script also targets ``add_k_proj``/``add_v_proj``, which SD 1.x/2.x U-Nets lack.

The result is diffusers' LoRA file, ``pytorch_lora_weights.safetensors`` written by
``StableDiffusionPipeline.save_lora_weights``, which ``pipe.load_lora_weights`` loads without persres;
persres' metadata (token, class word, base, method, step) rides in the safetensors header, which
diffusers' loader ignores beside its own ``format`` and ``lora_adapter_metadata`` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from persres.errors import ConfigError, InputError, ModelError, first_line, quote
from persres.methods.catalog import METHODS
from persres.methods.named_tensors import concept_in, load_named, read_metadata, save_named
from persres.methods.patches import patching
from persres.methods.protocol import RESULT, Trainable

if TYPE_CHECKING:
    from persres.config import TrainConfig
    from persres.formats.concepts import Concept

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER = "default"  # the name unet.add_adapter gives its adapter
WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


class LoRA:
    name = "lora"
    recipe = METHODS["lora"].recipe
    options = METHODS["lora"].options
    adds_token = False

    def training_prompt(self, config: TrainConfig) -> str:
        return config.prompt

    def identifier(self, config: TrainConfig) -> str:
        return config.token

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            unet = pipe.unet
            if getattr(unet, "peft_config", None):
                raise ConfigError("this U-Net already has LoRA adapters; load a fresh base pipeline to train")
            for model in (pipe.unet, pipe.vae, pipe.text_encoder):
                patches.requires_grad(model, False)
            rank = config.lora_rank
            check_rank(unet, rank)
            lora = LoraConfig(
                r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS)
            )
            try:
                unet.add_adapter(lora)
            except ValueError as exc:
                raise ModelError(f"cannot add LoRA adapters to {type(unet).__name__}: {exc}") from None
            patches.add(unet.unload_lora)  # peft's layers give back the base layers they wrap
            return Trainable(initialised(lora_parameters(unet), rank, generator))

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        pass

    def save_state(self, trainable: Trainable, path: Path, metadata: dict[str, str]) -> None:
        save_named({name: p.float() for name, p in trainable.params.items()}, path, metadata)

    def load_state(self, trainable: Trainable, path: Path) -> None:
        load_named(trainable.params, path)

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        header = {**metadata, "method": self.name, "format": "pt"}  # "format": as diffusers writes it

        def write(weights: dict[str, torch.Tensor], filename: str) -> None:
            save_named({k: v.float() for k, v in weights.items()}, Path(filename), header)

        folder = out / RESULT
        folder.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet), save_function=write
        )
        return folder / WEIGHTS

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        with patching(pipe, self.name, "load") as patches:
            file = path / WEIGHTS if path.is_dir() else path
            if not file.is_file():
                raise ConfigError(f"LoRA file {file} not found; pass the {WEIGHTS} of a training run")
            metadata = read_metadata(file)
            concept = concept_in(file, metadata, pipe.unet)
            check_fits(file, pipe.unet, metadata.get("base_model", "unknown"))
            patches.add(pipe.unet.unload_lora)  # also what a failed load left (check_fits: U-Net layers only)
            try:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(f"{file} does not fit this base model's U-Net: {first_line(exc)}") from None
            return concept


def initialised(
    params: dict[str, nn.Parameter], rank: int, generator: torch.Generator
) -> dict[str, nn.Parameter]:
    """The adapters' factors as the script starts them: peft's gaussian down factors drawn from the run's
    generator, every factor in fp32 whatever the base dtype (the script's cast_training_params)."""
    with torch.no_grad():
        for name, param in params.items():
            if ".lora_A." in name:
                draw = torch.randn(param.shape, generator=generator, device=generator.device)
                param.copy_(draw / rank)
            param.data = param.data.float()
    return params


def check_rank(unet: nn.Module, rank: int) -> None:
    """A rank above a layer's smaller side adds parameters and file size (1.4 GB at rank 100,000) but no
    expressiveness: refused, naming the narrowest layer adapted."""
    sides = {
        name: min(module.in_features, module.out_features)
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(tuple(f".{t}" for t in TARGETS))
    }
    if sides:
        layer = min(sides, key=lambda name: sides[name])
        if rank > sides[layer]:
            raise ConfigError(
                f"`rank` {rank} is above the width {sides[layer]} of layer {layer}, where a LoRA of full "
                f"rank is reached; use a rank <= {sides[layer]} (the recipe's is 4)"
            )


def check_fits(file: Path, unet: nn.Module, base_model: str) -> None:
    """Every layer of a LoRA file is in ``unet`` with the file's width, read from the file's header
    (diffusers would list every mismatched tensor over hundreds of lines)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file} is not a readable safetensors file ({first_line(exc)})") from None
    use = f"use the base model it was trained on ({quote(base_model)})"
    for key, shape in sorted(shapes.items()):
        layer, _, factor = key.removeprefix("unet.").rpartition(".lora_")
        try:
            weight = unet.get_submodule(layer).weight
        except AttributeError:
            raise InputError(f"{file}: layer {layer} is not in this base model's U-Net; {use}") from None
        down = factor.startswith("A")
        wide, own = (shape[-1], weight.shape[1]) if down else (shape[0], weight.shape[0])
        if len(shape) != 2 or wide != own:
            raise InputError(
                f"{file}: layer {layer} is {wide} wide in the file ({key} {shape}), {own} in this base "
                f"model's U-Net; {use}"
            )


def lora_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' factors keyed as in diffusers' LoRA file without its ``unet.`` prefix, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``."""
    return {
        name.replace(f".{ADAPTER}.", "."): param
        for name, param in unet.named_parameters()
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
    }
