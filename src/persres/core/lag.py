"""Localized attention-guided (LAG) sampling: cross-attention maps -> per-block masks at ``proj_out``.

Paper (section 3.2): at each transformer block, sum the cross-attention maps of the identifier V*
and of the macro-class word, binarise at the median to get M_i at the block's own resolution, and
apply the residual only there: f = W x + b + M_i * (A B x). ``attn2`` runs before ``proj_out`` in
the same block, so this step's mask is ready when ``proj_out`` needs it: one U-Net pass per step.
Choices: maps are averaged over heads; under classifier-free guidance the unconditional half (which has
no V*) reuses the conditional half's mask, in one batch (the U-Net pipelines) or in a second call of the
same step (a pipeline's true classifier-free guidance calls the denoiser with the prompt, then with
the negative prompt: the second call of a step keeps the first call's masks). With several concepts each
gets its own mask from its own token and class word; a concept the prompt does not mention gets an empty
mask. A block with several transformer layers (SDXL: up to 10 before one ``proj_out``) sums the scores
of all its cross-attention layers before the median, as the paper sums over tokens: every layer's view
of where the concept is counts, none decides alone (a single layer equals the paper's SD 1.x case
exactly).

The backbone says which attention layers give a block's maps (``attention_layers``), which processor
captures them (``capture_processor``: all T text columns, or only the requested ones with their
indices, as Flux's joint attention over 512 text positions does), and how the block's mask (N, groups,
HW) lies on the tokens its residual layer sees (``residual_mask``: as is for a U-Net's ``proj_out``,
with T leading zeros for a layer that also sees the text tokens, which stay untouched).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from persres.backbones import ProbsHook, backbone_of_denoiser
from persres.core.attention import swapped_processors
from persres.core.residuals import ResidualProjOut, find_residuals
from persres.errors import ConfigError


def block_mask(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Binary masks (B, groups, HW) from attention probabilities (B, heads, HW, T).

    ``columns`` (N, groups, T) marks each concept's token columns for the N conditional prompts; a
    batch of 2N is [unconditional; conditional] (classifier-free guidance) and reuses the mask.
    """
    return binarize(block_score(probs, columns), probs.shape[0])


def block_score(probs: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Each concept's summed attention per position (N, groups, HW), conditional half only."""
    batch, count = probs.shape[0], columns.shape[0]
    if batch not in (count, 2 * count):
        raise ValueError(f"attention batch {batch} does not match {count} prompt(s)")
    maps = probs.float().mean(dim=1)[batch - count :]  # (N, HW, T), conditional half
    return torch.einsum("nlt,ngt->ngl", maps, columns.to(maps.device))


def binarize(score: torch.Tensor, batch: int) -> torch.Tensor:
    """1 above the median position, per prompt and concept; repeated for a guided batch of 2N."""
    median = score.median(dim=-1, keepdim=True).values
    mask = (score > median).float()
    return torch.cat([mask, mask]) if batch == 2 * score.shape[0] else mask


MaskShape = Callable[[torch.Tensor], torch.Tensor]  # (B, groups, HW) -> over the residual layer's tokens


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


def requested_keys(columns: torch.Tensor) -> torch.Tensor:
    """The text positions (K,) that any prompt's concept reads, ascending: the only key columns a
    capture needs to hand over."""
    return columns.ne(0).flatten(0, 1).any(dim=0).nonzero().flatten()  # (N, groups, T) -> (K,)


def mask_setters(
    state: LagState, block: str, wrapper: ResidualProjOut, layers: int, shape: MaskShape
) -> list[ProbsHook]:
    """Hooks for the ``layers`` attention layers of one block, in the order they run: their scores add
    up, and the last one's sum, laid on the tokens of the residual layer by ``shape``, becomes
    ``wrapper``'s mask for this step. A hook given ``keys`` gets only those text columns."""
    total: list[torch.Tensor] = []
    made_at: list[int] = []  # the step whose call made the current mask

    def hook(index: int, probs: torch.Tensor, keys: torch.Tensor | None = None) -> None:
        if made_at == [state.step]:  # a second call in this step (the negative prompt's): keep the mask
            return
        columns = state.columns if keys is None else state.columns[..., keys.to(state.columns.device)]
        score = block_score(probs, columns)
        total[:] = [score] if index == 0 else [total[0] + score]
        if index < layers - 1:
            return
        mask = binarize(total[0], probs.shape[0])  # (B, groups, HW)
        wrapper.mask = shape(mask)
        made_at[:] = [state.step]
        if state.record:
            count = state.columns.shape[0]
            state.records.setdefault(state.step, {})[block] = mask[-count:].cpu()

    return [functools.partial(hook, i) for i in range(layers)]


@contextlib.contextmanager
def localized(denoiser: nn.Module, state: LagState) -> Iterator[None]:
    """Sample with LAG inside this block: capture processors on the attention layers the backbone names
    (every ``attn2`` of a U-Net block) feed the masks of their block's residual layer (summed over a
    block's several layers, see the module's notes). Processors and masks are restored on exit, also
    on error."""
    wrappers = find_residuals(denoiser)
    if not wrappers:
        raise ConfigError(
            "localized sampling needs residuals in the denoiser (U-Net or transformer); load a residual "
            "file first"
        )
    if any(w.merged for w in wrappers.values()):
        raise ConfigError(
            "residuals are merged into the weights; unmerge_residuals(denoiser) before LAG sampling"
        )
    groups = {len(w.groups) for w in wrappers.values()}
    if groups != {state.columns.shape[1]}:
        raise ConfigError(
            f"{state.columns.shape[1]} concept(s) in the prompt plan but {groups} in the denoiser"
        )
    processors: dict[str, object] = {}
    backbone = backbone_of_denoiser(denoiser)  # it knows which attention layers place each residual
    text_length, keys = state.columns.shape[-1], requested_keys(state.columns)
    for path, wrapper in wrappers.items():
        block = path.removesuffix(".proj_out")
        layers = backbone.attention_layers(denoiser, path)  # in the order they run
        shape = functools.partial(backbone.residual_mask, denoiser, path, text_length=text_length)
        hooks = mask_setters(state, block, wrapper, len(layers), shape)
        for layer, hook in zip(layers, hooks, strict=True):
            processors[layer] = backbone.capture_processor(hook, keys, text_length)
    try:
        with swapped_processors(denoiser, processors):
            yield
    finally:
        for wrapper in wrappers.values():
            wrapper.mask = None
