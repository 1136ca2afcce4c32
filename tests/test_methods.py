"""The method registry: names map to modules that implement the protocol."""

from __future__ import annotations

import pytest

from persres.config import METHOD_OPTIONS
from persres.errors import ConfigError
from persres.methods import all_methods, get_method
from persres.methods.protocol import Recipe


def test_registry_names_match_the_methods() -> None:
    methods = all_methods()
    assert {"residuals", "lora", "textual-inversion"} <= set(methods) <= set(METHOD_OPTIONS)
    for name, method in methods.items():
        assert method.name == name
        assert get_method(name) is method
        assert isinstance(method.recipe, Recipe) and method.recipe.source
        assert method.options == METHOD_OPTIONS[name]  # what the CLI accepts for it


def test_unknown_method_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'lorra'; choose one of .*lora.*residuals"):
        get_method("lorra")
