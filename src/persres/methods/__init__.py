"""The personalization methods one training loop, sampler and benchmark serve, by ``--method`` name.

Each is one module implementing ``persres.methods.protocol.Method``; this registry is the only place
that lists them.
"""

from __future__ import annotations

from persres.errors import ConfigError, quote
from persres.methods.lora import LoRA
from persres.methods.protocol import Method
from persres.methods.residuals import Residuals
from persres.methods.textual_inversion import TextualInversion

METHODS: dict[str, Method] = {
    "residuals": Residuals(),
    "lora": LoRA(),
    "textual-inversion": TextualInversion(),
}


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name is refused with the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {quote(name)}; choose one of {', '.join(sorted(METHODS))}"
        ) from None
