"""The personalization methods one training loop, sampler and benchmark serve, by ``--method`` name.

Each is one module implementing ``persres.methods.protocol.Method``; ``persres.methods.catalog.METHODS``
is the only place that lists them, with each one's recipe and capabilities, without torch. A method's
module is imported on first use (``get_method``), so naming the methods never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from persres.errors import ConfigError
from persres.methods.catalog import DEFAULT_METHOD, METHODS, MethodInfo, method_info, names_where

if TYPE_CHECKING:
    from persres.backbones import Backbone
    from persres.methods.protocol import Method

RESIDUALS = DEFAULT_METHOD  # the method persres is about; LAG and several concepts per image are its own
__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "RESIDUALS",
    "MethodInfo",
    "all_methods",
    "check_runs_on",
    "get_method",
    "method_info",
    "names_where",
]
_LOADED: dict[str, Method] = {}


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name is refused with the choices."""
    if name not in _LOADED:
        module, _, cls = method_info(name).implementation.partition(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]


def all_methods() -> dict[str, Method]:
    return {name: get_method(name) for name in METHODS}


def check_runs_on(method: str, backbone: Backbone, base: str) -> None:
    """Refuse a method that does not run on the base's family: the backbone names the capability a method
    needs there (``works_on_sdxl``, ``works_on_flux``; none on SD 1.x/2.x)."""
    from persres.backbones import by_pipeline

    info = method_info(method)
    capability = backbone.method_capability
    if capability is None or getattr(info, capability):
        return
    able = ", ".join(names_where(True, capability))
    families = " and ".join(
        other.name
        for other in by_pipeline().values()
        if other.method_capability is None or getattr(info, other.method_capability)
    )
    raise ConfigError(
        f"`method` {method} supports {families} here; on {backbone.name} ({base}) persres "
        f"trains {able} (`method` {able})"
    )
