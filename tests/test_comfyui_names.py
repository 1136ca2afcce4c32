"""persres' Flux LoRA files against ComfyUI's published LoRA key rule for Flux.

This checks our exported files against ComfyUI's key rule, transcribed below as data and small functions
from its source; it does not run ComfyUI (which cannot be installed here). What is transcribed, from the
public repository comfyanonymous/ComfyUI:

- comfy/lora.py ``model_lora_keys_unet`` (commit 41444b5236c613ee5ff7d09aa620f94b702f30eb; the newest
  stored text of the function, which adds the DiffSynth bare form and the ``linear1_qkv`` form, has the
  same Flux entries otherwise): for every weight ``diffusion_model.<k>.weight`` of the model, the key
  ``lora_unet_<k, dots as underscores>`` (kohya) and ``diffusion_model.<k>``; and for a Flux model, for
  every diffusers weight ``<d>.weight`` that ``comfy.utils.flux_to_diffusers`` maps, the keys
  ``transformer.<d>`` (diffusers), ``lycoris_<d_>``, ``lora_transformer_<d_>`` and ``<d>``, each to the
  BFL weight (or to a slice of a fused BFL weight: q, k, v and the single blocks' MLP input).
- comfy/utils.py ``flux_to_diffusers`` (the stored text of the function; the index gives no commit for
  it): ``transformer_blocks.i.attn.to_out.0`` -> ``double_blocks.i.img_attn.proj``,
  ``single_transformer_blocks.i.proj_out`` -> ``single_blocks.i.linear2``, both whole weights.
- comfy/lora.py ``load_lora`` (41444b5) and comfy/weight_adapter/lora.py ``LoRAAdapter.load``
  (6fd406fb14ca663225b88c6f75d7a7f2b997e5a0): for each key ``x`` of the map, ``x.alpha`` if present, then
  the first pair present of (up, down) suffixes: ``.lora_up.weight``/``.lora_down.weight``,
  ``_lora.up.weight``, ``.lora_B.weight``/``.lora_A.weight``, ``.lora.up.weight``, ``.lora_B``,
  ``.lora_linear_layer.up.weight``, ``.lora_B.default.weight``; a key of the file used by none is
  logged "lora key not loaded" and ignored.
- ``calculate_weight`` (same two files): W += strength * (alpha / rank) * up @ down, rank = down.shape[0],
  alpha / rank = 1 without an alpha.
- comfy/lora_convert.py ``convert_lora`` (ee9834b8ca0d339c2bc0be3cf6ea8db02bc698df): a file is rewritten
  first only if it holds one of three formats' marker keys (BFL control LoRAs, Wan Fun, USO).
- comfy/ldm/flux/layers.py (413322645e713bdda69836620a97d4c9ca66b230): ``img_attn.proj`` is
  Linear(hidden, hidden) and ``linear2`` Linear(hidden + mlp_ratio * hidden, hidden), its input the
  attention output then the MLP's, in diffusers' ``proj_out`` order, so ComfyUI loads diffusers' weights
  into them unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from helpers import train_argv
from safetensors import safe_open

from persres.backbones.flux import DEFAULT_RANK, FLUX
from persres.cli import main
from persres.core.residuals import find_proj_outs
from persres.formats.io import architecture, read_residual_file, write_residual_file
from persres.testing.reference_configs import FLUX_DEV_TRANSFORMER

Target = str | tuple[str, tuple[int, int, int]]  # a BFL weight, or (weight, (dim, start, length)): a slice
MODEL = "diffusion_model."
MLP_RATIO = 4.0  # Flux.1's (ComfyUI's flux params and diffusers' single block both)
# flux_to_diffusers: a block's diffusers Linear -> its BFL Linear, whole
DOUBLE_WHOLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
SINGLE_WHOLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
# ... or into a slice of a fused one: (BFL Linear, first row in units of hidden, rows in units of hidden)
DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0, 1),
    "attn.to_k": ("img_attn.qkv", 1, 1),
    "attn.to_v": ("img_attn.qkv", 2, 1),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 1),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 1),
}
SINGLE_FUSED = {
    "attn.to_q": ("linear1", 0, 1),
    "attn.to_k": ("linear1", 1, 1),
    "attn.to_v": ("linear1", 2, 1),
    "proj_mlp": ("linear1", 3, 4),
}
# load_lora / LoRAAdapter.load: (up, down) name patterns, in the order tried
LORA_PAIRS = (
    ("{}.lora_up.weight", "{}.lora_down.weight"),
    ("{}_lora.up.weight", "{}_lora.down.weight"),
    ("{}.lora_B.weight", "{}.lora_A.weight"),
    ("{}.lora.up.weight", "{}.lora.down.weight"),
    ("{}.lora_B", "{}.lora_A"),
    ("{}.lora_linear_layer.up.weight", "{}.lora_linear_layer.down.weight"),
    ("{}.lora_B.default.weight", "{}.lora_A.default.weight"),
)
# convert_lora: the keys whose presence makes ComfyUI rewrite a file before loading it
CONVERT_MARKERS = (
    {"img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale"},
    {"lora_unet__blocks_0_cross_attn_k.lora_down.weight"},
    {"single_blocks.37.processor.qkv_lora.up.weight", "double_blocks.18.processor.qkv_lora2.up.weight"},
)


def flux_to_diffusers(depth: int, single: int, hidden: int) -> dict[str, Target]:
    """Diffusers weight key -> BFL weight (``diffusion_model.`` prefix), for the blocks' Linear layers."""
    key_map: dict[str, Target] = {}
    for blocks, ours, theirs, whole, fused in (
        (depth, "transformer_blocks", "double_blocks", DOUBLE_WHOLE, DOUBLE_FUSED),
        (single, "single_transformer_blocks", "single_blocks", SINGLE_WHOLE, SINGLE_FUSED),
    ):
        for i in range(blocks):
            for d, b in whole.items():
                key_map[f"{ours}.{i}.{d}.weight"] = f"{MODEL}{theirs}.{i}.{b}.weight"
            for d, (b, start, rows) in fused.items():
                key_map[f"{ours}.{i}.{d}.weight"] = (f"{MODEL}{theirs}.{i}.{b}.weight",
                                                     (0, start * hidden, rows * hidden))  # fmt: skip
    return key_map


