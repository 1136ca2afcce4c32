"""The patches a method makes to a pipeline, each kept with its exact inverse (STYLE.md, rule 4).

``prepare`` and ``load`` open ``patching(pipe, method, action)`` and make every change through the ``Patches``
it yields: forward hooks (their handles kept), attention processors (swapped from a complete copy, the
originals kept), module wrappers, ``requires_grad`` flags and dtypes, each with the step that undoes
it. The record stays on the pipeline (``pipe.persres_patches``), which marks it as patched by persres:
a second ``prepare`` or ``load`` on it is refused by name, and ``unpatch(pipe)`` undoes every step,
newest first, so the pipeline computes exactly what its base did. A ``prepare`` or ``load`` that
fails undoes what it had done before the error is raised.

What has no cheap inverse is named, not undone: a token added to the tokenizer stays, with its row
of the embedding matrix (the tokenizer cannot forget a token; prompts without it are encoded as the
base encodes them), and a load that copies a whole model's weights in (DreamBooth) marks the
pipeline ``irreversible``, so ``unpatch`` refuses it, naming the fix: load a fresh base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from persres.errors import ConfigError, quote

MARK = "persres_patches"  # the pipeline attribute that holds its record


class Patches:
    """What one ``prepare`` or ``load`` changed in a pipeline, and how to undo it."""

    def __init__(self, method: str, action: str) -> None:
        self.method = method
        self.action = action  # "prepare" or "load"
        self.undos: list[Callable[[], object]] = []
        self.irreversible = ""  # why unpatch cannot give the base back, when it cannot

    def __str__(self) -> str:
        return f"{quote(self.method)}'s {self.action}"

    def add(self, undo: Callable[[], object]) -> None:
        """Record the exact inverse of a change just made."""
        self.undos.append(undo)

    def hook(self, module: nn.Module, hook: Callable[..., Any], with_kwargs: bool = False) -> None:
        """A forward hook on ``module``; its handle is kept and removed by ``undo``."""
        self.add(module.register_forward_hook(hook, with_kwargs=with_kwargs).remove)

    def processors(self, unet: nn.Module, processors: Mapping[str, object]) -> None:
        """Set the attention processors keyed as ``unet.attn_processors`` (``set_attn_processor`` pops
        from the dict it gets and wants every layer: it gets a complete copy); the originals come back."""
        original = dict(unet.attn_processors)
        unet.set_attn_processor({**original, **processors})
        self.add(lambda: unet.set_attn_processor(dict(original)))

    def saving_processors(self, unet: nn.Module) -> None:
        """Keep the processors as they are now, to be put back: for a loader that sets them itself."""
        original = dict(unet.attn_processors)
        self.add(lambda: unet.set_attn_processor(dict(original)))

    def requires_grad(self, module: nn.Module, flag: bool) -> None:
        """``module.requires_grad_(flag)``; every parameter's own flag comes back."""
        flags = [(param, param.requires_grad) for param in module.parameters()]
        module.requires_grad_(flag)

        def restore() -> None:
            for param, old in flags:
                param.requires_grad_(old)

        self.add(restore)

    def dtype(self, module: nn.Module, dtype: torch.dtype) -> None:
        """``module.to(dtype)``; the dtype of its first parameter comes back (persres' bases have one)."""
        old = next(module.parameters()).dtype
        module.to(dtype)
        self.add(lambda: module.to(old))

    def undo(self) -> None:
        """Every change undone, newest first, each once."""
        while self.undos:
            self.undos.pop()()


def patches_of(pipe: object) -> Patches | None:
    """The record of the pipeline's persres patches, or None for a pipeline persres has not patched."""
    found = getattr(pipe, MARK, None)
    return found if isinstance(found, Patches) else None


@contextlib.contextmanager
def patching(pipe: object, method: str, action: str) -> Iterator[Patches]:
    """A new record for ``pipe``'s changes, left on it; a pipeline that has one is refused by name.
    On an error inside the block, what was done is undone (in ``finally``) and the mark removed, unless
    what was done cannot be undone: then the mark stays, and refuses the pipeline from then on."""
    held = patches_of(pipe)
    if held is not None:
        raise ConfigError(
            f"this pipeline already holds persres' patches from {held}; {quote(method)}'s {action} needs "
            "a fresh base pipeline: load the base again (or undo them with "
            "persres.methods.patches.unpatch)"
        )
    patches = Patches(method, action)
    setattr(pipe, MARK, patches)
    done = False
    try:
        yield patches
        done = True
    finally:
        if not done and not patches.irreversible:
            patches.undo()
            delattr(pipe, MARK)


def unpatch(pipe: object) -> None:
    """Undo the ``prepare`` or ``load`` that patched ``pipe`` (nothing for a pipeline never patched):
    processors, hooks, wrappers, flags and dtypes as the base had them. Refused, by name, for a load
    with no cheap inverse."""
    patches = patches_of(pipe)
    if patches is None:
        return
    if patches.irreversible:
        raise ConfigError(f"{patches} cannot be undone ({patches.irreversible}); load a fresh base pipeline")
    patches.undo()
    delattr(pipe, MARK)
