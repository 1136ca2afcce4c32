"""Localized attention-guided (LAG) sampling: cross-attention maps -> per-block masks at ``proj_out``.

Paper (section 3.2): at each transformer block, sum the cross-attention maps of the identifier V*
and of the macro-class word, binarise at the median to get M_i at the block's own resolution, and
apply the residual only there: f = W x + b + M_i * (A B x). ``attn2`` runs before ``proj_out`` in
the same block, so this step's mask is ready when ``proj_out`` needs it: one U-Net pass per step.
Choices: maps are averaged over heads; under classifier-free guidance the unconditional half (which
has no V*) reuses the conditional half's mask. With several concepts each gets its own mask from its
own token and class word; a concept the prompt does not mention gets an empty mask.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from persres.attention import CaptureCrossAttnProcessor, cross_attentions, swapped_processors
from persres.errors import ConfigError
from persres.residuals import ResidualProjOut, find_residuals


def block_mask(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Binary masks (B, groups, HW) from attention probabilities (B, heads, HW, T).

    ``columns`` (N, groups, T) marks each concept's token columns for the N conditional prompts; a
    batch of 2N is [unconditional; conditional] (classifier-free guidance) and reuses the mask.
    """
    batch, count = probs.shape[0], columns.shape[0]
    if batch not in (count, 2 * count):
        raise ValueError(f"attention batch {batch} does not match {count} prompt(s)")
    maps = probs.float().mean(dim=1)[batch - count :]  # (N, HW, T), conditional half
    score = torch.einsum("nlt,ngt->ngl", maps, columns.to(maps.device))  # (N, groups, HW)
    median = score.median(dim=-1, keepdim=True).values
    mask = (score > median).float()
    return torch.cat([mask, mask]) if batch == 2 * count else mask


@dataclass
class LagState:
    """What the capture processors read and write, held by reference (``Attention.forward`` drops
    unknown kwargs). ``step`` is advanced by the pipeline's step-end callback; with ``record`` the
    conditional masks are kept per step and block for ``--save-masks``."""

    columns: torch.Tensor  # (N, groups, T)
    record: bool = False
    step: int = 0
    records: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def on_step_end(self, pipe: object, step: int, timestep: object, kwargs: dict) -> dict:
        """``callback_on_step_end`` for diffusers pipelines."""
        self.step += 1
        return kwargs


def mask_setter(state: LagState, block: str, wrapper: ResidualProjOut) -> CaptureCrossAttnProcessor:
    """A processor whose attention maps become ``wrapper``'s mask for this step."""

    def hook(probs: torch.Tensor) -> None:
        mask = block_mask(probs, state.columns)
        wrapper.mask = mask
        if state.record:
            count = state.columns.shape[0]
            state.records.setdefault(state.step, {})[block] = mask[-count:].cpu()

    return CaptureCrossAttnProcessor(hook)


@contextlib.contextmanager
def localized(unet: nn.Module, state: LagState) -> Iterator[None]:
    """Sample with LAG inside this block: capture processors on every ``attn2`` feed the masks of
    their block's ``proj_out`` (in a block with several, the last one before ``proj_out`` decides).
    Processors and masks are restored on exit, also on error."""
    wrappers = find_residuals(unet)
    if not wrappers:
        raise ConfigError("localized sampling needs residuals in the U-Net; load a residual file first")
    if any(w.merged for w in wrappers.values()):
        raise ConfigError(
            "residuals are merged into the weights; unmerge_residuals(unet) before LAG sampling"
        )
    groups = {len(w.groups) for w in wrappers.values()}
    if groups != {state.columns.shape[1]}:
        raise ConfigError(f"{state.columns.shape[1]} concept(s) in the prompt plan but {groups} in the U-Net")
    processors = {}
    for path, wrapper in wrappers.items():
        block = path.removesuffix(".proj_out")
        for attn_path in cross_attentions(unet.get_submodule(block), block):
            processors[attn_path] = mask_setter(state, block, wrapper)
    try:
        with swapped_processors(unet, processors):
            yield
    finally:
        for wrapper in wrappers.values():
            wrapper.mask = None
