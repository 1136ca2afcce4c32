"""The method registry: names map to modules that implement the protocol."""

from __future__ import annotations

import pytest

from persres.errors import ConfigError
from persres.methods import METHODS, get_method
from persres.methods.protocol import Recipe


def test_registry_names_match_the_methods() -> None:
    assert {"residuals", "lora", "textual-inversion"} <= set(METHODS)
    for name, method in METHODS.items():
        assert method.name == name
        assert get_method(name) is method
        assert isinstance(method.recipe, Recipe) and method.recipe.source
        assert isinstance(method.options, frozenset)


def test_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; choose one of .*lora.*residuals"):
        get_method("lorra")
