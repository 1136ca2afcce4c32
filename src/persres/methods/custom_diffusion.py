"""Custom Diffusion (Kumari et al., CVPR 2023): only the cross-attention key and value projections
(``attn2.to_k``, ``attn2.to_v``) of the U-Net and a new modifier token are trained.

As diffusers' ``examples/custom_diffusion/train_custom_diffusion.py`` does: every attention layer gets a
``CustomDiffusionAttnProcessor2_0`` (``train_kv=True, train_q_out=False`` on the cross-attention
layers), whose ``to_k_custom_diffusion`` / ``to_v_custom_diffusion`` start as copies of the layer's
``to_k`` / ``to_v``; the modifier token is added to the tokenizer, its embedding initialised from the rare
token "ktn" (the script's ``--initializer_token`` default ``ktn+pll+ucd``, first entry). The token is
``--token`` as Textual Inversion and Perfusion write it (``<sks>``; ``placeholder``); the script's
``--modifier_token`` default is ``<new1>``. Only its name differs: the row starts from "ktn" either way.

One difference, on purpose: the script lets the optimizer update the whole embedding matrix and zeroes
the gradient of every row but the new one; AdamW's decoupled weight decay still shrinks those rows a
little every step. Here the matrix stays frozen and the new row is its own parameter, put in place by
a forward hook on the token embedding (``new_token.learned_row``), so every other row stays exactly
as the base has it. The processors and the hook are patches with inverses (``persres.methods.patches``).

Regularisation: the paper retrieves 200 real images of the class from LAION (the README's
``--real_prior``, clip-retrieval); persres draws 200 with the base model instead (``persres.training.prior``,
the script's behaviour without ``--real_prior``). The script's scale augmentation (random zoom with a
masked loss and "a far away"/"zoomed in" prompt prefixes) is not in persres' shared loop.

The result folder holds ``pytorch_custom_diffusion_weights.safetensors`` (``unet.save_attn_procs``),
``<token>.safetensors`` (``pipe.load_textual_inversion``; named by the token, as the script names it)
and ``persres_concept.json``, which records the token sampling uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from persres.core.tokens import check_token
from persres.errors import ConfigError, InputError, quote
from persres.files import atomic_dir
from persres.formats.concepts import Concept
from persres.methods.catalog import METHODS
from persres.methods.concept_json import read_concept, write_concept
from persres.methods.named_tensors import NamedTensorState
from persres.methods.new_token import add_token, learned_row, placeholder, word_embedding, write_row
from persres.methods.patches import Patches, patching
from persres.methods.protocol import RESULT, Trainable
from persres.quiet import warnings_hidden

if TYPE_CHECKING:
    from persres.config import TrainConfig

log = logging.getLogger(__name__)

MODIFIER = "<new1>"  # the script's --modifier_token, which results of persres 0.2 always used
INITIALIZER = "ktn"
WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"
EMBEDDING = f"{MODIFIER}.safetensors"  # the token's file in those results: "<token>.safetensors"
TOKEN_PARAM = f"text_encoder.token_embedding.{MODIFIER}"  # the row's checkpoint name, whatever the token


@dataclass(frozen=True)
class ModifierTrainable(Trainable):
    """Custom Diffusion's parameters, and the modifier token with its row in the embedding matrix."""

    token: str = MODIFIER
    row: int = -1


class CustomDiffusion(NamedTensorState):
    name = "custom-diffusion"
    recipe = METHODS["custom-diffusion"].recipe
    options = METHODS["custom-diffusion"].options
    adds_token = True

    def training_prompt(self, config: TrainConfig) -> str:
        return f"photo of a {placeholder(config.token)} {config.class_word}"  # the README's --instance_prompt

    def identifier(self, config: TrainConfig) -> str:
        return placeholder(config.token)

    def prepare(
        self, pipe: StableDiffusionPipeline, config: TrainConfig, generator: torch.Generator
    ) -> Trainable:
        with patching(pipe, self.name, "prepare") as patches:
            for model in (pipe.unet, pipe.vae, pipe.text_encoder):
                patches.requires_grad(model, False)
            params: dict[str, nn.Parameter] = {}
            for name, processor in add_processors(pipe.unet, patches).items():
                for key, param in processor.named_parameters():
                    params[f"{name}.{key}"] = param  # the keys of save_attn_procs' file
            token = self.identifier(config)
            embedding_file(token)  # a token that cannot name its file is refused before anything is added
            params[TOKEN_PARAM], row = add_modifier(pipe, token, patches)
            return ModifierTrainable(params, text_trainable=True, token=token, row=row)

    def after_step(self, pipe: StableDiffusionPipeline, trainable: Trainable) -> None:
        """Write the learned row into the (frozen) embedding matrix; every other row is never touched."""
        write_row(pipe, modifier_of(trainable).row, trainable.params[TOKEN_PARAM])

    def save(
        self, pipe: StableDiffusionPipeline, trainable: Trainable, out: Path, metadata: dict[str, str]
    ) -> Path:
        self.after_step(pipe, trainable)
        token = modifier_of(trainable).token
        target = Path(out) / RESULT
        row = trainable.params[TOKEN_PARAM].detach().to("cpu", torch.float32).contiguous()
        with atomic_dir(target, replace=True) as tmp:  # an extended run rewrites its result
            # diffusers warns that attn1's entries, empty, are left out
            with warnings_hidden("diffusers.loaders.unet"):
                pipe.unet.save_attn_procs(tmp, weight_name=WEIGHTS, safe_serialization=True)
            save_file({token: row}, str(tmp / embedding_file(token)), metadata={"format": "pt"})
            write_concept(tmp, self.name, token, metadata)
        return target

    def load(self, pipe: StableDiffusionPipeline, path: Path) -> Concept:
        """Into a fresh base: the attention processors with diffusers' ``unet.load_attn_procs`` and the
        token with ``pipe.load_textual_inversion``. The processors come back with ``unpatch``."""
        with patching(pipe, self.name, "load") as patches:
            return load_result(pipe, Path(path), self.name, patches)


