"""A frozen base denoiser with 8-bit weights (`quantize_base` int8), so a Flux.1 base fits a 24 GB card.

Every ``nn.Linear`` of the denoiser (U-Net or transformer) gets int8 weights, one symmetric scale per
output channel, through torchao's ``Int8WeightOnlyConfig``; activations, the residuals (fp32 factors
beside the base layer, ``persres.core.residuals``), their gradients and the optimizer stay in full
precision. The quantized layer computes ``x @ dequantize(W).T``, so gradients reach the input of every
layer, and the residuals train as they do on the full-precision base (``tests/test_quantize.py``
measures how close their gradients are). Convolutions, norms and embeddings keep their weights.

torchao's linear casts the int8 weight to the activations' precision and multiplies; under autograd that
cast copy is what the backward pass keeps, one per layer, so a training step would hold a full-precision
copy of every weight until its backward (measured: +690 MiB on the SD 1.5 U-Net, the size of its fp32
linear weights). ``Int8Linear`` computes the same forward without recording it and casts the int8
weight again in the backward pass, so a step holds only the int8 weights and one layer's cast at a time.

Why torchao, not optimum-quanto (the issue's two choices, both usable by diffusers): torchao is
PyTorch's own quantization library, released with PyTorch (0.18 in August 2026), its wheel declares
no torch dependency (so the pinned CPU torch stays), and its int8 weight-only layers run on the CPU and
on CUDA with autograd through the input. optimum-quanto's last release is 0.2.7 (March 2025). The
quantized base is a training-time form only: the residual file holds fp32 factors of a full-precision
base, and merging into an int8 weight is refused (merge into the base as shipped, `persres merge`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from persres.config import QUANTIZE_BASE, QuantizeBase
from persres.errors import ConfigError

log = logging.getLogger(__name__)


def quantize_denoiser(denoiser: nn.Module, how: QuantizeBase) -> int:
    """Give every ``nn.Linear`` of ``denoiser`` int8 weights in place (``how`` "int8"); the number of
    layers quantized, 0 for "no". Call it before residuals or adapters wrap the layers and before the
    model moves to the accelerator: the full-precision weights then never reach the device."""
    if how == "no":
        return 0
    if how != "int8":
        raise ConfigError(f"`quantize_base` must be one of {', '.join(QUANTIZE_BASE)}, got {how!r}")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_  # its false alarms: persres.quiet

    linears = [m for m in denoiser.modules() if to_quantize(m)]
    if linears:
        quantize_(denoiser, Int8WeightOnlyConfig(), filter_fn=lambda module, _: to_quantize(module))
    for module in linears:
        module.__class__ = Int8Linear  # a subclass without state of its own: still an nn.Linear
    log.info("base quantized to int8: %d linear layers", len(linears))
    return len(linears)


def to_quantize(module: nn.Module) -> bool:
    """A linear layer whose weight is still a plain tensor."""
    return isinstance(module, nn.Linear) and not is_quantized(module.weight)


def is_quantized(weight: torch.Tensor) -> bool:
    """A weight held by a quantization library's tensor subclass rather than a plain tensor."""
    data = weight.data if isinstance(weight, nn.Parameter) else weight
    return type(data) is not torch.Tensor


class Int8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight torchao holds in int8 (``quantize_denoiser`` gives it this
    class): the forward pass is torchao's, the backward pass casts the int8 weight again (see above)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return RecastInBackward.apply(x, self)


class RecastInBackward(torch.autograd.Function):
    """``y = x W^T + b`` with W int8 and frozen: the gradient of ``x`` only, from a fresh cast of W."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        ctx.layer = layer  # type: ignore[attr-defined]
        return nn.functional.linear(x, layer.weight, layer.bias)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        weight = ctx.layer.weight.dequantize(grad.dtype)  # type: ignore[attr-defined]  # (out, in), freed after
        return grad @ weight, None
