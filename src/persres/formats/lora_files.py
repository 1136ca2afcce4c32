"""A residual as a LoRA file, and back: ``persres export`` and ``persres import``.

A residual W' = W + A B on ``proj_out`` is a LoRA on that layer with down = B (r x m), up = A (m x r)
and alpha = r, so that the LoRA scale alpha / r is exactly 1 whatever the rank (a file may hold several
ranks). Two formats:

- **kohya** (AUTOMATIC1111, Forge, ComfyUI, SD.Next, InvokeAI, kohya's scripts, and diffusers):
  ``lora_unet_<module path, dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (0-dim), with kohya's ``ss_*`` metadata. For SD 1.x/2.x kohya names modules as diffusers does; for
  SDXL it uses the original (sgm) U-Net's names, e.g. ``lora_unet_input_blocks_4_1_proj_out`` for
  diffusers' ``down_blocks.1.attentions.0.proj_out`` (``kohya_names``).
- **diffusers** (``pipe.load_lora_weights``): ``<component>.<module path>.lora_A.weight`` (down) /
  ``.lora_B.weight`` (up), the component prefix as the backbone names it (``diffusers_lora_prefix``:
  ``unet.`` for Stable Diffusion, ``transformer.`` for Flux, whose loader ignores keys of any other
  component without a word), with ``lora_adapter_metadata``: one flat JSON object whose keys carry the
  component prefix (``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``,
  ``unet.target_modules``; ``transformer.r``, ... on Flux), so that every layer loads at scale 1 in
  diffusers (measured: 0.42.1; nested under "unet" the object reads as empty).

A 1x1 ``Conv2d`` ``proj_out`` (SD 1.x) takes 4-D factors ``[r, m, 1, 1]`` / ``[m, r, 1, 1]``, a
``Linear`` (SD 2.x) 2-D ones. Both files carry persres' own metadata: the token, the class word, the
trigger phrase, and the residual file's whole metadata (``persres_metadata``), so that import gives the
residual file back exactly.

Import checks what ``sample`` will check, before it writes: a factor of the wrong kind for the base's
layers (4-D Conv2d factors, SD 1.x, against a Linear base, SD 2.x or SDXL, and the reverse), a persres
export's recorded architecture (``io.check_architecture``), factors that are not finite or whose change
A B is absurd (``io.check_factors``); and it refuses damaged LoRA metadata by name: an alpha that is not
one finite number, a rank below 1, adapter metadata that is not a JSON object of numbers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from persres import ranges, readback
from persres.backbones import Backbone, backbone_for_base, backbone_of_record
from persres.backbones.unet import KOHYA_PREFIX, SD, SDXL
from persres.errors import ConfigError, InputError, ResidualFileError, quote
from persres.files import atomic_path, check_apart, check_writable
from persres.formats.header import ResidualHeader, check_metadata
from persres.formats.io import (
    ResidualFile,
    check_architecture,
    check_factors,
    read_residual_file,
    write_residual_file,
)
from persres.formats.runfolder import RESIDUALS_FILE
from persres.methods.catalog import METHODS

FORMATS = ("kohya", "diffusers")
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PERSRES_METADATA = "persres_metadata"
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A up (m, r), B down (r, m))


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read back as residual factors (alpha / rank folded into A)."""

    path: Path
    format: str
    factors: Factors
    metadata: dict[str, str]  # the file's own header

    def residual_metadata(self) -> dict[str, str] | None:
        """The residual file's metadata, when persres exported this file; checked as a residual file's."""
        raw = self.metadata.get(PERSRES_METADATA)
        if not raw:
            return None
        value = json_metadata(self.path, PERSRES_METADATA, raw)
        if not all(isinstance(v, str) for v in value.values()):
            raise InputError(f"{self.path}: metadata {PERSRES_METADATA} holds values that are not strings")
        check_metadata(ResidualHeader(self.path, value, {}))
        return value


