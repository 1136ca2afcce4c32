"""The personalization methods one training loop, sampler and benchmark serve, by ``--method`` name.

Each is one module implementing ``persres.methods.protocol.Method``; ``persres.methods.catalog.METHODS``
is the only place that lists them, with each one's recipe and capabilities, without torch. A method's
module is imported on first use (``get_method``), so naming the methods never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from persres.methods.catalog import DEFAULT_METHOD, METHODS, MethodInfo, method_info, names_where

if TYPE_CHECKING:
    from persres.methods.protocol import Method

RESIDUALS = DEFAULT_METHOD  # the method persres is about; LAG and several concepts per image are its own
__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "RESIDUALS",
    "MethodInfo",
    "all_methods",
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