def load_result(pipe: StableDiffusionPipeline, folder: Path, method: str, patches: Patches) -> Concept:
    """``CustomDiffusion.load``, its changes recorded in ``patches``."""
    concept = read_concept(folder, method, pipe.unet)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{folder / WEIGHTS} is missing or damaged ({exc}); pass the folder train wrote"
        ) from None
    # diffusers 0.42.1 installs the processors only when given its pipeline (huggingface/diffusers
    # issue 9320) and then needs every layer: safetensors cannot hold the self-attention layers'
    # empty entries, so they are given back as empty dicts, which diffusers reads as "no weights"
    state: dict[str, object] = {**weights}
    expected = {name for name in pipe.unet.attn_processors if name.endswith("attn2.processor")}
    check_fits(pipe.unet, weights, expected, folder / WEIGHTS)
    state.update({name: {} for name in pipe.unet.attn_processors if name not in expected})
    check_token(pipe.tokenizer, concept.token, new=True)  # e.g. a pipeline it was loaded into before
    patches.saving_processors(pipe.unet)
    try:
        with warnings_hidden(
            "diffusers.models.modeling_utils"
        ):  # a false alarm about fp32 modules (there are none)
            pipe.unet.load_attn_procs(state, _pipeline=pipe)
        embedding = embedding_file(concept.token)
        pipe.load_textual_inversion(str(folder), weight_name=embedding, token=concept.token)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"{folder} does not load into this base model ({exc})") from None
    return concept


def check_fits(unet: nn.Module, weights: dict[str, torch.Tensor], expected: set[str], file: Path) -> None:
    """Every cross-attention layer of ``unet`` has its K and V in the file, shaped like the layer's own
    (diffusers builds processors from the file's shapes and would fail only when sampling)."""
    found = {key.rsplit(".", 2)[0] for key in weights}
    if found != expected:
        only_file, only_model = sorted(found - expected)[:3], sorted(expected - found)[:3]
        raise InputError(
            f"{file} does not fit this base model's cross-attention layers: in the file only "
            f"{only_file or 'none'}, in the model only {only_model or 'none'}; use the base it was trained on"
        )
    for key, value in sorted(weights.items()):
        layer, _, name = key.rpartition(".processor.")
        own = getattr(unet.get_submodule(layer), name.split("_custom_diffusion")[0]).weight
        if value.shape != own.shape or not value.is_floating_point():
            raise InputError(
                f"{file}: tensor {key} is {value.dtype} {tuple(value.shape)}, the model's layer is "
                f"{tuple(own.shape)}; use the base it was trained on"
            )


def add_processors(unet: nn.Module, patches: Patches) -> dict[str, CustomDiffusionAttnProcessor2_0]:
    """Custom Diffusion processors on every attention layer, as the script sets them (the originals
    kept in ``patches``); returns the cross-attention ones, whose key and value projections train
    (copies of the layer's own)."""
    processors, trained = {}, {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        cross = name.endswith("attn2.processor")
        processor = CustomDiffusionAttnProcessor2_0(
            train_kv=cross,
            train_q_out=False,
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features if cross else None,
        )
        if cross:
            processor.load_state_dict(
                {
                    "to_k_custom_diffusion.weight": attn.to_k.weight,
                    "to_v_custom_diffusion.weight": attn.to_v.weight,
                }
            )
            processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
            trained[name] = processor
        processors[name] = processor
    patches.processors(unet, processors)
    return trained


def add_modifier(pipe: StableDiffusionPipeline, token: str, patches: Patches) -> tuple[nn.Parameter, int]:
    """Add ``token`` to the tokenizer, grow the embedding matrix by its row and return that row as a
    parameter, started from the initializer token's embedding, and its id; a hook (kept in
    ``patches``) puts it in the prompt."""
    ids = pipe.tokenizer(INITIALIZER, add_special_tokens=False).input_ids
    if len(ids) != 1:  # the script refuses; a toy vocabulary has no "ktn": start from its pieces' mean
        log.warning(
            "initializer %r is %d tokens in this tokenizer; starting from their mean", INITIALIZER, len(ids)
        )
    start = word_embedding(pipe, INITIALIZER)
    new_id = add_token(pipe, token)
    write_row(pipe, new_id, start)
    row = nn.Parameter(pipe.text_encoder.get_input_embeddings().weight[new_id].detach().clone())
    learned_row(pipe, new_id, lambda: row, patches)
    return row, new_id


def embedding_file(token: str) -> str:
    """The token's file in the result folder, named by the token as diffusers' script names it."""
    if "/" in token or "\\" in token or "\0" in token:
        raise ConfigError(
            f"`token` {quote(token)} names Custom Diffusion's embedding file and cannot hold / or \\; "
            "choose another `token`"
        )
    return f"{token}.safetensors"


def modifier_of(trainable: Trainable) -> ModifierTrainable:
    if not isinstance(trainable, ModifierTrainable) or trainable.row < 0:
        raise ConfigError("Custom Diffusion needs the Trainable its prepare() returned")
    return trainable


CUSTOM_DIFFUSION = CustomDiffusion()
