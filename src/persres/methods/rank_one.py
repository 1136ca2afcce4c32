"""Perfusion's gated rank-one edit of a cross-attention projection (Tewel et al., SIGGRAPH 2023).

Sec. 3 (rank-one model editing, after ROME): with ``i*`` the concept's text encoding, ``C`` the
(uncentered) covariance of text encodings and ``o*`` the output wanted at ``i*``,

    W' = W + (o* - W i*) (C^-1 i*)^T / (i*^T C^-1 i*),

the smallest change (in the C^-1 metric) that maps ``i*`` to ``o*``. Writing
``s(x) = (C^-1 i*)^T x / (i*^T C^-1 i*)`` (the normalised energy of ``x`` along ``i*``), this is

    W' x = W (x - s(x) i*) + s(x) o*,

the part of ``x`` orthogonal to ``i*`` (under C^-1) goes through ``W`` unchanged and its ``i*`` part
is mapped to ``o*``. The gated form (sec. 3, "gated rank-1 editing"; the paper's Algorithm 1) puts a
sigmoid of that similarity in front of ``o*``: ``W (x - s(x) i*) + sigmoid((s(x) - beta) / tau) o*``,
so encodings far from the concept (s << beta) get nearly nothing of it. With no gate the edit is
exactly the ungated rank-one update above (``W' i* = o*``).

Key locking (sec. 3): for ``to_k``, ``o*`` is ``W_k i_super``, the key of the class word's encoding,
so the concept attends where its class would; for ``to_v``, ``o*`` is a learned vector per layer.

The wrappers replace ``attn2.to_k`` / ``attn2.to_v`` (found by type: cross-attention ``Attention``
modules, named by module path) and hold the base ``Linear``; ``remove_edits`` puts it back (exact).
All wrappers share one ``ConceptInput`` by reference: during training ``i*`` is replaced every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from persres.backbones import backbone_of_denoiser
from persres.errors import ModelError

RIDGE = 1e-3  # choice (the paper is silent): C + RIDGE * mean eigenvalue * I, so C^-1 exists


@dataclass
class ConceptInput:
    """What every edit of one concept reads, by reference (so one assignment updates all layers).

    ``i_star`` (d,): the concept's encoding. ``c_inv`` (d, d) while training (i* moves, so C^-1 i* is
    recomputed); at inference only ``direction`` = C^-1 i* (d,) is kept. ``i_super`` (d,): the class
    word's encoding, whose keys lock the concept's. ``gate``: (beta, tau), or None for no gate."""

    i_star: torch.Tensor
    i_super: torch.Tensor
    c_inv: torch.Tensor | None = None
    direction: torch.Tensor | None = None
    gate: tuple[float, float] | None = None

    def u(self) -> torch.Tensor:
        """C^-1 i*, (d,)."""
        if self.c_inv is not None:
            return self.c_inv @ self.i_star
        if self.direction is None:
            raise ModelError("a Perfusion edit needs C^-1 (training) or C^-1 i* (a saved result)")
        return self.direction


class RankOneEdit(nn.Module):
    """``attn2.to_k`` or ``attn2.to_v`` with Perfusion's gated rank-one edit; the base stays frozen.

    ``target`` (out,) is the learned value output o*_v; a key edit has none (o*_k = W_k i_super)."""

    def __init__(self, base: nn.Linear, concept: ConceptInput, key: bool) -> None:
        super().__init__()
        if base.bias is not None:
            raise ModelError("Perfusion edits bias-free K/V projections; this cross-attention has a bias")
        self.base = base
        self.concept = concept  # shared, not a submodule: a plain attribute
        self.key = key
        self.target: nn.Parameter | None = None
        if not key:
            with torch.no_grad():  # o*_v starts at the class word's value (sec. 3)
                start = base(concept.i_super.to(base.weight)).float()
            self.target = nn.Parameter(start)

    def output_at_concept(self) -> torch.Tensor:
        """o*: locked to the class word's key for K, learned for V; (out,) in fp32."""
        if self.target is not None:
            return self.target
        w = self.base.weight
        return (w.float() @ self.concept.i_super.to(w.device, torch.float32)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        concept = self.concept
        u = concept.u().to(x)  # (d,)
        i_star = concept.i_star.to(x)
        s = (x @ u) / (u @ i_star)  # (B, T): the normalised energy along i*
        coef = s
        if concept.gate is not None:
            beta, tau = concept.gate
            coef = torch.sigmoid((s - beta) / tau)
        o_star = self.output_at_concept().to(x)
        # W (x - s i*) + coef o*: W is linear, so W x - s W i* (one extra vector, not a (B, T, d) copy)
        return self.base(x) - s.unsqueeze(-1) * self.base(i_star) + coef.unsqueeze(-1) * o_star


def cross_attentions(unet: nn.Module) -> dict[str, Attention]:
    """Every cross-attention layer of the U-Net, by module path, as its backbone names them."""
    found = backbone_of_denoiser(unet).cross_attention_layers(unet)
    if not found:
        raise ModelError("this U-Net has no cross-attention layers for Perfusion to edit")
    return found


def install_edits(unet: nn.Module, concept: ConceptInput) -> dict[str, RankOneEdit]:
    """Wrap every cross-attention's to_k and to_v; the edits keyed ``{layer}.to_k`` / ``{layer}.to_v``."""
    edits: dict[str, RankOneEdit] = {}
    for name, attn in cross_attentions(unet).items():
        for proj, key in (("to_k", True), ("to_v", False)):
            base = getattr(attn, proj)
            if isinstance(base, RankOneEdit):
                raise ModelError(f"{name}.{proj} already has a Perfusion edit; load into a fresh base")
            edit = RankOneEdit(base, concept, key)
            setattr(attn, proj, edit)
            edits[f"{name}.{proj}"] = edit
    return edits


def remove_edits(unet: nn.Module) -> None:
    """The exact inverse of ``install_edits``: every wrapped projection gets its base module back."""
    for attn in cross_attentions(unet).values():
        for proj in ("to_k", "to_v"):
            module = getattr(attn, proj)
            if isinstance(module, RankOneEdit):
                setattr(attn, proj, module.base)


def inverse_covariance(encodings: torch.Tensor) -> torch.Tensor:
    """C^-1 of encodings (N, d): C = X^T X / N (uncentered, as the paper's C), ridged, in float64."""
    x = encodings.double()
    c = x.T @ x / x.shape[0]
    c = c + RIDGE * torch.trace(c) / c.shape[0] * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    return torch.linalg.inv(c).float()
