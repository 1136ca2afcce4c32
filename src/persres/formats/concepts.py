"""Concepts in prompts: placeholders V* / V1* V2* ..., residual files, and token positions.

One residual file is one concept: its identifier token and class word come from the file's metadata.
With one file the prompt says ``V*`` (or ``V1*``); with several, ``V1*``, ``V2*``, ... name the files
in the order given. Words are located by tokenizing, never by string position: a word's columns in the
cross-attention are every occurrence of all its sub-tokens in the tokenized prompt.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from persres.config import ResidualConfig
from persres.core.residuals import add_residuals, find_proj_outs, find_residuals
from persres.core.tokens import PromptReader
from persres.errors import ConfigError, quote
from persres.formats.io import ResidualFile, check_architecture, check_fits, read_residual_file

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"V(\d*)\*")


@dataclass(frozen=True)
class Concept:
    """A learned concept: its identifier token V* and macro-class word."""

    token: str
    class_word: str
    source: str = ""


@dataclass(frozen=True)
class PromptPlan:
    """A prompt with its placeholders resolved, and which concepts it mentions."""

    prompt: str
    expanded: str
    present: tuple[bool, ...]  # per concept


def concept_of(loaded: ResidualFile) -> Concept:
    """The concept a residual file was trained for, from its metadata."""
    token, class_word = loaded.metadata.get("token"), loaded.metadata.get("class_word")
    if not token or not class_word:
        raise ConfigError(
            f"{loaded.path} records no identifier token or class word; it was not made by train"
        )
    return Concept(token, class_word, str(loaded.path))


ResidualSource = str | os.PathLike[str] | ResidualFile  # a path, or a file already read


def read_files(sources: Sequence[ResidualSource]) -> list[ResidualFile]:
    """Residual files read and checked without a model (format, metadata, distinct tokens); a
    ``ResidualFile`` already read is taken as it is, so a command reads each file once."""
    if not sources:
        raise ConfigError("no residual file given; pass `residuals` at least once")
    files = [s if isinstance(s, ResidualFile) else read_residual_file(s) for s in sources]
    _refuse_shared_tokens([concept_of(loaded) for loaded in files])
    return files


def read_concepts(sources: Sequence[ResidualSource]) -> list[Concept]:
    """The concepts of residual files, checked without a model."""
    return [concept_of(loaded) for loaded in read_files(sources)]


def load_concepts(unet: nn.Module, sources: Sequence[ResidualSource]) -> list[Concept]:
    """Load one or more residual files into ``unet``, stacked so that concept g owns rank group g.

    Every file is checked against the model before anything is changed.
    """
    if find_residuals(unet):
        raise ConfigError("this U-Net already has residuals; call remove_residuals(unet) first")
    files = read_files(sources)
    proj_outs = find_proj_outs(unet)
    for loaded in files:
        check_architecture(loaded, unet)  # first: it names both models, the layer check follows
        check_fits(loaded, proj_outs)
    concepts = [concept_of(loaded) for loaded in files]
    layers = [loaded.layers() for loaded in files]
    ranks = {layer: sum(f[layer][0].shape[1] for f in layers) for layer in proj_outs}
    wrappers = add_residuals(unet, ResidualConfig(), ranks=ranks)
    with torch.no_grad():
        for name, wrapper in wrappers.items():
            wrapper.A.copy_(torch.cat([f[name][0] for f in layers], dim=1))  # (m, r_1 + r_2 + ...)
            wrapper.B.copy_(torch.cat([f[name][1] for f in layers], dim=0))  # (r_1 + r_2 + ..., m)
            wrapper.groups = tuple(f[name][0].shape[1] for f in layers)
    return concepts


def _refuse_shared_tokens(concepts: list[Concept]) -> None:
    seen: dict[str, str] = {}
    for concept in concepts:
        if concept.token in seen:
            raise ConfigError(
                f"{seen[concept.token]} and {concept.source} both use the identifier {quote(concept.token)}: "
                "their concepts cannot be told apart in a prompt; retrain one with another `token`"
            )
        seen[concept.token] = concept.source


def plan_prompts(prompts: list[str], concepts: list[Concept], allow_empty: bool = False) -> list[PromptPlan]:
    """Resolve placeholders; refuse a placeholder without a file and a file without a placeholder."""
    if not prompts and not allow_empty:
        raise ConfigError("no prompt given; pass at least one `prompt`")
    plans = [_plan(prompt, concepts) for prompt in prompts]
    for g, concept in enumerate(concepts):
        if len(concepts) > 1 and plans and not any(plan.present[g] for plan in plans):
            raise ConfigError(
                f"residual file {concept.source} (V{g + 1}*) is not used by any prompt; add V{g + 1}* to a "
                "prompt or drop the file"
            )
    return plans


def _plan(prompt: str, concepts: list[Concept]) -> PromptPlan:
    present = [False] * len(concepts)

    def resolve(match: re.Match[str]) -> str:
        number = match.group(1)
        if not number:
            if len(concepts) > 1:
                raise ConfigError(
                    f"prompt {quote(prompt)} uses V* but {len(concepts)} residual files are given; "
                    f"name them V1* ... V{len(concepts)}* in the order of `residuals`"
                )
            index = 0
        else:
            index = int(number) - 1
            if not 0 <= index < len(concepts):
                raise ConfigError(
                    f"prompt {quote(prompt)} uses {match.group(0)} but only {len(concepts)} concept(s) are "
                    "loaded (residual files, in the order given); fix the placeholder or add the file"
                )
        present[index] = True
        return concepts[index].token

    expanded = PLACEHOLDER.sub(resolve, prompt)
    return PromptPlan(prompt, expanded, tuple(present))


def word_spans(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], word: str) -> list[range]:
    """Every occurrence in ``prompt_ids`` of all of ``word``'s sub-tokens, as position ranges."""
    pieces = tokenizer(word, add_special_tokens=False).input_ids
    width = len(pieces)
    if not width:
        return []
    return [
        range(start, start + width)
        for start in range(len(prompt_ids) - width + 1)
        if prompt_ids[start : start + width] == pieces
    ]


