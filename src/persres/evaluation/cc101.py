"""CustomConcept101-format datasets: ``dataset.json``, concept image folders, prompt files.

An entry looks like ``{"instance_prompt": "photo of a <new1> barn", "class_prompt": "barn",
"instance_data_dir": "./benchmark_dataset/scene_barn", "prompt_filename": "prompts/barn.txt", ...}``.
Paths are relative to the dataset folder and must stay inside it. The category is the prefix of the
image folder's name (``scene_``, ``pet_``, ...). In a prompt file, ``{}`` stands for "<new1> {class}";
persres writes it as "V* {class}".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from persres.core.tokens import PromptReader
from persres.errors import ConfigError, InputError, quote
from persres.formats.concepts import Concept, plan_prompts, word_spans

MODIFIER = "<new1>"


@dataclass(frozen=True)
class ConceptEntry:
    name: str  # the image folder's name, e.g. "scene_barn"
    category: str  # its prefix, e.g. "scene"
    class_word: str
    images: Path
    templates: tuple[str, ...]  # prompt file lines; {} stands for the concept phrase
    prompt_file: Path | None = None
    line_numbers: tuple[int, ...] = ()  # of each template in the prompt file, counted from 1

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.prompts_with(self.class_word)

    def prompts_with(self, class_word: str) -> tuple[str, ...]:
        """The prompts with "V* {class_word}" for the concept: ``{}`` is the concept phrase, and a line
        written with the modifier token ("<new1> dog swimming") has its "<new1> {class}" replaced."""
        return tuple(concept_phrase(line, self.class_word, class_word) for line in self.templates)


def concept_phrase(line: str, dataset_class: str, class_word: str) -> str:
    if "{}" in line:
        return line.replace("{}", f"V* {class_word}")
    return line.replace(f"{MODIFIER} {dataset_class}", f"V* {class_word}").replace(MODIFIER, "V*")


def inside(root: Path, relative: str, what: str) -> Path:
    """``root / relative``, refusing absolute paths, the root itself and anything that leaves ``root``."""
    if "\0" in relative:
        raise InputError(f"dataset.json: {what} {quote(relative)} contains a NUL byte; refused")
    if os.path.isabs(relative) or relative.startswith("~"):
        raise InputError(
            f"dataset.json: {what} {quote(relative)} is absolute; paths must be relative to {root}"
        )
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InputError(f"dataset.json: {what} {quote(relative)} leaves the dataset folder {root}; refused")
    if path == root.resolve():
        raise InputError(
            f"dataset.json: {what} {quote(relative)} is the dataset folder itself; name a sub-folder"
        )
    return path


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load_dataset(root: str | os.PathLike[str]) -> list[ConceptEntry]:
    """Every concept of a CustomConcept101-format folder, checked before anything runs."""
    root = Path(root)
    index = root / "dataset.json"
    if not index.is_file():
        raise InputError(f"{root} has no dataset.json; pass a CustomConcept101-format folder")
    try:
        raw = json.loads(read_text(index))
    except json.JSONDecodeError as exc:
        raise InputError(f"{index} is not valid JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise InputError(f"{index} must be a non-empty JSON list of concept entries")
    entries = [_entry(root, item, number) for number, item in enumerate(raw)]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{index} lists these image folders twice: {duplicates}")
    return entries


def _entry(root: Path, item: object, number: int) -> ConceptEntry:
    if not isinstance(item, dict):
        raise InputError(f"dataset.json entry {number} is not an object")
    for key in ("class_prompt", "instance_data_dir", "prompt_filename"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise InputError(f"dataset.json entry {number} lacks {key!r}")
    images = inside(root, item["instance_data_dir"], "instance_data_dir")
    prompt_file = inside(root, item["prompt_filename"], "prompt_filename")
    if not images.is_dir():
        raise InputError(f"dataset.json entry {number}: image folder {images} not found")
    if not prompt_file.is_file():
        raise InputError(f"dataset.json entry {number}: prompt file {prompt_file} not found")
    class_word = item["class_prompt"].strip()
    numbered = [
        (n, line.strip()) for n, line in enumerate(read_text(prompt_file).splitlines(), 1) if line.strip()
    ]
    if not numbered:
        raise InputError(
            f"{prompt_file} holds no prompt; write one prompt per line, {{}} standing for the concept"
        )
    for n, line in numbered:
        if "{}" not in line and MODIFIER not in line:
            raise InputError(
                f"{prompt_file} line {n}: {quote(line)} needs a {{}} or {MODIFIER} standing for the "
                "concept; add one to the line"
            )
    name = images.name
    category = name.split("_", 1)[0] if "_" in name else "other"
    lines = tuple(line for _, line in numbered)
    return ConceptEntry(name, category, class_word, images, lines, prompt_file, tuple(n for n, _ in numbered))


def check_prompts(
    entry: ConceptEntry,
    class_word: str,
    token: str,
    readers: Sequence[PromptReader],
    count: int,
) -> None:
    """The first ``count`` prompts of ``entry``, as they will be sampled with ``class_word`` and the
    identifier ``token``, checked before anything is trained with every text encoder that carries the
    prompt (``readers``: SD's CLIP, Flux's T5): each must hold the identifier and the class word (LAG
    masks and the prompt categories need both) and fit in the encoder's limit (a longer one would be cut
    silently)."""
    concept = Concept(token, class_word)
    for number, prompt in zip(
        entry.line_numbers[:count], entry.prompts_with(class_word)[:count], strict=True
    ):
        where = f"{entry.prompt_file} line {number}"
        try:
            plan = plan_prompts([prompt], [concept])[0]
        except ConfigError as exc:
            raise InputError(f"{where}: {exc}") from None
        for reader in readers:
            check_read(where, prompt, plan.expanded, reader, (token, class_word), entry.class_word)


def check_read(
    where: str, prompt: str, expanded: str, reader: PromptReader, words: tuple[str, str], dataset_class: str
) -> None:
    """One prompt (``expanded``: as sampled) in one text encoder's tokens: within its limit, and holding
    the identifier and the class word (``words``)."""
    ids = reader.tokenizer(expanded, verbose=False).input_ids  # special tokens included, untruncated
    if len(ids) > reader.limit:
        raise InputError(
            f"{where}: prompt {quote(prompt)} is {len(ids)} tokens, above the base model's limit of "
            f"{reader.limit} ({reader.name}); shorten the line"
        )
    for word, what in zip(words, ("identifier", "class word"), strict=True):
        if not word_spans(reader.tokenizer, ids, word):
            raise InputError(
                f"{where}: prompt {quote(prompt)} has no {what} {quote(word)}; write the concept as {{}} "
                f"or as {quote(MODIFIER + ' ' + dataset_class)}"
            )
