"""The personalization methods behind one protocol (``persres.methods.protocol``).

``get_method(name)`` imports a method's module on first use, so naming the methods (the CLI's
``--method`` choices, ``persres.config.METHOD_OPTIONS``) never imports torch.
"""

from __future__ import annotations

import importlib

from persres.config import METHOD_OPTIONS
from persres.errors import ConfigError, quote
from persres.methods.protocol import Method

MODULES = {  # method name -> "module:attribute" of its Method instance
    "residuals": "persres.methods.residuals:RESIDUALS",
}


def get_method(name: str) -> Method:
    if name not in METHOD_OPTIONS:
        raise ConfigError(f"--method {quote(name)} is not one of {', '.join(METHOD_OPTIONS)}")
    if name not in MODULES:
        raise ConfigError(f"--method {name} is not available in this version of persres yet")
    module, _, attribute = MODULES[name].partition(":")
    method: Method = getattr(importlib.import_module(module), attribute)
    return method
