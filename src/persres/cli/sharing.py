"""``persres export`` and ``persres import``: a concept as a LoRA file for the tools people generate
with (AUTOMATIC1111, Forge, ComfyUI, diffusers), and such a file back as residuals."""

from __future__ import annotations

import argparse

from persres.cli.options import SCALE


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "export",
        help="write a run's residuals as a LoRA file (kohya or diffusers format)",
        description="A residual on proj_out is a LoRA on that layer with alpha = rank: the file loads in "
        "AUTOMATIC1111, Forge, ComfyUI, kohya's scripts (--format kohya) and diffusers' "
        "pipe.load_lora_weights (either format) with normal sampling; LAG needs persres. "
        "Prompts use the trigger phrase the command prints (the token and class word).",
    )
    p.add_argument("source", metavar="RUN_OR_FILE", help="a residuals run folder or residuals.safetensors")
    p.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="the LoRA file's layout")
    p.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    p.add_argument(
        "--scale", type=SCALE, default=1.0, help="strength folded into the file, in [-100, 100] (default 1)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(handler=run_export)
    p = commands.add_parser(
        "import",
        help="read a LoRA file on proj_out layers back as residuals (then sample it with LAG)",
        description="Reads a kohya or diffusers LoRA whose every layer is a transformer block's proj_out. "
        "A file persres exported gives its residual file back exactly; any other needs --token and "
        "--class-word.",
    )
    p.add_argument("file", metavar="FILE", help="a LoRA .safetensors file")
    p.add_argument("--base", required=True, help="the base model the LoRA was made for")
    p.add_argument("--out", required=True, help="folder for residuals.safetensors")
    p.add_argument("--token", default=None, help="the LoRA's trigger word (not needed for persres exports)")
    p.add_argument("--class-word", default=None, help="its class word, e.g. dog (ditto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing residuals.safetensors")
    p.set_defaults(handler=run_import)


def run_export(args: argparse.Namespace) -> int:
    from persres.formats.io import read_residual_file
    from persres.formats.lora_files import export_lora

    out = export_lora(args.source, args.format, args.out, args.scale, args.overwrite)
    metadata = read_residual_file(args.source).metadata
    print(f"{args.format} LoRA written to {out}")
    print(f"trigger phrase: {metadata.get('token', '')} {metadata.get('class_word', '')}".rstrip())
    return 0


def run_import(args: argparse.Namespace) -> int:
    from persres.formats.lora_files import import_lora

    out = import_lora(args.file, args.base, args.out, args.token, args.class_word, args.overwrite)
    print(f"residuals written to {out}")
    return 0