def json_metadata(file: Path, key: str, raw: str) -> dict:
    """A metadata value that must be a JSON object."""
    try:
        value = readback.loads(raw)
    except ValueError as exc:  # readback's: not JSON, NaN or infinity, an integer of thousands of digits
        raise InputError(f"{file}: metadata {key} is {str(exc)[:80]}") from None
    if not isinstance(value, dict):
        raise InputError(f"{file}: metadata {key} is a JSON {type(value).__name__}, not an object")
    return value


def number(file: Path, what: str, value: object, least: float | None = None) -> float:
    """A finite number from a LoRA file (at least ``least``), or an error naming it."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 and value.dim() <= 1 else list(value.shape)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{file}: {what} is {quote(str(value))}, not a number; the file is damaged")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result) or (least is not None and result < least):
        bound = f" of at least {least:g}" if least is not None else ""
        raise InputError(f"{file}: {what} is {quote(str(value))}, not a finite number{bound}; it is damaged")
    return result


# export ---------------------------------------------------------------------------------------------


def export_lora(
    source: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], scale: float = 1.0,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the residuals of a run or residual file as a LoRA file in ``fmt`` (kohya or diffusers);
    ``scale`` is folded into the up factors."""
    if fmt not in FORMATS:
        raise ConfigError(f"`fmt` {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        ranges.SCALE.check(scale)  # the table --scale is parsed with: NaN, infinity, past +-100 refused
    except ValueError as exc:
        raise ConfigError(f"`scale` {exc}") from None
    from persres.formats.runs import read_from

    target = check_lora_out(out, overwrite)
    check_apart(target, "out", [("source", read_from(source))], folder=False)
    loaded = read_exportable(source)
    conv = is_conv(loaded)
    backbone = backbone_of_file(loaded)
    if fmt == "diffusers":
        prefix = diffusers_prefix(backbone, loaded.path)
        tensors = diffusers_tensors(loaded.layers(), prefix, conv, scale)
        header = diffusers_metadata(loaded, prefix)
    else:
        names = backbone.kohya_names(list(loaded.layers()))
        tensors, header = kohya_tensors(loaded.layers(), names, conv, scale), kohya_metadata(loaded)
    header.update(persres_header(loaded))
    with atomic_path(target, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return target


def diffusers_prefix(backbone: Backbone, file: Path) -> str:
    """The component prefix of the backbone's diffusers-format keys (``unet.``, ``transformer.``)."""
    prefix = backbone.diffusers_lora_prefix
    if prefix is None:
        raise ConfigError(
            f"`fmt` diffusers is not yet available for {backbone.name} residual files ({file}); use "
            "`fmt` kohya, which diffusers' load_lora_weights reads too"
        )
    return prefix


def check_lora_out(out: str | os.PathLike[str], overwrite: bool) -> Path:
    target = Path(out)
    check_writable(target, "out", folder=False)  # first: a folder is refused as a folder, whatever its name
    if target.suffix != ".safetensors":
        raise ConfigError(f"`out` {target}: a LoRA file is written as .safetensors; end the name with it")
    if target.exists() and not overwrite:
        raise ConfigError(f"`out` {target} already exists; pass `overwrite` to replace it, or choose another")
    return target


def read_exportable(source: str | os.PathLike[str]) -> ResidualFile:
    """A residual file, or a residuals run's; another method's run is named with where its result is."""
    from persres.formats.runs import read_run

    run = read_run(source)
    if run is not None and not METHODS[run.method].trains_residuals:
        raise ConfigError(
            f"{source} is a {run.method} run: export converts personalized residuals; its result "
            f"{run.result} is already in its own format"
        )
    return read_residual_file(source)


def is_conv(loaded: ResidualFile) -> bool:
    """1x1 Conv2d proj_out (SD 1.x) or Linear (SD 2.x), from the architecture train recorded."""
    architecture = loaded.json_field("architecture")
    kind = architecture.get("proj_out") if isinstance(architecture, dict) else None
    if kind not in ("conv", "linear"):
        raise ResidualFileError(
            f"{loaded.path} does not record whether its proj_out layers are Conv2d or Linear (metadata "
            "'architecture'); export the file train wrote"
        )
    return bool(kind == "conv")


def backbone_of_file(loaded: ResidualFile) -> Backbone:
    """The backbone a residual file was made for, from the architecture train recorded in it."""
    return backbone_of_record(loaded.json_field("architecture"))


def kohya_names(layers: list[str], xl: bool) -> dict[str, str]:
    """Module path -> kohya's name, as the U-Net backbone (SD 1.x/2.x, or SDXL with ``xl``) names it."""
    return (SDXL if xl else SD).kohya_names(layers)


def shaped(factor: torch.Tensor, conv: bool) -> torch.Tensor:
    factor = factor.to(torch.float32).contiguous()
    return factor[:, :, None, None].contiguous() if conv else factor


def kohya_tensors(
    layers: Factors, names: dict[str, str], conv: bool, scale: float
) -> dict[str, torch.Tensor]:
    tensors = {}
    for layer, (up, down) in layers.items():
        name = names[layer]
        tensors[f"{name}.lora_down.weight"] = shaped(down, conv)
        tensors[f"{name}.lora_up.weight"] = shaped(up * scale, conv)
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
    return tensors


def diffusers_tensors(layers: Factors, prefix: str, conv: bool, scale: float) -> dict[str, torch.Tensor]:
    """``<prefix><module path>.lora_A.weight`` (down) and ``.lora_B.weight`` (up, times ``scale``)."""
    tensors = {}
    for layer, (up, down) in layers.items():
        tensors[f"{prefix}{layer}.lora_A.weight"] = shaped(down, conv)
        tensors[f"{prefix}{layer}.lora_B.weight"] = shaped(up * scale, conv)
    return tensors


def ranks_of(loaded: ResidualFile) -> dict[str, int]:
    return {layer: int(b.shape[0]) for layer, (_, b) in loaded.layers().items()}


def base_model_version(loaded: ResidualFile) -> str:
    """kohya's ``ss_base_model_version``, as the file's backbone names its base (e.g. sd_v1, sd_v2_v)."""
    backbone = backbone_of_file(loaded)
    base = loaded.metadata.get("base_model", "")
    return backbone.kohya_model_version(is_conv(loaded), base or None)


def kohya_metadata(loaded: ResidualFile) -> dict[str, str]:
    top = max(ranks_of(loaded).values())
    version = base_model_version(loaded)
    return {
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(top),  # the largest rank; every layer's alpha equals its own rank
        "ss_network_alpha": str(top),
        "ss_output_name": loaded.metadata.get("token", "persres"),
    }


def diffusers_metadata(loaded: ResidualFile, prefix: str) -> dict[str, str]:
    """The peft LoraConfig of the file, flat, each key after the component ``prefix`` (``unet.r``, ...)."""
    ranks = ranks_of(loaded)
    top = max(ranks.values())
    config = {
        f"{prefix}r": top,
        f"{prefix}lora_alpha": top,
        f"{prefix}rank_pattern": ranks,
        f"{prefix}alpha_pattern": ranks,  # alpha = rank per layer: every layer at scale 1
        f"{prefix}target_modules": sorted(ranks),
    }
    return {"format": "pt", ADAPTER_METADATA: json.dumps(config, indent=2, sort_keys=True)}


def persres_header(loaded: ResidualFile) -> dict[str, str]:
    token, class_word = loaded.metadata.get("token", ""), loaded.metadata.get("class_word", "")
    return {
        "persres_token": token,
        "persres_class_word": class_word,
        "persres_trigger": f"{token} {class_word}".strip(),  # write it in the prompt: "a photo of a sks dog"
        PERSRES_METADATA: json.dumps(loaded.metadata, sort_keys=True),
    }


# import ---------------------------------------------------------------------------------------------


def read_lora(
    path: str | os.PathLike[str], layers: dict[str, bool], backbone: Backbone = SD
) -> LoraFile:
    """A kohya or diffusers LoRA file as residual factors for the ``proj_out`` ``layers`` of a base
    (module path -> is a Conv2d; ``backbone``: the base's, which names kohya's layers); a tensor of any
    other layer is refused by name."""
    file = Path(path)
    if file.suffix != ".safetensors" or not file.is_file():
        raise InputError(f"{file} is not a .safetensors file; persres reads LoRA files only as safetensors")
    try:
        with safe_open(str(file), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file} is not a readable safetensors file ({exc})") from None
    prefix = backbone.diffusers_lora_prefix
    if tensors and all(key.startswith(KOHYA_PREFIX) for key in tensors):
        return LoraFile(file, "kohya", kohya_factors(file, tensors, layers, backbone), metadata)
    if prefix and tensors and all(key.startswith(prefix) for key in tensors):
        factors = diffusers_factors(file, tensors, metadata, layers, prefix)
        return LoraFile(file, "diffusers", factors, metadata)
    known = (KOHYA_PREFIX, prefix) if prefix else (KOHYA_PREFIX,)
    other = sorted(k for k in tensors if not k.startswith(known))[:3]
    diffusers = f" or diffusers ({prefix}...)" if prefix else ""
    raise InputError(
        f"{file} is not a {backbone.name} LoRA in kohya (lora_unet_...){diffusers} format"
        + (f": e.g. {', '.join(other)}" if other else ": it holds no tensors")
    )


def kohya_factors(
    file: Path, tensors: dict[str, torch.Tensor], layers: dict[str, bool], backbone: Backbone
) -> Factors:
    by_name = {name: layer for layer, name in backbone.kohya_names(list(layers)).items()}
    names = sorted({key.split(".", 1)[0] for key in tensors})
    refuse_other_layers(file, [n for n in names if n not in by_name])
    factors = {}
    for name in names:
        down, up = (
            need(file, tensors, f"{name}.lora_down.weight"),
            need(file, tensors, f"{name}.lora_up.weight"),
        )
        rank = number(file, f"the rank of {name}", down.shape[0] if down.dim() else 0, least=1)
        alpha = number(file, f"{name}.alpha", tensors.get(f"{name}.alpha", rank))
        factors[by_name[name]] = as_factors(file, by_name[name], up * (alpha / rank), down, layers)
    return factors


def diffusers_factors(
    file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], layers: dict[str, bool],
    prefix: str,
) -> Factors:  # fmt: skip
    names = sorted({key[len(prefix) :].rsplit(".", 2)[0] for key in tensors})
    refuse_other_layers(file, [f"{prefix}{n}" for n in names if n not in layers])
    config = json_metadata(file, ADAPTER_METADATA, metadata.get(ADAPTER_METADATA) or "{}")
    patterns = [config.get(f"{prefix}{key}", {}) for key in ("rank_pattern", "alpha_pattern")]
    if not all(isinstance(pattern, dict) for pattern in patterns):
        raise InputError(f"{file}: metadata {ADAPTER_METADATA} has a rank or alpha pattern, not an object")
    factors = {}
    for layer in names:
        down = need(file, tensors, f"{prefix}{layer}.lora_A.weight")
        up = need(file, tensors, f"{prefix}{layer}.lora_B.weight")
        rank = patterns[0].get(layer, config.get(f"{prefix}r", down.shape[0] if down.dim() else 0))
        rank = number(file, f"{ADAPTER_METADATA}: the rank of {layer}", rank, least=1)
        alpha = patterns[1].get(layer, config.get(f"{prefix}lora_alpha", rank))
        alpha = number(file, f"{ADAPTER_METADATA}: the alpha of {layer}", alpha)
        factors[layer] = as_factors(file, layer, up * (alpha / rank), down, layers)
    return factors


def refuse_other_layers(file: Path, others: list[str]) -> None:
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise InputError(
            f"{file} adapts layers that are not proj_out layers of this base: {shown}; persres imports "
            "only LoRAs on the transformer blocks' proj_out (what a residual is)"
        )


def need(file: Path, tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise InputError(f"{file} lacks tensor {key}: a LoRA layer needs both its down and up factors")
    return tensors[key].to(torch.float32)


def as_factors(
    file: Path, layer: str, up: torch.Tensor, down: torch.Tensor, layers: dict[str, bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as 2-D matrices; a 4-D factor must be 1x1 and belong to a Conv2d layer, a 2-D one to a
    Linear layer (as the base's proj_out is: the architecture the file was made for)."""
    if up.dim() == 4 and up.shape[2:] == down.shape[2:] == (1, 1):
        up, down, conv = up[:, :, 0, 0], down[:, :, 0, 0], True
    else:
        conv = False
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise InputError(
            f"{file}: layer {layer} has factors of shapes {tuple(up.shape)} and {tuple(down.shape)}, not a "
            "low-rank pair (m, r) x (r, m) with r >= 1"
        )
    if conv != layers[layer]:
        kinds = ["Conv2d (SD 1.x)", "Linear (SD 2.x, SDXL)"]
        made, base = kinds if conv else kinds[::-1]
        raise InputError(
            f"{file} was made for a base whose proj_out layers are {made} ({layer} has "
            f"{4 if conv else 2}-D factors), but this base model's are {base}. Use the base model the "
            "LoRA was made for"
        )
    return up.contiguous(), down.contiguous()


def import_lora(
    path: str | os.PathLike[str], base: str, out: str | os.PathLike[str], token: str | None = None,
    class_word: str | None = None, overwrite: bool = False,
) -> Path:  # fmt: skip
    """Write the LoRA in ``path`` as ``out/residuals.safetensors`` for ``base``. A file persres exported
    gives its residual file back exactly; another needs ``token`` and ``class_word``. proj_out layers the
    LoRA leaves out get zero residuals of rank 1 (no change)."""
    from persres.core.residuals import find_proj_outs
    from persres.formats.io import architecture

    target = Path(out) / RESIDUALS_FILE
    check_writable(out, "out")
    check_apart(out, "out", [("path", path), ("base", base)])
    if target.exists() and not overwrite:
        raise ConfigError(f"`out` {out} already holds {target.name}; pass `overwrite` to replace it")
    backbone = backbone_for_base(base)
    unet = backbone.skeleton(base)
    proj_outs = find_proj_outs(unet)
    lora = read_lora(path, {name: isinstance(m, torch.nn.Conv2d) for name, m in proj_outs.items()}, backbone)
    metadata = lora.residual_metadata() or new_metadata(lora, base, token, class_word, architecture(unet))
    if token or class_word:
        metadata.update({k: v for k, v in (("token", token), ("class_word", class_word)) if v})
    factors = dict(lora.factors)
    for name, module in proj_outs.items():
        m = module.weight.shape[0]
        if name not in factors:
            factors[name] = (torch.zeros(m, 1), torch.zeros(1, module.weight.shape[1]))
        elif factors[name][0].shape[0] != m:
            raise InputError(
                f"{path}: layer {name} is {factors[name][0].shape[0]} wide in the LoRA, {m} in {base}"
            )
    check_architecture(ResidualFile(lora.path, {}, metadata), unet)  # what sample checks, before writing
    tensors = {f"{name}.{key}": t for name, (a, b) in factors.items() for key, t in (("A", a), ("B", b))}
    check_factors(lora.path, tensors)
    return write_residual_file(factors, target, metadata, overwrite=overwrite)


def new_metadata(
    lora: LoraFile, base: str, token: str | None, class_word: str | None, arch: str
) -> dict[str, str]:
    if not token or not class_word:
        raise ConfigError(
            f"{lora.path} was not exported by persres: pass `token` (the trigger word it was trained with) "
            "and `class_word` (e.g. dog)"
        )
    return {"base_model": base, "architecture": arch, "imported_from": lora.path.name}
