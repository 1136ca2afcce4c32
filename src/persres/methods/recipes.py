"""A method's recipe made into a training configuration, in one place: ``persres train``, ``persres
benchmark`` and the app all call ``train_config``, so the same inputs give the same ``TrainConfig``
whichever front end took them. Without torch.

The method gives the recipe (steps, batch size, learning rate, prior images and weight: its authors'
numbers, ``persres.methods.catalog``); ``Overrides`` are what the user set instead, and the settings
only some methods take (``rank``, ``init``, ``prior_images``, ``prior_weight``), refused for a method
that does not take them. Everything else about the run (token, resolution, seed, ...) is passed through
to ``TrainConfig`` as it is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from persres.backbones import rank_default_for
from persres.config import InitMode, ResidualConfig, TrainConfig
from persres.errors import ConfigError
from persres.methods.catalog import MethodInfo, method_info

RECIPE_FIELDS = ("steps", "batch_size", "lr")  # what every method's recipe gives
METHOD_SETTINGS = ("rank", "init", "prior_images", "prior_weight")  # what only some methods take
# the TrainConfig fields train_config sets from the method, its recipe and the overrides
OWN_FIELDS = ("method", *RECIPE_FIELDS, "residual", "lora_rank", "prior_images", "prior_weight")
CONCEPT_FIELDS = ("base", "images", "class_word")  # train_config's own arguments


@dataclass(frozen=True)
class Overrides:
    """What a front end sets instead of the method's recipe; None keeps the recipe's value (or, for a
    setting the recipe does not give, ``TrainConfig``'s default).

    rank: residuals: a fraction of each layer's width (0.05) or a fixed rank (16); lora: the adapters'
        rank, a whole number. init: residuals' factor init ("zero" or "random")."""

    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    rank: float | int | None = None
    init: InitMode | None = None
    prior_images: int | None = None
    prior_weight: float | None = None

    def method_settings(self) -> list[str]:
        """The method-specific settings given (not None)."""
        return [name for name in METHOD_SETTINGS if getattr(self, name) is not None]


def not_taken(method: str, given: Iterable[str]) -> list[str]:
    """Of the method-specific settings ``given``, those ``method`` does not take, sorted."""
    return sorted(set(given) - method_info(method).options)


def train_config(
    method: str, base: str, images: str, class_word: str, overrides: Overrides = Overrides(), **run: Any
) -> TrainConfig:
    """The training configuration of ``method`` on ``images`` of a ``class_word``: the method's recipe
    unless ``overrides`` says otherwise, and the run's other ``TrainConfig`` settings (``run``: token,
    resolution, seed, ...; those ``train_config`` sets itself are refused there)."""
    info = method_info(method)
    wrong = not_taken(method, overrides.method_settings())
    if wrong:
        takes = ", ".join(sorted(info.options)) or "none of them"
        raise ConfigError(
            f"{', '.join(wrong)} does not apply to method {method} (its own settings: {takes}); leave "
            "it out or choose another method"
        )
    clash = sorted(set(run) & {*OWN_FIELDS, *CONCEPT_FIELDS})
    if clash:
        raise TypeError(f"train_config sets {', '.join(clash)} itself: pass them as arguments or overrides")
    own = recipe_settings(info, overrides, base)
    return TrainConfig(base=base, images=images, class_word=class_word, **own, **run)


def recipe_settings(info: MethodInfo, overrides: Overrides, base: str) -> dict[str, Any]:
    """The ``TrainConfig`` settings of the method: its recipe, each overridden where given, and the
    settings only it takes; those it ignores keep ``TrainConfig``'s defaults. Residuals without a `rank`
    take the base family's (the paper's 0.05 of each layer's width; 21 on Flux.1)."""
    recipe = info.recipe
    own: dict[str, Any] = {"method": info.name}
    prior = ("prior_images", "prior_weight") if info.takes_prior_images else ()  # the others: unused defaults
    for name in (*RECIPE_FIELDS, *prior):
        given = getattr(overrides, name)
        own[name] = getattr(recipe, name) if given is None else given
    if info.trains_residuals:
        default = ResidualConfig()
        rank = rank_default_for(base) if overrides.rank is None else overrides.rank
        own["residual"] = ResidualConfig(rank=rank, init=overrides.init or default.init)
    elif overrides.rank is not None:  # the rank of the method's adapters (LoRA)
        if isinstance(overrides.rank, bool) or not isinstance(overrides.rank, int):
            raise ConfigError(f"rank {overrides.rank} for method {info.name} must be a whole number, e.g. 4")
        own["lora_rank"] = overrides.rank
    return own


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of ``config`` that are the run's, not its method's nor its concept's (token,
    resolution, seed, ...): what ``train_config`` passes through, e.g. from a benchmark's template."""
    mine = {*OWN_FIELDS, *CONCEPT_FIELDS}
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in mine}