def comfy_flux_key_map(depth: int, single: int, hidden: int) -> dict[str, Target]:
    """model_lora_keys_unet for a Flux model of ``depth`` double and ``single`` single blocks."""
    diffusers = flux_to_diffusers(depth, single, hidden)
    weights = {target if isinstance(target, str) else target[0] for target in diffusers.values()}
    key_map: dict[str, Target] = {}
    for k in weights:  # the model's own state dict (BFL names)
        key_map["lora_unet_" + k[len(MODEL) : -len(".weight")].replace(".", "_")] = k
        key_map[k[: -len(".weight")]] = k
    for d, target in diffusers.items():
        name = d[: -len(".weight")]
        key_map[f"transformer.{name}"] = target
        key_map[f"lycoris_{name.replace('.', '_')}"] = target
        key_map[f"lora_transformer_{name.replace('.', '_')}"] = target
        key_map[name] = target
    return key_map


Patch = tuple[torch.Tensor, torch.Tensor, float | None]  # up, down, alpha


def load_lora(
    lora: dict[str, torch.Tensor], key_map: dict[str, Target]
) -> tuple[dict[Target, Patch], set[str]]:
    """The patches ComfyUI makes of ``lora`` (target -> up, down, alpha) and the keys it leaves unloaded."""
    patches: dict[Target, Patch] = {}
    loaded: set[str] = set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        for up, down in LORA_PAIRS:
            if up.format(x) in lora:
                patches[target] = (lora[up.format(x)], lora[down.format(x)], alpha)
                loaded |= {up.format(x), down.format(x)}
                break
    return patches, set(lora) - loaded


def lora_delta(patch: Patch, strength: float = 1.0) -> torch.Tensor:
    """calculate_weight's change of the weight: (strength * alpha / rank) * up @ down."""
    up, down, alpha = patch
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return (strength * scale) * torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))


def bfl_shape(target: str, hidden: int) -> tuple[int, int]:
    """The weight shape of a BFL layer (layers.py): img_attn.proj and linear2."""
    if target.endswith(".img_attn.proj.weight"):
        return (hidden, hidden)
    assert target.endswith(".linear2.weight"), target
    return (hidden, hidden + int(hidden * MLP_RATIO))


