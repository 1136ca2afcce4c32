"""The personalization methods one training loop, sampler and benchmark serve, by ``--method`` name.

Each is one module implementing ``persres.methods.protocol.Method``; ``MODULES`` is the only place
that lists them. A method's module is imported on first use, so naming the methods (the CLI's
``--method`` choices, ``persres.config.METHOD_OPTIONS``) never imports torch.
"""

from __future__ import annotations

import importlib

from persres.config import METHOD_OPTIONS
from persres.errors import ConfigError, quote
from persres.methods.protocol import Method

RESIDUALS = "residuals"  # the method persres is about; LAG and several concepts per image are its own
MODULES = {  # --method name -> "module:class" implementing the protocol
    RESIDUALS: "persres.methods.residuals:Residuals",
    "lora": "persres.methods.lora:LoRA",
    "textual-inversion": "persres.methods.textual_inversion:TextualInversion",
    "dreambooth": "persres.methods.dreambooth:DreamBooth",
    "custom-diffusion": "persres.methods.custom_diffusion:CustomDiffusion",
    "perfusion": "persres.methods.perfusion:Perfusion",
}
_LOADED: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name is refused with the choices."""
    if name not in MODULES:
        missing = " (not in this version of persres yet)" if name in METHOD_OPTIONS else ""
        raise ConfigError(
            f"unknown method {quote(name)}{missing}; choose one of {', '.join(sorted(MODULES))}"
        )
    if name not in _LOADED:
        module, _, cls = MODULES[name].partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def all_methods() -> dict[str, Method]:
    return {name: get_method(name) for name in MODULES}
