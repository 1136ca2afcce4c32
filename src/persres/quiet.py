"""Silence the known false alarms of persres' libraries, for every entry point of persres.

Each is one message of one logger, dropped because it says nothing to a persres user; every other
warning is still shown. Standard library only: installing the filters must not import the libraries.

- transformers 5 warns at import that ``CLIPImageProcessor`` "requires torchvision" and falls back to
  the PIL processor. persres never uses an image processor of transformers (``persres.evaluation.evaluate``
  preprocesses images itself) and deliberately does not depend on torchvision.
- torchao (the 8-bit base, ``persres.core.quantize``) is imported by diffusers whenever it is installed,
  and then: diffusers cannot list torchao's pickled tensor classes (persres reads only safetensors, never
  a pickle); torchao finds no Triton and cannot load its CUDA kernel libraries on a CPU (its int8
  weight-only layers need neither); torch deprecates the way torchao registers its Enums.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

FALSE_ALARMS = (  # (logger, a piece of the message)
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Tensor objects. This may affect loading checkpoints"),
    ("torchao.kernel.intmm", "Detected no triton"),
    ("torchao", "Failed to load"),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
)
# transformers 5's notice when a prompt is tokenized past the tokenizer's model_max_length (diffusers'
# encode_prompt does, untruncated, to find the cut): persres has checked the prompt's length itself
LENGTH_NOTICE = "Token indices sequence length is longer than the specified maximum"
LENGTH_EMITTER = "transformers.tokenization_utils_base"


def install() -> None:
    """Idempotent: each filter is added to its logger once."""
    for name, text in FALSE_ALARMS:
        emitter = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == text for f in emitter.filters):
            emitter.addFilter(DropMessage(text))


@contextlib.contextmanager
def warnings_hidden(logger: str) -> Iterator[None]:
    """Hide a third-party logger's warnings for the duration, where persres has checked what they say
    (e.g. transformers' "LOAD REPORT" of a CLIP checkpoint's other tower) or they are known noise."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


class DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def message_hidden(logger: str, text: str) -> Iterator[None]:
    """Drop one third-party message (any containing ``text``) for the duration, where persres has said
    the same itself in fewer words (e.g. diffusers repeats the whole cut-off tail of a long prompt)."""
    target, drop = logging.getLogger(logger), DropMessage(text)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def quiet_third_party() -> None:
    """Library progress bars (weight loading and saving) stay out of the user's terminal; their
    warnings are shown, except the known false alarm filtered above. Imports diffusers: call it only
    where a command is about to load a model, never at ``import persres``."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
