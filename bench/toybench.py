"""What the toy-world benchmark scripts share: their common arguments and markdown tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from persres.toyworld.experiment import ToySettings


def toy_parser(doc: str | None, out: str) -> argparse.ArgumentParser:
    """--base, --oracle, --concepts, --images and --out (``out`` by default, refused if it exists)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="models/toyworld-base")
    parser.add_argument("--oracle", type=Path, default=Path("models/toyworld-oracle"))
    parser.add_argument("--concepts", type=int, default=5)
    parser.add_argument("--images", type=int, default=ToySettings.images_per_prompt, help="images per prompt")
    parser.add_argument("--out", type=Path, default=Path(out))
    return parser


def parse_fresh(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; remove it or choose another folder")
    return args


def md_row(*cells: object) -> str:
    return "| " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |"


def md_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = [md_row(*columns), "|" + "---|" * len(columns)]
    lines += [md_row(*(row.get(c, "") for c in columns)) for row in rows]
    return "\n".join(lines)
