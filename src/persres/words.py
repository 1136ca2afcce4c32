"""English words persres knows: the shipped WordNet noun table (``assets/wordnet_nouns.tsv.gz``,
117,798 WordNet 3.0 noun lemmas, built by ``scripts/build_wordnet.py``; licence in
``assets/WORDNET_LICENSE.txt``) and the other one-word lemmas, standard library only.

Training checks its identifier against ``real_words`` (an identifier that is a word carries its meaning
into every prompt); the macro class (``persres.evaluation.macro``) ranks the nouns against the
concept's photos.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from persres.errors import InputError, quote

HEADER = "lemma\tdepth\ttagged"


@dataclass(frozen=True)
class Noun:
    lemma: str
    depth: int  # hypernym steps from "entity" to the first sense; -1 when unknown
    tagged: int  # SemCor sense-tagged count, a frequency proxy


def load_nouns(path: str | os.PathLike[str] | None = None) -> list[Noun]:
    """The shipped WordNet nouns, or a custom list (one noun per line, or the same TSV layout)."""
    if path is None:
        raw = resources.files("persres").joinpath("assets/wordnet_nouns.tsv.gz").read_bytes()
        return parse_nouns(gzip.decompress(raw).decode("utf-8"), "the shipped WordNet table")
    file = Path(path)
    if not file.is_file():
        raise InputError(f"noun list {file} not found; pass `nouns` with a text file, one noun per line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"noun list {file} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise InputError(f"noun list {file} cannot be read ({exc.strerror or exc})") from None
    return parse_nouns(text, f"noun list {file}")


def parse_nouns(text: str, where: str) -> list[Noun]:
    """Lines ``noun`` or ``noun<TAB>depth<TAB>count``; blank lines and the TSV header are skipped."""
    nouns = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line == HEADER:
            continue
        fields = line.split("\t")
        try:
            if not fields[0].strip() or len(fields) > 3:
                raise ValueError("not one noun and at most two numbers")
            depth = int(fields[1]) if len(fields) > 1 else -1
            tagged = int(fields[2]) if len(fields) > 2 else 0
            if depth < -1 or tagged < 0:
                raise ValueError("negative number")
        except ValueError:
            raise InputError(
                f"{where} line {number}: {quote(line)} must be 'noun' or 'noun<TAB>depth<TAB>count' "
                "(whole numbers: depth -1 when unknown, count >= 0)"
            ) from None
        nouns.append(Noun(fields[0].strip(), depth, tagged))
    if not nouns:
        raise InputError(f"{where} holds no noun; write one noun per line")
    return nouns


FUNCTION_WORDS = frozenset(
    "a an the and or but nor so yet for of in on at by to from with without into onto upon over under about "
    "above below between among through during before after since until while as than then that this these "
    "those there here where when why how what which who whom whose it its he she his her him they them their "
    "we us our you your i me my mine is are was were be been being am do does did have has had will would "
    "shall should can could may might must not no yes all any each every some few more most other such own "
    "same very too also just only".split()
)


def real_words() -> set[str]:
    """Lower-case English words with a meaning of their own: WordNet's one-word lemmas (nouns, verbs,
    adjectives, adverbs) and function words."""
    return set(_real_words())


@functools.cache
def _real_words() -> frozenset[str]:
    """Parsed once per process (about 0.7 s): every ``train`` checks its identifier against it."""
    nouns = {n.lemma.lower() for n in load_nouns() if " " not in n.lemma}
    raw = resources.files("persres").joinpath("assets/wordnet_other_words.txt.gz").read_bytes()
    others = set(gzip.decompress(raw).decode("utf-8").split())
    return frozenset(nouns | others | FUNCTION_WORDS)
