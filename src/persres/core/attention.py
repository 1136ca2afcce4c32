"""Swapping attention processors for a while, e.g. the capture processors of localized sampling.

The processors that expose attention probabilities are base-model knowledge and live with their
backbone (``backbones.unet_attention.CaptureCrossAttnProcessor`` for the U-Net's ``attn2``,
``backbones.flux_attention.FluxCaptureProcessor`` for Flux's joint attention); the backbone hands
them out through ``capture_processor``. ``swapped_processors`` installs them and restores the
original processors exactly, also on error. ``CaptureCrossAttnProcessor`` is re-exported here, where
it used to live.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import nn

from persres.backbones.unet_attention import CaptureCrossAttnProcessor

__all__ = ["CaptureCrossAttnProcessor", "swapped_processors"]


@contextlib.contextmanager
def swapped_processors(unet: nn.Module, processors: Mapping[str, object]) -> Iterator[None]:
    """Install ``processors`` (keyed by attention module path) for the block's duration.

    ``set_attn_processor`` wants every layer and pops from the dict it is given: it always gets a
    fresh, complete copy.
    """
    original = dict(unet.attn_processors)
    unknown = sorted(set(processors) - {key.removesuffix(".processor") for key in original})
    if unknown:
        raise KeyError(f"no attention layers at {unknown}")
    swapped = dict(original)
    swapped.update({f"{path}.processor": processor for path, processor in processors.items()})
    unet.set_attn_processor(swapped)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))
