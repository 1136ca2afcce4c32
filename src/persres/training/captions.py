"""Caption files beside the photos (setting `captions`, off by default): ``NAME.txt`` beside
``NAME.jpg`` is that photo's training prompt instead of the method's one ("a photo of a V* dog").

As the trainers users know do it (kohya sd-scripts' ``--caption_extension .txt``, ai-toolkit's
``[trigger]``), one plain-text file per photo, UTF-8, one line. The identifier goes where the caption
writes ``V*`` (persres' placeholder in every prompt) or ``[trigger]`` (ai-toolkit's, so its captions
work unchanged); a caption that already holds the identifier itself ("a photo of sks dog", as kohya's
captions write it) is taken as it is. The class word is not added: the caption says what it says. A
caption without it still trains (with a warning), but the paper's recipe ties V* to its class word,
and localized sampling finds the concept by V* and the class word.

The rules, each an ``InputError`` naming the file and the fix, checked before any model is loaded:
a caption that is empty, not UTF-8 (a byte-order mark is allowed), holds a NUL byte, is larger than
``MAX_CAPTION_BYTES`` or holds more than one non-empty line, or does not name the concept (neither
V*, [trigger] nor the identifier: it would train the base model on the photo and teach nothing about
the concept), and a caption file without a photo. A photo without a caption file trains on the
method's prompt. Captions are read when a run starts, like the photos: one edited between an
interrupted run and its `resume` is used from the resumed step on (the run then differs from an
uninterrupted one).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from persres.errors import InputError, quote
from persres.formats.concepts import PLACEHOLDER

log = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
TRIGGER = "[trigger]"  # ai-toolkit's placeholder for its trigger word, read as V*
MAX_CAPTION_BYTES = 16 * 1024  # a caption is a sentence; a T5 encoder's 512 tokens are about 2,000 bytes


def caption_file(photo: Path) -> Path | None:
    """A photo's caption, ``NAME.txt`` (or ``.TXT``) beside ``NAME.ext``; None if it has none."""
    beside = sorted(photo.parent.iterdir())
    return next((p for p in beside if p.stem == photo.stem and is_caption(p) and p.is_file()), None)


def is_caption(path: Path) -> bool:
    return path.suffix.lower() == CAPTION_SUFFIX


def check_pairs(folder: Path, photos: Sequence[Path], captions: Sequence[Path]) -> None:
    """Every caption file belongs to exactly one photo (same name, another suffix), and no photo has two."""
    by_stem: dict[str, list[Path]] = {}
    for photo in photos:
        by_stem.setdefault(photo.stem, []).append(photo)
    stems = [caption.stem for caption in captions]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        raise InputError(f"{folder} holds two captions named {twice[0]} (.txt and .TXT); keep one")
    for caption in captions:
        owners = by_stem.get(caption.stem, [])
        if not owners:
            raise InputError(
                f"{folder} holds the caption {caption.name} but no photo named {caption.stem} "
                "(jpg/jpeg/png/webp); rename the caption after its photo, or remove it"
            )
        if len(owners) > 1:
            names = " and ".join(p.name for p in owners)
            raise InputError(
                f"{folder}: {names} would share the caption {caption.name}; rename one of the photos"
            )


def read_captions(photos: Sequence[Path], identifier: str, class_word: str) -> list[str | None]:
    """Per photo: its caption with ``identifier`` in place of V* and [trigger], or None where the photo has
    no caption file (it trains on the method's prompt). Warns once about captions without ``class_word``."""
    files = [caption_file(p) for p in photos]
    captions = [None if f is None else read_caption(f, identifier) for f in files]
    found = [c for c in captions if c is not None]
    without = [
        f.name for f, c in zip(files, captions, strict=True) if f and c and not has_word(c, class_word)
    ]
    if without:
        log.warning(
            "%d of %d captions do not say the class word %s (%s): the concept is then learned without its "
            "class, and localized sampling, which finds the concept by V* and the class word, sees only V*",
            len(without),
            len(found),
            quote(class_word),
            ", ".join(without[:5]) + (" ..." if len(without) > 5 else ""),
        )
    log.info(
        "captions: %d of %d photos have one; the others train on the method's prompt", len(found), len(photos)
    )
    return captions


def read_caption(path: Path, identifier: str) -> str:
    """One caption file, checked, with the identifier in place of its placeholder."""
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise InputError(
            f"caption {path} is {size:,} bytes, above {MAX_CAPTION_BYTES:,}; a caption is one line of "
            "text: shorten it, or remove it to train that photo on the method's prompt"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as Windows' Notepad writes, is not text
    except UnicodeDecodeError as exc:
        raise InputError(
            f"caption {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    if "\x00" in text:
        raise InputError(f"caption {path} holds NUL bytes, so it is not text; save the caption as UTF-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise InputError(
            f"caption {path} is empty; write a caption with V* where the identifier goes "
            "(e.g. 'a photo of a V* dog on the grass'), or remove it to train that photo on the method's "
            "prompt"
        )
    if len(lines) > 1:
        raise InputError(
            f"caption {path} holds {len(lines)} lines; a caption is one line (persres does not pick one of "
            "several): join them or keep one"
        )
    return resolve(lines[0], identifier, path)


def resolve(caption: str, identifier: str, path: Path) -> str:
    """``caption`` with ``identifier`` in place of V* (or V1*) and [trigger]; it must name the concept."""
    for found in PLACEHOLDER.finditer(caption):
        if found.group(1) not in ("", "1"):
            raise InputError(
                f"caption {path} uses {found.group(0)}, but a run learns one concept; write V* instead"
            )
    expanded = PLACEHOLDER.sub(lambda _: identifier, caption.replace(TRIGGER, "V*"))
    if not has_word(expanded, identifier, ignore_case=False):
        raise InputError(
            f"caption {path} ({quote(caption)}) does not name the concept: write V* (or {TRIGGER}) where "
            f"the identifier goes, e.g. 'a photo of a V* dog on the grass'; without it the "
            "photo teaches nothing about the concept"
        )
    return expanded


def has_word(text: str, word: str, ignore_case: bool = True) -> bool:
    """Whether ``word`` stands in ``text`` as a word of its own (punctuation around it allowed). The
    identifier is matched in its case (T5 and some tokenizers keep case), the class word in any."""
    flags = re.IGNORECASE if ignore_case else 0
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags) is not None
