"""The U-Net family's architecture record in residual files, read without torch (``persres info``
reads headers and must start fast): SDXL is told by its added conditioning."""

from __future__ import annotations

import json
from typing import Any

# SDXL's U-Net is conditioned on a pooled text embedding and size ids as well as the text sequence
XL_CONDITIONING = ("addition_embed_type", "text_time")


def is_xl_config(config: Any) -> bool:
    """Whether a U-Net config (an object or a recorded dict) has SDXL's added conditioning."""
    key, value = XL_CONDITIONING
    found = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return bool(found == value)


def describe(recorded: str | None) -> str:
    """A recorded architecture by name: SDXL, SD 2.x (Linear proj_out) or SD 1.x (Conv2d proj_out)."""
    try:
        fields = json.loads(recorded) if recorded else {}
    except ValueError:
        fields = {}
    if not isinstance(fields, dict):
        return "an unknown architecture"
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
    """Why a recorded ``{"addition_embed_type"?: str}`` part is not one persres writes, or None."""
    if not isinstance(value.get(XL_CONDITIONING[0], ""), str):
        return f"has an {XL_CONDITIONING[0]} that is not text"
    return None
