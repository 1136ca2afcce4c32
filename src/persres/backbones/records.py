"""Each family's architecture record in residual files, read without torch (``persres info`` reads
headers and must start fast). The U-Net family records its proj_out kind and text width, and SDXL its
added conditioning; Flux records its denoiser's class, text width and guidance embedding."""

from __future__ import annotations

import json
from typing import Any

# SDXL's U-Net is conditioned on a pooled text embedding and size ids as well as the text sequence
XL_CONDITIONING = ("addition_embed_type", "text_time")
# A Flux record names its denoiser; the U-Net records (written before Flux) name none
FLUX_RECORD = ("denoiser", "FluxTransformer2DModel")
FLUX_TEXT_WIDTH = "joint_attention_dim"  # the T5 width the transformer reads (4096 for Flux.1)
FLUX_GUIDANCE = "guidance_embeds"  # Flux.1-dev: True (guidance-distilled); Flux.1-schnell: False


def is_xl_config(config: Any) -> bool:
    """Whether a U-Net config (an object or a recorded dict) has SDXL's added conditioning."""
    key, value = XL_CONDITIONING
    found = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return bool(found == value)


def is_flux_record(recorded: Any) -> bool:
    """Whether a recorded architecture (a dict) is a Flux transformer's."""
    key, value = FLUX_RECORD
    return isinstance(recorded, dict) and recorded.get(key) == value


def describe(recorded: str | None) -> str:
    """A recorded architecture by name: Flux.1, SDXL, SD 2.x (Linear proj_out) or SD 1.x (Conv2d proj_out)."""
    try:
        fields = json.loads(recorded) if recorded else {}
    except ValueError:
        fields = {}
    if not isinstance(fields, dict):
        return "an unknown architecture"
    if is_flux_record(fields):
        guidance = "guidance-distilled" if fields.get(FLUX_GUIDANCE) else "no guidance embedding"
        return f"Flux.1 (transformer, text width {fields.get(FLUX_TEXT_WIDTH)}, {guidance})"
    if is_xl_config(fields):
        name = "SDXL"
    elif fields.get("proj_out") == "linear":
        name = "SD 2.x"
    elif fields.get("proj_out") == "conv":
        name = "SD 1.x"
    else:
        return "an unknown architecture"
    return f"{name} (proj_out {fields['proj_out']}, text width {fields.get('cross_attention_dim')})"


def architecture_problem(value: dict[str, object]) -> str | None:
    """Why a recorded ``{"addition_embed_type"?: str}`` part (the U-Net's) or Flux's ``{"denoiser",
    "joint_attention_dim": int, "guidance_embeds": bool}`` part is not one persres writes, or None."""
    if not isinstance(value.get(XL_CONDITIONING[0], ""), str):
        return f"has an {XL_CONDITIONING[0]} that is not text"
    if FLUX_RECORD[0] in value and not is_flux_record(value):
        return f"has a {FLUX_RECORD[0]} that is not {FLUX_RECORD[1]}"
    if is_flux_record(value):
        width, guidance = value.get(FLUX_TEXT_WIDTH), value.get(FLUX_GUIDANCE)
        if type(width) is not int or width < 1:
            return f"has a {FLUX_TEXT_WIDTH} that is not a positive whole number"
        if not isinstance(guidance, bool):
            return f"has a {FLUX_GUIDANCE} that is not true or false"
    return None
