"""``persres suggest-class`` and ``persres suggest-token``: choosing the macro class and identifier."""

from __future__ import annotations

import argparse
import json

from persres.cli.options import COUNT, add_device, add_scorers, number
from persres.errors import ModelError

MARGIN = number(0.0, 1.0)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "suggest-class",
        help="rank WordNet nouns as macro class for a folder of photos (CLIP)",
        description="Mean CLIP image embedding of the photos vs 'a photo of a {noun}.' for 117,798 WordNet "
        "nouns (embeddings cached per CLIP model). nearest = the paper's rule; balanced = the most general "
        "noun within --margin of the best cosine.",
    )
    p.add_argument("--images", required=True, help="folder of the concept's photos")
    add_scorers(p, dino=False)
    p.add_argument("--top", type=COUNT, default=10, help="how many to list (default 10)")
    p.add_argument(
        "--strategy", choices=["nearest", "balanced"], default="nearest", help="which noun comes first"
    )
    p.add_argument("--margin", type=MARGIN, default=0.01, help="balanced: cosine margin (default 0.01)")
    p.add_argument("--nouns", help="own noun list (one per line) instead of WordNet")
    p.add_argument("--json", action="store_true", help="print a JSON list of {noun, score, ...}")
    add_device(p)
    p.set_defaults(handler=run_suggest_class)
    p = commands.add_parser(
        "suggest-token",
        help="propose rare single-token identifiers that are not real words",
        description="The rarest whole-word tokens of the base model's tokenizer with 3-4 letters that are "
        "not WordNet nouns, each checked to be one token (on Flux also for T5, which carries the prompt).",
    )
    p.add_argument("--base", required=True, help="base model (its tokenizer is used): folder or hub id")
    p.add_argument("--top", type=COUNT, default=10, help="how many (default 10)")
    p.set_defaults(handler=run_suggest_token)


def run_suggest_class(args: argparse.Namespace) -> int:
    from persres.evaluation.evaluate import Scorers
    from persres.evaluation.macro import load_nouns, suggest_classes

    nouns = load_nouns(args.nouns) if args.nouns else None
    scorers = Scorers.load(args.clip, None, args.device)
    found = suggest_classes(scorers, args.images, args.top, args.strategy, args.margin, nouns)
    if not args.json:
        for s in found:
            print(f"{s.score:.4f}  {s.noun}")
        return 0
    listed = [
        {"noun": s.noun, "score": round(s.score, 6), "wordnet_depth": s.depth, "semcor_count": s.tagged}
        for s in found
    ]
    print(json.dumps(listed, indent=2))
    return 0


def run_suggest_token(args: argparse.Namespace) -> int:
    from persres.core.pipeline import load_prompt_readers, load_tokenizer
    from persres.core.tokens import suggest_tokens
    from persres.words import real_words

    tokenizer = load_tokenizer(args.base)
    readers = [reader.tokenizer for reader in load_prompt_readers(args.base)]  # Flux: T5's
    found = suggest_tokens(tokenizer, real_words(), args.top, readers=readers)
    if not found:
        raise ModelError(
            f"no rare word of 3-4 letters is one token for every tokenizer of {args.base}; choose --token "
            "yourself (persres train warns when it is several tokens)"
        )
    for word in found:
        print(word)
    return 0
