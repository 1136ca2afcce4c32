"""The one trainable module type: a low-rank residual wrapped around a transformer block's ``proj_out``.

Paper (section 3): W'_i = W_i + A_i B_i with A_i (m_i x r_i) and B_i (r_i x m_i), on the output
projection of every transformer block of a frozen U-Net. ``proj_out`` is a 1x1 ``Conv2d`` in SD 1.x
and a ``Linear`` in SD 2.x (``use_linear_projection=True``); both are handled alike, the Conv2d by
viewing its (m, m, 1, 1) kernel as a matrix.

Every patch has an exact inverse: ``remove_residuals`` undoes ``add_residuals`` (modules, weights and
``requires_grad`` flags); ``unmerge`` undoes ``merge`` by restoring a copy of the original weight (exact,
also in fp16); ``residuals_disabled`` gives the base model, merged or not.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from persres.backbones import Backbone, backbone_of_denoiser
from persres.config import ResidualConfig
from persres.core.quantize import is_quantized
from persres.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

RANDOM_UP_STD = 1e-3  # choice: "random" init draws A small, so the start stays close to the base model
# Attribute of the U-Net that holds each parameter's ``requires_grad`` from before ``add_residuals``
# (which freezes the base), so that ``remove_residuals`` can give them back.
GRAD_FLAGS = "_persres_requires_grad"


class ResidualProjOut(nn.Module):
    """``base(x) + A (B x)``: the frozen ``proj_out`` plus a trainable low-rank residual.

    Factors are kept in fp32 whatever the base dtype (fp16 training then needs no gradient unscaling
    of half-precision parameters).

    Several concepts share one wrapper by stacking factors: A = [A_1 A_2], B = [B_1; B_2], so
    A B = A_1 B_1 + A_2 B_2 (``groups`` holds each concept's rank). ``mask`` (N, groups, HW), set by
    localized sampling and ``None`` otherwise, restricts each concept to its own positions. It is
    applied in rank space, M_g * A_g (B_g x) = A_g (M_g * B_g x), which costs r instead of m channels.
    """

    def __init__(
        self,
        base: nn.Linear | nn.Conv2d,
        rank: int,
        init: str = "zero",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        out_features, in_features = base.weight.shape[:2]
        self.base = base
        device = base.weight.device
        self.A = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))
        self.B = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        # B as a Linear layer's default init (Kaiming uniform), as in LoRA's down projection.
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5), generator=generator)
        if init == "random":
            nn.init.normal_(self.A, std=RANDOM_UP_STD, generator=generator)
        self.enabled = True
        self.groups: tuple[int, ...] = (rank,)
        self.mask: torch.Tensor | None = None
        self._weight_before_merge: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def merged(self) -> bool:
        return self._weight_before_merge is not None

    def delta_weight(self) -> torch.Tensor:
        """A B shaped like the base weight: (out, in) or (out, in, 1, 1)."""
        delta = self.A @ self.B  # (out, in)
        return delta[:, :, None, None] if self.is_conv else delta

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """A (M * B x) without the base output, in the factors' precision."""
        x = x.to(self.A.dtype)
        if self.is_conv:  # x: (N, C, H, W)
            hidden = F.conv2d(x, self.B[:, :, None, None])  # (N, r, H, W)
            if self.mask is not None:
                hidden = hidden * self.rank_mask().view(hidden.shape[0], -1, *hidden.shape[2:])
            return F.conv2d(hidden, self.A[:, :, None, None])
        hidden = F.linear(x, self.B)  # x: (N, HW, C) -> (N, HW, r)
        if self.mask is not None:
            hidden = hidden * self.rank_mask().transpose(1, 2)
        return F.linear(hidden, self.A)

    def rank_mask(self) -> torch.Tensor:
        """The (N, groups, HW) mask over rank channels: as is for one concept (it broadcasts over r),
        else repeated over each concept's rank channels, (N, r, HW)."""
        assert self.mask is not None
        mask = self.mask.to(self.A.dtype)
        if len(self.groups) == 1:
            return mask
        return mask.repeat_interleave(torch.tensor(self.groups, device=mask.device), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled or self.merged:
            return out
        return out + self.residual(x).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold A B into the base weight; forward then costs nothing extra."""
        if self.merged:
            return
        weight = self.base.weight
        if is_quantized(weight):
            raise ConfigError(
                "residuals cannot be merged into a base with 8-bit weights (`quantize_base`); "
                "merge into the base as shipped (persres merge), or sample without merging"
            )
        self._weight_before_merge = weight.detach().clone()
        weight.add_(self.delta_weight().to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge``."""
        if self._weight_before_merge is None:
            return
        self.base.weight.copy_(self._weight_before_merge)
        self._weight_before_merge = None


def find_residuals(unet: nn.Module) -> dict[str, ResidualProjOut]:
    """Residual wrappers in ``unet``, keyed by module path (e.g. ``mid_block.attentions.0.proj_out``)."""
    return {name: module for name, module in unet.named_modules() if isinstance(module, ResidualProjOut)}


def find_proj_outs(unet: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """The layers that get residuals, keyed by module path, as the denoiser's backbone names them (the
    ``proj_out`` of every transformer block of a U-Net); unwrapped when they already have residuals or a
    peft LoRA adapter (`method` lora adapts Flux's ``attn.to_out.0``, a residual target too)."""
    found: dict[str, nn.Linear | nn.Conv2d] = {}
    for path, proj in backbone_of_denoiser(unet).residual_targets(unet).items():
        if isinstance(proj, ResidualProjOut):
            proj = proj.base
        base_layer = getattr(proj, "get_base_layer", None)  # peft's tuner layers give the layer they wrap
        if callable(base_layer):
            proj = base_layer()
        if not _is_pointwise(proj):
            raise ModelError(
                f"{path} is a {type(proj).__name__}; personalized residuals need a Linear or a 1x1 Conv2d "
                "proj_out (Stable Diffusion 1.x/2.x U-Nets)"
            )
        found[path] = proj  # type: ignore[assignment]  # a Linear or a 1x1 Conv2d, checked just above
    return found


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1


def add_residuals(
    unet: nn.Module,
    config: ResidualConfig = ResidualConfig(),
    ranks: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, ResidualProjOut]:
    """Wrap every transformer block's ``proj_out`` with a residual and freeze everything else.

    ``ranks`` (module path -> rank) overrides ``config.rank`` per layer, e.g. when loading a file.
    ``generator`` makes the random factor init reproducible (the global RNG otherwise).
    Returns the wrappers keyed by module path; afterwards only their factors require gradients.
    """
    if find_residuals(unet):
        raise ConfigError("this U-Net already has residuals; call remove_residuals(unet) first")
    targets = find_proj_outs(unet)
    if ranks is not None:
        _check_same_layers(set(ranks), set(targets))
    backbone = backbone_of_denoiser(unet)
    # may raise
    chosen = {path: _rank_of(backbone, path, proj, config, ranks) for path, proj in targets.items()}
    setattr(unet, GRAD_FLAGS, [(p, p.requires_grad) for p in unet.parameters()])
    unet.requires_grad_(False)
    wrapped: dict[str, ResidualProjOut] = {}
    for path, proj in targets.items():
        wrapper = ResidualProjOut(proj, chosen[path], config.init, generator)
        _set_module(unet, path, wrapper)
        wrapped[path] = wrapper
    log.info("added residuals to %d proj_out layers, %d parameters", len(wrapped), count_parameters(wrapped))
    return wrapped


def _rank_of(
    backbone: Backbone,
    path: str,
    proj: nn.Linear | nn.Conv2d,
    config: ResidualConfig,
    ranks: Mapping[str, int] | None,
) -> int:
    width = min(proj.weight.shape[0], proj.weight.shape[1])
    rank = ranks[path] if ranks is not None else backbone.default_rank(path, proj, config)
    if not 1 <= rank <= width:
        raise ConfigError(f"rank {rank} for layer {path} must be between 1 and its width {width}")
    return rank


def _check_same_layers(given: set[str], present: set[str]) -> None:
    if given != present:
        raise ConfigError(
            f"ranks given for layers the U-Net lacks: {sorted(given - present)}; "
            f"layers without a rank: {sorted(present - given)}"
        )


def remove_residuals(unet: nn.Module) -> dict[str, ResidualProjOut]:
    """Put the original ``proj_out`` modules back (unmerging first): the state dict is as before, and
    every parameter's ``requires_grad`` is again what it was before ``add_residuals`` froze the base."""
    removed = find_residuals(unet)
    for path, wrapper in removed.items():
        wrapper.unmerge()
        _set_module(unet, path, wrapper.base)
    flags: list[tuple[nn.Parameter, bool]] = unet.__dict__.pop(GRAD_FLAGS, [])
    for param, flag in flags:
        param.requires_grad_(flag)
    return removed


def merge_residuals(unet: nn.Module) -> None:
    for wrapper in find_residuals(unet).values():
        wrapper.merge()


def unmerge_residuals(unet: nn.Module) -> None:
    for wrapper in find_residuals(unet).values():
        wrapper.unmerge()


def fold_residuals(unet: nn.Module) -> int:
    """Merge the residuals for good and drop the wrappers: a plain diffusers U-Net remains.
    Returns the number of layers folded."""
    wrappers = find_residuals(unet)
    for path, wrapper in wrappers.items():
        wrapper.merge()
        wrapper._weight_before_merge = None
        _set_module(unet, path, wrapper.base)
    return len(wrappers)


@contextlib.contextmanager
def residuals_disabled(unet: nn.Module) -> Iterator[None]:
    """Run the base model inside the block, merged or not: residuals are bypassed, and merged ones are
    unmerged (the weight holds W + A B otherwise) and merged again on exit. Unmerging restores the saved
    W and merging recomputes W + A B from it, so both the base and the merged weights are exact."""
    wrappers = find_residuals(unet)
    before = {path: (w.enabled, w.merged) for path, w in wrappers.items()}
    try:
        for wrapper in wrappers.values():
            wrapper.enabled = False
            wrapper.unmerge()
        yield
    finally:
        for path, wrapper in wrappers.items():
            wrapper.enabled, merged = before[path]
            if merged:
                wrapper.merge()


def count_parameters(residuals: Mapping[str, ResidualProjOut]) -> int:
    return sum(w.A.numel() + w.B.numel() for w in residuals.values())


def residual_parameters(unet: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable factors keyed as in the saved file: ``{module path}.A`` and ``{module path}.B``."""
    params: dict[str, nn.Parameter] = {}
    for path, wrapper in find_residuals(unet).items():
        params[f"{path}.A"] = wrapper.A
        params[f"{path}.B"] = wrapper.B
    return params


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)
