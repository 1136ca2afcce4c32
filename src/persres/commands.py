"""What each subcommand does once its arguments are parsed: build a config, make one library call,
print the outcome. Heavy imports happen here, inside each handler, so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import json
import os

from persres.config import ResidualConfig, TrainConfig
from persres.errors import OutputExistsError, PersresError


def run_evaluate(args: argparse.Namespace) -> int:
    from persres.evaluate import Scorers, evaluate_folder
    from persres.files import write_json

    if args.out and os.path.exists(args.out):
        raise OutputExistsError(f"--out {args.out} already exists; choose another file")
    scorers = Scorers.load(args.clip, args.dino, args.device)
    result = evaluate_folder(args.images, args.references, args.prompt, args.token, scorers)
    if args.out:
        write_json(args.out, result, overwrite=False)
    print(json.dumps(result, indent=2))
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from persres.benchmark import BenchmarkConfig, run_benchmark
    from persres.sampling import SampleSettings

    template = TrainConfig(
        base=args.base,
        images="-",
        class_word="-",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        resolution=args.resolution,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        flip=not args.no_flip,
    )
    config = BenchmarkConfig(
        dataset=args.dataset,
        base=args.base,
        out=args.out,
        ranks=tuple(ResidualConfig.parse_rank(r) for r in (args.rank or ["0.05"])),
        samplers=tuple(args.sampler or ["normal", "lag", "auto"]),
        images_per_prompt=args.images_per_prompt,
        max_prompts=args.max_prompts,
        concepts=tuple(args.concept),
        train=template,
        sample=SampleSettings(
            steps=args.sample_steps,
            guidance=args.guidance,
            seed=args.seed,
            height=args.height,
            width=args.width,
        ),
        clip=args.clip,
        dino=args.dino,
        class_sources=tuple(args.class_source or ["dataset"]),
        nouns=args.nouns,
    )
    out = run_benchmark(config, args.device)
    print(f"results: {out / 'results.csv'}, summary: {out / 'summary.json'}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from persres.report import write_report

    print(f"report: {write_report(args.results, args.out)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from persres.train import train

    class_word, reason = args.class_word, ""
    if class_word == "auto":
        class_word, reason = auto_class_word(
            args.images, args.clip, args.class_strategy, args.device, args.nouns
        )
        print(f"class word: {class_word} ({reason})")
    config = TrainConfig(
        base=args.base,
        images=args.images,
        class_word=class_word,
        class_reason=reason,
        token=args.token,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        residual=ResidualConfig(rank=ResidualConfig.parse_rank(args.rank), init=args.init),
        resolution=args.resolution,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        flip=not args.no_flip,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        validation_prompts=tuple(args.validation_prompt),
        validation_every=args.validation_every,
        report_to=args.report_to,
    )
    result = train(config, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    print(
        f"trained {result.parameters:,} residual parameters for {result.steps} steps "
        f"(final loss {result.final_loss if result.final_loss is None else round(result.final_loss, 5)})"
    )
    print(f"residuals: {result.residuals}")
    return 0


def auto_class_word(images: str, clip: str, strategy: str, device: str, nouns: str | None) -> tuple[str, str]:
    from persres.evaluate import Scorers
    from persres.macro import load_nouns, suggest_classes

    scorers = Scorers.load(clip, None, device)
    listed = load_nouns(nouns) if nouns else None
    suggestions = suggest_classes(scorers, images, 5, strategy, nouns=listed)  # type: ignore[arg-type]
    runners_up = ", ".join(f"{s.noun} {s.score:.3f}" for s in suggestions[1:])
    source = "WordNet noun" if nouns is None else f"noun from {nouns}"
    reason = (
        f"--class-word auto: {source} chosen by {strategy} with {clip}, cosine "
        f"{suggestions[0].score:.3f}; next: {runners_up}"
    )
    return suggestions[0].noun, reason


def run_suggest_class(args: argparse.Namespace) -> int:
    from persres.evaluate import Scorers
    from persres.macro import load_nouns, suggest_classes

    nouns = load_nouns(args.nouns) if args.nouns else None
    scorers = Scorers.load(args.clip, None, args.device)
    found = suggest_classes(scorers, args.images, args.top, args.strategy, args.margin, nouns)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "noun": s.noun,
                        "score": round(s.score, 6),
                        "wordnet_depth": s.depth,
                        "semcor_count": s.tagged,
                    }
                    for s in found
                ],
                indent=2,
            )
        )
    else:
        for s in found:
            print(f"{s.score:.4f}  {s.noun}")
    return 0


def run_suggest_token(args: argparse.Namespace) -> int:
    from transformers import CLIPTokenizer

    from persres.macro import real_words
    from persres.tokens import suggest_tokens

    try:
        tokenizer = CLIPTokenizer.from_pretrained(args.base, subfolder="tokenizer")
    except (OSError, ValueError) as exc:
        raise PersresError(
            f"cannot load the tokenizer of --base {args.base}: {str(exc).splitlines()[0]}"
        ) from None
    for word in suggest_tokens(tokenizer, real_words(), args.top):
        print(word)
    return 0


def run_sample(args: argparse.Namespace) -> int:
    from persres.sampling import SampleSettings
    from persres.workflows import sample_to_folder

    settings = SampleSettings(
        steps=args.steps,
        guidance=args.guidance,
        num_images=args.num_images,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )
    written = sample_to_folder(
        args.base,
        args.residuals,
        args.prompt,
        args.out,
        settings,
        args.sampler,
        args.save_masks,
        args.device,
        args.precision,
    )
    for path in written:
        print(path)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from persres.workflows import describe

    print(json.dumps(describe(args.file), indent=2))
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from persres.workflows import merge_to_folder

    print(f"merged pipeline written to {merge_to_folder(args.base, args.residuals, args.out)}")
    return 0
