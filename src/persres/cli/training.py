"""``persres train``: parse the run's settings into a ``TrainConfig`` and call the training loop
(``persres.training.train.train``). Defaults come from ``TrainConfig`` itself."""

from __future__ import annotations

import argparse
from dataclasses import fields

from persres.cli.options import (
    BATCH_SIZE,
    LEARNING_RATE,
    MASK_BACKGROUND_WEIGHT,
    PIXELS,
    PRIOR_IMAGES,
    PRIOR_WEIGHT,
    SEED,
    TRAIN_STEPS,
    add_device,
    rank,
)
from persres.config import (
    DEFAULT_CLIP,
    LR_SCHEDULES,
    MASK_BACKGROUND_TARGETS,
    QUANTIZE_BASE,
    TIMESTEP_WEIGHTINGS,
    TrainConfig,
)
from persres.errors import ConfigError
from persres.methods.catalog import METHODS
from persres.methods.recipes import Overrides, not_taken, train_config

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train residuals for a concept from a folder of photos",
        description="Train personalized residuals (paper defaults: 150 steps, batch 4, lr 1e-3).",
    )
    p.add_argument("--base", required=True, help="diffusers Stable Diffusion 1.x/2.x folder or hub id")
    p.add_argument("--images", required=True, help="folder of 1-50 photos of the concept (jpg/png/webp)")
    p.add_argument(
        "--class-word",
        required=True,
        help="the macro class, e.g. dog, teapot, sofa; 'auto' picks a WordNet noun with CLIP",
    )
    p.add_argument(
        "--class-strategy",
        choices=["nearest", "balanced"],
        default="nearest",
        help="with --class-word auto: nearest noun (paper) or balanced (more general; default nearest)",
    )
    p.add_argument("--clip", default=DEFAULT_CLIP, help="with --class-word auto: CLIP model")
    p.add_argument("--nouns", help="with --class-word auto: own noun list instead of WordNet")
    p.add_argument(
        "--out", required=True, help="output folder for residuals.safetensors, config.json, checkpoints"
    )
    p.add_argument(
        "--token", default=DEFAULTS["token"], help="identifier V*, a rare single token (default %(default)s)"
    )
    p.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULTS["method"],
        help="what to train (default %(default)s); the others are the peers, each as its authors define it",
    )
    add_recipe(p, by_method=True)
    p.add_argument(
        "--rank",
        type=rank,
        help="residuals: fraction of each layer's width (0.05) or fixed rank (16); default: the base's "
        "(0.05 on Stable Diffusion, 21 on Flux.1); "
        f"lora: the adapters' rank (default {DEFAULTS['lora_rank']})",
    )
    p.add_argument("--init", choices=["zero", "random"], help="residuals: factor init (default zero)")
    p.add_argument(
        "--prior-images",
        type=PRIOR_IMAGES,
        help="dreambooth, custom-diffusion: class images to draw (at most 10,000; the recipes draw 200)",
    )
    p.add_argument(
        "--prior-weight", type=PRIOR_WEIGHT, help="dreambooth, custom-diffusion: prior loss weight"
    )
    p.add_argument(
        "--checkpoint-every",
        type=TRAIN_STEPS,
        default=DEFAULTS["checkpoint_every"],
        help="steps between checkpoints",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument(
        "--captions",
        action="store_true",
        help="NAME.txt beside a photo NAME.jpg is its prompt, with V* (or [trigger]) for the identifier; "
        "photos without one use the method's prompt (default off: one prompt for all)",
    )
    p.add_argument(
        "--buckets",
        action="store_true",
        help="aspect-ratio buckets of about --resolution^2 pixels instead of square crops (default off)",
    )
    p.add_argument(
        "--release-text-encoders",
        action="store_true",
        help="encode the training and validation prompts once, then free the text encoders' memory "
        "(T5-XXL on Flux); not with methods that train the text side (default off)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="the learning rate over the run: constant (the paper's), or cosine from --lr down to 0 at the "
        "last step (default constant)",
    )
    p.add_argument(
        "--timestep-weighting",
        choices=TIMESTEP_WEIGHTINGS,
        default="none",
        help="weigh each image's loss by its timestep: none (the paper's), or min-snr (min(SNR, 5) / SNR, "
        "Hang et al. 2023; Stable Diffusion bases) (default none)",
    )
    p.add_argument(
        "--quantize-base",
        choices=QUANTIZE_BASE,
        default="no",
        help="int8: the frozen base's linear weights in 8 bits (torchao), the residuals in full precision; "
        "about half the memory of a bf16 Flux transformer (default no)",
    )
    p.add_argument(
        "--cache-latents",
        action="store_true",
        help="encode each photo by the VAE once before the first step instead of every step; each photo "
        "then keeps one centred crop (no random crop; the flip stays) (default off)",
    )
    p.add_argument(
        "--mask",
        default=DEFAULTS["mask"],
        metavar="none|alpha|attention|attention-trained|DIR",
        help="weigh the loss by a mask of the concept: alpha (each photo's alpha channel, opaque = subject), "
        "DIR (one mask per photo, same name, white = subject), attention (the frozen base's cross-attention "
        "map of the class word at each step, a second pass), attention-trained (the same map of the model "
        "being trained, read in its own pass: no extra cost); none trains on the whole photo (default none)",
    )
    p.add_argument(
        "--mask-background-weight",
        type=MASK_BACKGROUND_WEIGHT,
        default=DEFAULTS["mask_background_weight"],
        help="the loss weight outside the mask, in [0, 1] (default 0: the background is not learned)",
    )
    p.add_argument(
        "--mask-background-target",
        choices=MASK_BACKGROUND_TARGETS,
        default=DEFAULTS["mask_background_target"],
        help="what the prediction outside the mask is compared with: photo (the photo's own target), or "
        "base (the frozen base's prediction, a second pass unless --mask attention makes it anyway: the "
        "background is kept as the base draws it; residuals and lora) (default photo)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.add_argument(
        "--validation-prompt",
        action="append",
        default=[],
        help='sampled into OUT/validation after training, e.g. "a V* dog on the beach"; repeatable',
    )
    p.add_argument(
        "--validation-every", type=TRAIN_STEPS, help="also sample the validation prompts every N steps"
    )
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard", "wandb"],
        default=DEFAULTS["report_to"],
        help="also log the loss to this tracker, in OUT/logs (default none; OUT/logs/loss.csv always)",
    )
    add_device(p)
    p.set_defaults(handler=run)


def add_recipe(p: argparse.ArgumentParser, by_method: bool = False, every_method: bool = False) -> None:
    """The training recipe's options, shared with ``persres benchmark``. ``by_method``: steps, batch
    size and learning rate default to the chosen method's recipe (its authors' numbers);
    ``every_method``: given, they apply to every --method (the benchmark)."""

    def default(name: str) -> dict[str, object]:
        if by_method:
            every = "; given, it applies to every --method" if every_method else ""
            return {
                "default": None,
                "help_default": f"each method's recipe; residuals: {DEFAULTS[name]}{every}",
            }
        return {"default": DEFAULTS[name], "help_default": str(DEFAULTS[name])}

    for flag, kind, what in (
        ("--steps", TRAIN_STEPS, "optimizer steps"),
        ("--batch-size", BATCH_SIZE, "images per step (at most 1024)"),
        ("--lr", LEARNING_RATE, "AdamW learning rate"),
    ):
        chosen = default(flag[2:].replace("-", "_"))
        p.add_argument(
            flag, type=kind, default=chosen["default"], help=f"{what} (default: {chosen['help_default']})"
        )
    p.add_argument(
        "--resolution",
        type=PIXELS,
        default=None,
        help=f"training size in px (default {DEFAULTS['resolution']}; 1024 for an SDXL base)",
    )
    p.add_argument(
        "--no-flip", action="store_true", help="no random horizontal flips (for asymmetric concepts)"
    )
    p.add_argument("--seed", type=SEED, default=DEFAULTS["seed"], help="random seed (default %(default)s)")
    p.add_argument(
        "--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="base model precision"
    )


def native_resolution(base: str) -> int:
    """--resolution's default: the base's backbone's (1024 for SDXL and Flux, 512 for SD 1.x/2.x)."""
    from persres.backbones import backbone_for_base

    return backbone_for_base(base).default_resolution


def run(args: argparse.Namespace) -> int:
    from persres.files import check_writable
    from persres.training.train import train

    check_writable(args.out, "out")  # before anything reads the base model (e.g. its default resolution)

    class_word, reason = args.class_word, ""
    if class_word == "auto":
        class_word, reason = auto_class_word(args)
        print(f"class word: {class_word} ({reason})")
    config = train_config_of(args, class_word, reason)
    result = train(config, args.out, resume=args.resume, overwrite=args.overwrite, device=args.device)
    loss = "none" if result.final_loss is None else f"{result.final_loss:.5f}"
    print(
        f"trained {result.parameters:,} {args.method} parameters for {result.steps} steps (final loss {loss})"
    )
    print(f"{'residuals' if METHODS[args.method].trains_residuals else 'result'}: {result.residuals}")
    return 0


def train_config_of(args: argparse.Namespace, class_word: str, reason: str) -> TrainConfig:
    """The run ``persres train`` was asked for: the method's recipe unless given, and the settings only it
    takes (one given for a method that does not take it is refused, by its flag)."""
    wrong = not_taken(args.method, (name for name in METHOD_FLAGS if getattr(args, name) is not None))
    if wrong:
        takes = ", ".join(METHOD_FLAGS[n] for n in sorted(METHODS[args.method].options)) or "none of them"
        raise ConfigError(
            f"{', '.join(METHOD_FLAGS[n] for n in wrong)} does not apply to --method {args.method} "
            f"(its own options: {takes}); drop it or choose another --method"
        )
    overrides = Overrides(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        rank=args.rank,
        init=args.init,
        prior_images=args.prior_images,
        prior_weight=args.prior_weight,
    )
    return train_config(
        args.method,
        args.base,
        args.images,
        class_word,
        overrides,
        class_reason=reason,
        token=args.token,
        resolution=args.resolution or native_resolution(args.base),
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        flip=not args.no_flip,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        captions=args.captions,
        buckets=args.buckets,
        release_text_encoders=args.release_text_encoders,
        quantize_base=args.quantize_base,
        cache_latents=args.cache_latents,
        lr_schedule=args.lr_schedule,
        timestep_weighting=args.timestep_weighting,
        mask=args.mask,
        mask_background_weight=args.mask_background_weight,
        mask_background_target=args.mask_background_target,
        **({"min_crop": 1.0} if args.cache_latents else {}),  # cached latents take fixed crops
        validation_prompts=tuple(args.validation_prompt),
        validation_every=args.validation_every,
        report_to=args.report_to,
    )


def auto_class_word(args: argparse.Namespace) -> tuple[str, str]:
    """``--class-word auto``: the macro class chosen by CLIP among WordNet (or --nouns) nouns, and why."""
    from persres.evaluation.evaluate import Scorers
    from persres.evaluation.macro import load_nouns, suggest_classes

    scorers = Scorers.load(args.clip, None, args.device)
    listed = load_nouns(args.nouns) if args.nouns else None
    suggestions = suggest_classes(scorers, args.images, 5, args.class_strategy, nouns=listed)
    runners_up = ", ".join(f"{s.noun} {s.score:.3f}" for s in suggestions[1:])
    source = "WordNet noun" if args.nouns is None else f"noun from {args.nouns}"
    reason = (
        f"--class-word auto: {source} chosen by {args.class_strategy} with {args.clip}, cosine "
        f"{suggestions[0].score:.3f}; next: {runners_up}"
    )
    return suggestions[0].noun, reason


METHOD_FLAGS = {
    "rank": "--rank",
    "init": "--init",
    "prior_images": "--prior-images",
    "prior_weight": "--prior-weight",
}
