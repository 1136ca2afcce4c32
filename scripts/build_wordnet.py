"""Build persres' WordNet noun table from Debian's ``wordnet-base`` (WordNet 3.0).

    apt-get install wordnet-base && python scripts/build_wordnet.py

Writes ``src/persres/assets/wordnet_nouns.tsv.gz``: one noun lemma per line (underscores as spaces)
with the depth of its first (most frequent) sense in the hypernym hierarchy (entity = 0) and its
sense-tagged frequency in SemCor (``tagsense_cnt``); ``wordnet_other_words.txt.gz``: the one-word verb,
adjective and adverb lemmas (to tell real words from made-up identifiers); and copies WordNet's licence.
"""

from __future__ import annotations

import gzip
import shutil
import sys
from collections import deque
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
LICENCE = Path("/usr/share/doc/wordnet-base/copyright")
OUT = Path(__file__).resolve().parents[1] / "src" / "persres" / "assets"


def hypernyms(data_noun: Path) -> dict[str, list[str]]:
    """synset offset -> hypernym offsets (@ and instance @i pointers)."""
    parents: dict[str, list[str]] = {}
    for line in data_noun.read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue  # licence header
        fields = line.split(" | ")[0].split()
        words = int(fields[3], 16)
        at = 4 + 2 * words
        pointers = int(fields[at])
        ups = []
        for k in range(pointers):
            symbol, offset, pos = fields[at + 1 + 4 * k : at + 4 + 4 * k]
            if symbol in ("@", "@i") and pos == "n":
                ups.append(offset)
        parents[fields[0]] = ups
    return parents


def depths(parents: dict[str, list[str]]) -> dict[str, int]:
    """Shortest number of hypernym steps from each synset to a root."""
    children: dict[str, list[str]] = {}
    for child, ups in parents.items():
        for up in ups:
            children.setdefault(up, []).append(child)
    depth = {s: 0 for s, ups in parents.items() if not ups}
    queue = deque(depth)
    while queue:
        node = queue.popleft()
        for child in children.get(node, []):
            if child not in depth:
                depth[child] = depth[node] + 1
                queue.append(child)
    return depth


def main() -> None:
    if not (WORDNET / "index.noun").is_file():
        sys.exit("WordNet not found: apt-get install wordnet-base")
    depth = depths(hypernyms(WORDNET / "data.noun"))
    rows = []
    for line in (WORDNET / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        lemma, pointer_count = fields[0], int(fields[3])
        tagged = int(fields[5 + pointer_count])
        first_sense = fields[6 + pointer_count]
        rows.append(f"{lemma.replace('_', ' ')}\t{depth.get(first_sense, -1)}\t{tagged}")
    OUT.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT / "wordnet_nouns.tsv.gz", "wb", mtime=0) as handle:
        handle.write(("lemma\tdepth\ttagged\n" + "\n".join(rows) + "\n").encode("utf-8"))
    others = sorted(
        {
            line.split()[0]
            for pos in ("verb", "adj", "adv")
            for line in (WORDNET / f"index.{pos}").read_text(encoding="latin-1").splitlines()
            if not line.startswith(" ") and "_" not in line.split()[0]
        }
    )
    with gzip.GzipFile(OUT / "wordnet_other_words.txt.gz", "wb", mtime=0) as handle:
        handle.write(("\n".join(others) + "\n").encode("utf-8"))
    shutil.copyfile(LICENCE, OUT / "WORDNET_LICENSE.txt")
    print(f"{len(rows)} nouns -> {OUT / 'wordnet_nouns.tsv.gz'}")


if __name__ == "__main__":
    main()