def read_lora(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def ours_by_target(depth: int, single: int, hidden: int) -> dict[str, str]:
    """BFL weight -> our residual layer (diffusers module path), for the two residual kinds."""
    return {t: d[: -len(".weight")] for d, t in flux_to_diffusers(depth, single, hidden).items()
            if isinstance(t, str) and t.endswith((".img_attn.proj.weight", ".linear2.weight"))}  # fmt: skip


def check_comfyui_loads(
    file: Path, residuals: dict[str, tuple[torch.Tensor, torch.Tensor]], depth: int, single: int,
    hidden: int, scale: float,
) -> None:  # fmt: skip
    """Every tensor of ``file`` loads into a whole BFL weight of its shape, none is left, and ComfyUI's
    change of each weight is exactly ``scale`` times our residual's A B."""
    lora = read_lora(file)
    assert not any(marker <= set(lora) for marker in CONVERT_MARKERS)  # convert_lora leaves it as it is
    patches, unloaded = load_lora(lora, comfy_flux_key_map(depth, single, hidden))
    assert unloaded == set()  # no "lora key not loaded"
    targets = ours_by_target(depth, single, hidden)
    assert set(patches) == {t for t, layer in targets.items() if layer in residuals}  # whole weights only
    for target, patch in patches.items():
        assert isinstance(target, str)
        up, down, alpha = patch
        rank = down.shape[0]
        assert up.dim() == down.dim() == 2 and up.shape[1] == rank  # a Linear's LoRA, no 1x1 conv factors
        assert (up.shape[0], down.shape[1]) == bfl_shape(target, hidden)
        assert alpha is None or alpha == rank  # kohya's 0-dim alpha (read with .item()); diffusers': none
        a, b = residuals[targets[target]]
        assert torch.equal(lora_delta(patch), scale * (a @ b))  # exact: alpha / rank is 1, scale a power of 2


@pytest.fixture(scope="module")
def flux_run(flux_base: Path, photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "flux"
    assert main(train_argv(flux_base, photos, run, "--lr", "0.05")) == 0
    return run


def test_the_rule_transcribed_gives_comfyuis_names_for_the_published_layers() -> None:
    """The transcription itself, on entries any Flux LoRA user meets (ComfyUI's own names)."""
    key_map = comfy_flux_key_map(19, 38, 3072)
    assert (
        key_map["lora_unet_double_blocks_0_img_attn_proj"]
        == "diffusion_model.double_blocks.0.img_attn.proj.weight"
    )
    assert key_map["lora_unet_single_blocks_37_linear2"] == "diffusion_model.single_blocks.37.linear2.weight"
    assert (
        key_map["transformer.single_transformer_blocks.37.proj_out"]
        == key_map["lora_unet_single_blocks_37_linear2"]
    )
    assert key_map["transformer.transformer_blocks.0.attn.to_q"] == (
        "diffusion_model.double_blocks.0.img_attn.qkv.weight",
        (0, 0, 3072),
    )
    assert key_map["transformer.single_transformer_blocks.0.proj_mlp"] == (
        "diffusion_model.single_blocks.0.linear1.weight", (0, 9216, 12288))  # fmt: skip
    up, down = torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert torch.allclose(lora_delta((up, down, 2.0)), 0.5 * up @ down)  # alpha / rank
    assert torch.equal(lora_delta((up, down, None)), up @ down)  # no alpha: 1


@pytest.mark.parametrize(
    ("fmt", "scale"), [("kohya", 1.0), ("kohya", 0.5), ("diffusers", 1.0), ("diffusers", 0.5)]
)
def test_a_tiny_flux_runs_export_loads_whole_in_comfyuis_key_map(
    flux_run: Path, flux_base: Path, tmp_path: Path, fmt: str, scale: float
) -> None:
    file = tmp_path / f"{fmt}.safetensors"
    assert main(["export", str(flux_run), "--format", fmt, "--out", str(file), "--scale", str(scale)]) == 0
    residuals = read_residual_file(flux_run).layers()
    assert len(residuals) == 4 and all((a @ b).abs().max() > 0 for a, b in residuals.values())  # trained
    transformer = FluxTransformer2DModel.from_pretrained(flux_base, subfolder="transformer")
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    shapes = {path: tuple(layer.weight.shape) for path, layer in find_proj_outs(transformer).items()}
    targets = ours_by_target(2, 2, hidden)
    assert all(shapes[layer] == bfl_shape(target, hidden) for target, layer in targets.items())
    check_comfyui_loads(file, residuals, 2, 2, hidden, scale)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_flux_dev_width_factors_fit_comfyuis_layers_and_every_layer_has_its_key(
    fmt: str, tmp_path: Path
) -> None:
    """The published Flux.1-dev config: img_attn.proj 3072 x 3072 and linear2 3072 x 15360, on a file of
    one block of each kind at that width (the 57-layer file would be 68 MB); and the names of all 57
    layers, in both forms, are keys of ComfyUI's map for the 19 + 38 blocks."""
    with init_empty_weights():
        reduced = FluxTransformer2DModel.from_config({**FLUX_DEV_TRANSFORMER, "num_layers": 1,
                                                      "num_single_layers": 1})  # fmt: skip
        full = FluxTransformer2DModel.from_config(FLUX_DEV_TRANSFORMER)
    generator = torch.Generator().manual_seed(0)
    residuals = {
        path: (torch.randn(layer.out_features, DEFAULT_RANK, generator=generator),
               torch.randn(DEFAULT_RANK, layer.in_features, generator=generator))
        for path, layer in find_proj_outs(reduced).items()
    }  # fmt: skip
    header = {"token": "sks", "class_word": "dog", "architecture": architecture(reduced)}
    source = write_residual_file(residuals, tmp_path / "dev.safetensors", header)
    file = tmp_path / f"dev-{fmt}.safetensors"
    assert main(["export", str(source), "--format", fmt, "--out", str(file)]) == 0
    check_comfyui_loads(file, residuals, 19, 38, 3072, 1.0)
    lora = read_lora(file)
    ups = {
        key: tuple(t.shape) for key, t in lora.items() if key.endswith(("lora_up.weight", "lora_B.weight"))
    }
    assert sorted(ups.values()) == [(3072, DEFAULT_RANK)] * 2
    key_map, diffusers = comfy_flux_key_map(19, 38, 3072), flux_to_diffusers(19, 38, 3072)
    layers = list(find_proj_outs(full))
    names = FLUX.kohya_names(layers) if fmt == "kohya" else {p: f"transformer.{p}" for p in layers}
    assert len(set(names.values())) == 57  # each to the whole BFL weight ComfyUI loads our layer's into:
    assert all(key_map[name] == diffusers[f"{path}.weight"] for path, name in names.items())