def own_class_word(identifier: range, class_spans: list[range]) -> range:
    """The class word that belongs to an identifier: the first occurrence after it ("a V* dog"),
    else the nearest before it ("a dog called V*"). Two concepts of one class ("a V1* dog and a V2*
    dog") thus each get their own "dog" and do not bleed into each other's mask."""
    after = [span for span in class_spans if span.start >= identifier.stop]
    return after[0] if after else max(class_spans, key=lambda span: span.start)


def concept_columns(
    tokenizer: PreTrainedTokenizerBase,
    plan: PromptPlan,
    concepts: list[Concept],
    require: bool,
    length: int | None = None,
) -> torch.Tensor:
    """(groups, T) 0/1: each concept's identifier and its own class word in the tokenized prompt.

    A concept the prompt does not mention gets no column (its mask is then empty). With ``require``
    (localized sampling), the prompt must mention a concept, and every mentioned concept needs its
    identifier and class word. ``length`` (T): the text encoder's prompt length,
    ``tokens.text_length(tokenizer, text_encoder.config)``; the tokenizer's ``model_max_length`` when None.
    """
    ids = tokenizer(
        plan.expanded, padding="max_length", max_length=length or tokenizer.model_max_length, truncation=True
    ).input_ids
    if require and not any(plan.present):
        names = "V*" if len(concepts) == 1 else ", ".join(f"V{g + 1}*" for g in range(len(concepts)))
        raise ConfigError(
            f"prompt {quote(plan.prompt)} has no {names}: localized sampling needs the concept's identifier"
        )
    columns = torch.zeros(len(concepts), len(ids))
    for g, concept in enumerate(concepts):
        if not plan.present[g]:
            continue
        identifiers = word_spans(tokenizer, ids, concept.token)
        classes = word_spans(tokenizer, ids, concept.class_word)
        for spans, word, what in (
            (identifiers, concept.token, "identifier"),
            (classes, concept.class_word, "class word"),
        ):
            if not spans and require:
                raise ConfigError(
                    f"prompt {quote(plan.prompt)} has no {what} {quote(word)} (concept {g + 1}) within the "
                    f"tokenizer's {len(ids)} tokens; localized sampling needs both, e.g. "
                    f"{quote('a V* ' + concept.class_word)}"
                )
        for identifier in identifiers:
            columns[g, list(identifier)] = 1.0
            if classes:
                columns[g, list(own_class_word(identifier, classes))] = 1.0
    return columns


def check_prompt_length(reader: PromptReader, plan: PromptPlan, concepts: list[Concept]) -> None:
    """Refuse a prompt whose identifier falls past the limit of ``reader`` (a text encoder that carries
    the prompt: it would be cut off silently, and the image would not show the concept); warn when only
    other words are cut."""
    tokenizer, limit = reader.tokenizer, reader.limit
    ids = tokenizer(plan.expanded, verbose=False).input_ids  # special tokens included, untruncated
    if len(ids) <= limit:
        return
    kept = limit - 1  # truncation keeps the first limit - 1 tokens and appends the end token
    for g, concept in enumerate(concepts):
        if not plan.present[g]:
            continue
        if any(span.stop > kept for span in word_spans(tokenizer, ids, concept.token)):
            name = "V*" if len(concepts) == 1 else f"V{g + 1}*"
            raise ConfigError(
                f"prompt {quote(plan.prompt)} is {len(ids)} tokens and its identifier {name} "
                f"({quote(concept.token)}) falls past the text encoder's limit of {limit} tokens "
                f"({reader.name}), where it would be cut off; shorten the prompt or move {name} nearer its "
                "start"
            )
    log.warning(
        "prompt %s is %d tokens: the text encoder reads %d (%s), the words after %s are cut off",
        quote(plan.prompt),
        len(ids),
        limit,
        reader.name,
        quote(" ".join(tokenizer.decode(ids[:kept], skip_special_tokens=True).split()[-6:])),
    )
