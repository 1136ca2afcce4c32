"""LoRA (Hu et al. 2021) as diffusers' DreamBooth-LoRA scripts train Stable Diffusion 1.x and Flux.1.

peft adapters on the layers the base's backbone names (``lora_targets``: on a U-Net ``to_q, to_k, to_v,
to_out.0`` of every attention layer, as ``examples/dreambooth/train_dreambooth_lora.py``; on Flux the
attention and MLP layers ``train_dreambooth_lora_flux.py`` adapts by default), added through diffusers'
own integration (``denoiser.add_adapter(LoraConfig(...))``) as both scripts do: rank r, ``lora_alpha =
r`` (scale 1), ``init_lora_weights="gaussian"`` (down factor N(0, 1/r^2), up factor zero, so training
starts at the base model).

The result is diffusers' LoRA file, ``pytorch_lora_weights.safetensors`` written by the pipeline class's
own ``save_lora_weights`` (``unet_lora_layers`` or ``transformer_lora_layers``, after the component the
backbone's ``diffusers_lora_prefix`` names), which ``pipe.load_lora_weights`` loads without persres;
persres' metadata (token, class word, base, method, step) rides in the safetensors header, which
diffusers' loader ignores beside its own ``format`` and ``lora_adapter_metadata`` keys.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from persres.backbones import Backbone, backbone_of
from persres.errors import ConfigError, InputError, ModelError, first_line, quote
from persres.methods.catalog import METHODS
from persres.methods.named_tensors import concept_in, load_named, read_metadata, save_named
from persres.methods.patches import patching
from persres.methods.protocol import RESULT, Trainable

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

    from persres.config import TrainConfig
    from persres.formats.concepts import Concept

ADAPTER = "default"  # the name add_adapter gives its adapter
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
        backbone = backbone_of(pipe)
        with patching(pipe, self.name, "prepare") as patches:
            denoiser = backbone.denoiser(pipe)
            if getattr(denoiser, "peft_config", None):
                raise ConfigError(
                    f"this {type(denoiser).__name__} already has LoRA adapters; load a fresh base pipeline "
                    "to train"
                )
            for _, encoder in backbone.text_towers(pipe):
                if encoder is not None:  # released text encoders are None
                    patches.requires_grad(encoder, False)
            for model in (denoiser, pipe.vae):
                patches.requires_grad(model, False)
            rank = config.lora_rank
            targets = backbone.lora_targets
            check_rank(denoiser, rank, targets)
            lora = LoraConfig(
                r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)
            )
            try:
                with warnings.catch_warnings():  # an 8-bit base (`quantize_base`): nothing merges in training
                    warnings.filterwarnings("ignore", "TorchaoLoraLinear was instantiated without")
                    denoiser.add_adapter(lora)
            except ValueError as exc:
                raise ModelError(f"cannot add LoRA adapters to {type(denoiser).__name__}: {exc}") from None
            patches.add(denoiser.unload_lora)  # peft's layers give back the base layers they wrap
            return Trainable(initialised(lora_parameters(denoiser), rank, generator))

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

        backbone = backbone_of(pipe)
        layers = {f"{component(backbone)}_lora_layers": get_peft_model_state_dict(backbone.denoiser(pipe))}
        folder = out / RESULT
        folder.mkdir(parents=True, exist_ok=True)
        backbone.pipeline_class.save_lora_weights(folder, save_function=write, **layers)
        return folder / WEIGHTS

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        backbone = backbone_of(pipe)
        with patching(pipe, self.name, "load") as patches:
            denoiser = backbone.denoiser(pipe)
            file = path / WEIGHTS if path.is_dir() else path
            if not file.is_file():
                raise ConfigError(f"LoRA file {file} not found; pass the {WEIGHTS} of a training run")
            metadata = read_metadata(file)
            concept = concept_in(file, metadata, denoiser)
            check_fits(file, denoiser, backbone, metadata.get("base_model", "unknown"))
            patches.add(denoiser.unload_lora)  # also what a failed load left (check_fits: its layers only)
            try:
                pipe.load_lora_weights(str(file.parent), weight_name=file.name)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise ConfigError(
                    f"{file} does not fit this base model's {what(backbone)}: {first_line(exc)}"
                ) from None
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


def component(backbone: Backbone) -> str:
    """The pipeline component a diffusers LoRA file holds, as ``save_lora_weights`` names its argument
    (``unet``, ``transformer``): the backbone's ``diffusers_lora_prefix`` without its dot."""
    prefix = backbone.diffusers_lora_prefix
    if not prefix:
        raise ModelError(f"{backbone.name} has no diffusers LoRA format; `method` lora cannot save on it")
    return prefix.rstrip(".")


def what(backbone: Backbone) -> str:
    """The denoiser as messages name it: U-Net or transformer."""
    return "U-Net" if component(backbone) == "unet" else component(backbone)


def check_rank(denoiser: nn.Module, rank: int, targets: tuple[str, ...]) -> None:
    """A rank above a layer's smaller side adds parameters and file size (1.4 GB at rank 100,000) but no
    expressiveness: refused, naming the narrowest layer adapted."""
    sides = {
        name: min(module.in_features, module.out_features)
        for name, module in denoiser.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(tuple(f".{t}" for t in targets))
    }
    if sides:
        layer = min(sides, key=lambda name: sides[name])
        if rank > sides[layer]:
            raise ConfigError(
                f"`rank` {rank} is above the width {sides[layer]} of layer {layer}, where a LoRA of full "
                f"rank is reached; use a rank <= {sides[layer]} (the recipe's is 4)"
            )


def check_fits(file: Path, denoiser: nn.Module, backbone: Backbone, base_model: str) -> None:
    """Every layer of a LoRA file is in ``denoiser`` with the file's width, read from the file's header
    (diffusers would list every mismatched tensor over hundreds of lines)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file} is not a readable safetensors file ({first_line(exc)})") from None
    use = f"use the base model it was trained on ({quote(base_model)})"
    prefix, name = backbone.diffusers_lora_prefix or "", what(backbone)
    for key, shape in sorted(shapes.items()):
        layer, _, factor = key.removeprefix(prefix).rpartition(".lora_")
        try:
            weight = denoiser.get_submodule(layer).weight
        except AttributeError:
            raise InputError(f"{file}: layer {layer} is not in this base model's {name}; {use}") from None
        down = factor.startswith("A")
        wide, own = (shape[-1], weight.shape[1]) if down else (shape[0], weight.shape[0])
        if len(shape) != 2 or wide != own:
            raise InputError(
                f"{file}: layer {layer} is {wide} wide in the file ({key} {shape}), {own} in this base "
                f"model's {name}; {use}"
            )


def lora_parameters(denoiser: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' factors keyed as in diffusers' LoRA file without its component prefix, e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``."""
    return {
        name.replace(f".{ADAPTER}.", "."): param
        for name, param in denoiser.named_parameters()
        if f".lora_A.{ADAPTER}." in name or f".lora_B.{ADAPTER}." in name
    }
