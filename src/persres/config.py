"""Frozen configuration dataclasses with the paper's defaults.

Every value here is either from the paper (Ham et al., CVPR 2024) or a documented choice of ours
where the paper is silent (see PAPER.md, lines marked "choice"). Validation lives in
``__post_init__`` so a bad value fails where it is made, with the argument named.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from persres.errors import ConfigError, quote
from persres.methods.catalog import DEFAULT_METHOD, METHODS
from persres.readback import shown

InitMode = Literal["zero", "random"]
MixedPrecision = Literal["no", "fp16", "bf16"]
ReportTo = Literal["none", "tensorboard", "wandb"]
REPORT_TO = ("none", "tensorboard", "wandb")
QuantizeBase = Literal["no", "int8"]  # the frozen denoiser's weights: as loaded, or int8 (core/quantize.py)
QUANTIZE_BASE = ("no", "int8")
# The learning rate over a run: constant (the paper's), or cosine, from `lr` at the first step down to 0
# after the last (``TrainConfig.lr_at``; a function of the step, so a resumed run takes the same rates).
LrSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = ("constant", "cosine")
# Each training image's loss weighted by its timestep: none (the paper's plain mean), or min-snr (Hang et
# al. 2023, kohya's --min_snr_gamma): min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for v, with
# gamma = MIN_SNR_GAMMA; where a family offers it is its backbone's (``timestep_weightings``).
TimestepWeighting = Literal["none", "min-snr"]
TIMESTEP_WEIGHTINGS = ("none", "min-snr")
MIN_SNR_GAMMA = 5.0  # the paper's recommended gamma
# What the loss compares the prediction with outside a `mask` (training/masks.py): the photo's own target
# (the masked loss of kohya's scripts), or the frozen base's prediction for the same noisy latents, so
# that what is trained learns to leave the background as the base draws it (methods that are
# ``bypassable`` only).
MaskBackgroundTarget = Literal["photo", "base"]
MASK_BACKGROUND_TARGETS = ("photo", "base")
DEFAULT_TOKEN = "sks"
MAX_TRAIN_SEED = 2**63 - 1  # torch generators take seeds below 2**64; each process adds its index
# The personalization methods and the method-specific settings each one takes (persres.methods.catalog,
# without torch); a setting the chosen method does not take is refused.
METHOD_OPTIONS: dict[str, frozenset[str]] = {name: info.options for name, info in METHODS.items()}
PAPER_RECIPE = METHODS[DEFAULT_METHOD].recipe  # TrainConfig's defaults: 150 steps, batch 4, lr 1e-3
# Ceilings of the training settings: far above every published recipe, low enough that a typo fails at
# once instead of allocating for minutes (or writing a 1.4 GB adapter file).
MAX_RANK = 4096  # no layer persres adapts is wider (SD 1.x/2.x/SDXL: 320-1280 channels, text 768-2048)
MAX_STEPS_TRAIN = 1_000_000  # the recipes take 150-3000 steps
MAX_BATCH_SIZE = 1024  # the recipes take 1-16 images per step
MAX_PRIOR_IMAGES = 10_000  # diffusers' DreamBooth scripts draw 100-200, Custom Diffusion 200
MAX_SCALE = 100.0  # export --scale: the strength folded into a LoRA file (1 is the trained concept)
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # CustomConcept101's CLIP ViT-B/32
DEFAULT_DINO = "facebook/dino-vits16"  # CustomConcept101's DINO ViT-S/16


@dataclass(frozen=True)
class ResidualConfig:
    """How each ``proj_out`` residual is shaped and started.

    rank: a float in (0, 1] is a fraction of the layer width m_i (the paper's 0.05 gives 16/32/64
        for 320/640/1280 channels), rounded, at least 1; an int >= 1 is a fixed rank for every layer.
    init: "zero" starts the up factor at zero so training starts exactly at the base model (our
        choice, the adapter convention); "random" draws both factors, as the paper's review reports.
    """

    rank: float | int = 0.05
    init: InitMode = "zero"

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, (int, float)):
            raise ConfigError(f"`rank` must be a number, got {quote(repr(rank))}")
        if isinstance(rank, float) and not 0.0 < rank <= 1.0:
            raise ConfigError(
                f"`rank` {rank} is neither a fraction in (0, 1] nor an integer >= 1; "
                "use e.g. 0.05 (5% of each layer's width) or 16 (a fixed rank)"
            )
        if isinstance(rank, int) and not 1 <= rank <= MAX_RANK:
            raise ConfigError(
                f"`rank` {rank} must be >= 1 and <= {MAX_RANK}; "
                "use e.g. 0.05 (a fraction) or 16 (a fixed rank)"
            )
        if self.init not in ("zero", "random"):
            raise ConfigError(f"`init` must be 'zero' or 'random', got {quote(str(self.init))}")

    def rank_for(self, width: int, layer: str = "") -> int:
        """The rank of a residual on a layer ``width`` channels wide."""
        if isinstance(self.rank, float):
            return max(1, round(self.rank * width))
        if self.rank > width:
            raise ConfigError(
                f"`rank` {self.rank} is above the width {width} of layer {layer or '?'}; "
                f"use a rank <= {width} or a fraction such as 0.05"
            )
        return self.rank

    @staticmethod
    def parse_rank(text: str) -> float | int:
        """'0.05' -> 0.05 (fraction), '16' -> 16 (fixed rank); as typed on a command line, range checked."""
        try:
            rank: float | int = int(text)
        except ValueError:
            try:
                rank = float(text)
            except ValueError:
                raise ConfigError(f"`rank` {quote(text)} is not a number; use e.g. 0.05 or 16") from None
        ResidualConfig(rank=rank)  # refuses NaN, infinity, 0, fractions above 1 and ranks above MAX_RANK
        return rank


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults: the paper's recipe (150 steps, batch 4, lr 1e-3) and our choices
    (AdamW, 512 px, constant learning rate, random horizontal flip and mild crop)."""

    base: str
    images: str
    class_word: str
    token: str = DEFAULT_TOKEN
    steps: int = PAPER_RECIPE.steps
    batch_size: int = PAPER_RECIPE.batch_size
    lr: float = PAPER_RECIPE.lr
    lr_schedule: LrSchedule = "constant"
    timestep_weighting: TimestepWeighting = "none"
    residual: ResidualConfig = ResidualConfig()
    resolution: int = 512
    seed: int = 0
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50
    flip: bool = True
    min_crop: float = 0.85  # mild crop: a random square covering at least this share of the side
    adam_weight_decay: float = 1e-2
    validation_prompts: tuple[str, ...] = ()
    validation_every: int | None = None  # also sample the validation prompts every N steps
    report_to: ReportTo = "none"  # an accelerate tracker for the loss, besides OUT/logs/loss.csv
    class_reason: str = ""  # how the class word was chosen, e.g. by --class-word auto
    method: str = DEFAULT_METHOD  # one of persres.methods.catalog.METHODS: residuals, lora, dreambooth, ...
    lora_rank: int = 4  # --method lora: rank of each adapter (diffusers' DreamBooth-LoRA default)
    prior_images: int = 0  # methods with prior preservation: class images drawn by the base model
    prior_weight: float = 1.0  # weight of the prior-preservation loss (DreamBooth: 1)
    # the trainers' data options, off by default so the paper's recipe stays as it is:
    captions: bool = False  # NAME.txt beside a photo is its prompt, V* the identifier (training/captions.py)
    buckets: bool = False  # aspect-ratio buckets instead of square crops (training/buckets.py)
    # memory: every training prompt encoded before the first step, then the text encoders dropped
    release_text_encoders: bool = False
    quantize_base: QuantizeBase = "no"  # int8: the frozen denoiser's linear weights in 8 bits (torchao)
    # compute: each photo encoded by the VAE once before the first step, at a fixed (centred) crop
    # (training/latent_cache.py); needs `min_crop` 1
    cache_latents: bool = False
    # masked loss (training/masks.py): "none" (the paper's plain MSE), "alpha" (each photo's alpha channel),
    # "attention" (the frozen base's map of the class word, each step), "attention-trained" (the same map
    # read in the training pass of the model being trained), or a folder of one mask per photo
    mask: str = "none"
    mask_background_weight: float = 0.0  # the loss weight outside the mask (kohya's masked loss: 0)
    mask_background_target: MaskBackgroundTarget = "photo"  # outside the mask: the photo, or the base

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "resolution", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        for name, high in (
            ("steps", MAX_STEPS_TRAIN),
            ("batch_size", MAX_BATCH_SIZE),
            ("prior_images", MAX_PRIOR_IMAGES),
            ("lora_rank", MAX_RANK),
        ):
            value = getattr(self, name)
            if value > high:
                raise ConfigError(f"`{name}` must be <= {high:,}, got {value:,}")
        if not 0 < self.lr <= 1:  # also refuses NaN and infinity
            raise ConfigError(f"`lr` must be in (0, 1], got {self.lr}; the paper uses 1e-3")
        if self.resolution % 8:
            raise ConfigError(f"`resolution` {self.resolution} must be a multiple of 8 (e.g. 512)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            got = quote(str(self.mixed_precision))
            raise ConfigError(f"`mixed_precision` must be no, fp16 or bf16, got {got}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ConfigError(f"`min_crop` must be in (0, 1], got {self.min_crop}")
        for name in ("class_word", "token"):
            value = getattr(self, name)
            if not value.strip():
                raise ConfigError(f"`{name}` must not be empty")
        if any(ch.isspace() for ch in self.token):
            raise ConfigError(f"`token` {quote(self.token)} must be a single word without spaces")
        if not 0 <= self.seed <= MAX_TRAIN_SEED:
            raise ConfigError(f"`seed` must be in [0, {MAX_TRAIN_SEED}], got {self.seed}")
        if not 0 <= self.adam_weight_decay < math.inf:
            decay = self.adam_weight_decay
            raise ConfigError(f"`adam_weight_decay` must be a finite number >= 0, got {decay}")
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"`report_to` must be one of {', '.join(REPORT_TO)}, got {quote(str(self.report_to))}"
            )
        if self.quantize_base not in QUANTIZE_BASE:
            got = quote(str(self.quantize_base))
            raise ConfigError(f"`quantize_base` must be one of {', '.join(QUANTIZE_BASE)}, got {got}")
        if self.method not in METHODS:
            raise ConfigError(f"`method` {quote(self.method)} is not one of {', '.join(METHODS)}")
        if self.lora_rank < 1 or self.prior_images < 0:
            raise ConfigError(
                f"`lora_rank` must be >= 1 and `prior_images` >= 0, got {self.lora_rank}, {self.prior_images}"
            )
        if not 0 <= self.prior_weight <= 100:
            raise ConfigError(f"`prior_weight` must be a finite number in [0, 100], got {self.prior_weight}")
        if self.validation_every is not None:
            if self.validation_every < 1:
                raise ConfigError(f"`validation_every` must be >= 1, got {self.validation_every}")
            if not self.validation_prompts:
                raise ConfigError(
                    "`validation_every` needs at least one `validation_prompts` to sample; add one, "
                    "or drop `validation_every`"
                )
        if self.release_text_encoders:
            self.check_release()
        if self.quantize_base != "no" and not METHODS[self.method].trains_on_8bit_base:
            able = ", ".join(name for name, info in METHODS.items() if info.trains_on_8bit_base)
            raise ConfigError(
                f"`method` {self.method} cannot train on a base with 8-bit weights (`quantize_base` "
                f"{self.quantize_base}): it changes or copies the base's own weights; use `quantize_base` "
                f"no, or one of {able}"
            )
        if self.cache_latents and self.min_crop < 1.0:
            raise ConfigError(
                f"`cache_latents` encodes each photo once, at one fixed crop, but `min_crop` {self.min_crop} "
                "crops the photos anew every step; set `min_crop` 1 (each photo's centred crop) or drop "
                "`cache_latents`"
            )
        self.check_mask()

    def check_mask(self) -> None:
        """`mask` is none, alpha, attention or a folder; `mask_background_weight` in [0, 1], with a mask."""
        if not self.mask.strip():
            raise ConfigError(
                "`mask` must be none, alpha, attention, attention-trained or a folder of masks, got an empty "
                "value"
            )
        if not 0.0 <= self.mask_background_weight <= 1.0:  # also refuses NaN
            raise ConfigError(
                f"`mask_background_weight` must be in [0, 1], got {self.mask_background_weight}"
            )
        if self.mask == "none" and self.mask_background_weight != 0.0:
            raise ConfigError(
                "`mask_background_weight` weighs the loss outside a mask, but `mask` is none; give a `mask` "
                "(alpha, attention or a folder) or drop `mask_background_weight`"
            )
        self.check_background_target()
        if self.mask in ("attention", "attention-trained") and self.captions:
            raise ConfigError(
                f"`mask` {self.mask} reads the class word's attention in the training prompt, but `captions` "
                "gives each photo its own prompt, which need not name the class word; use `mask` alpha or "
                "a folder of masks with `captions`, or drop `captions`"
            )
        if self.mask == "attention-trained" and self.gradient_checkpointing:
            raise ConfigError(
                "`mask` attention-trained reads the maps in the training pass with other attention "
                "processors, which `gradient_checkpointing`'s recomputation would not match; use `mask` "
                "attention, or drop `gradient_checkpointing`"
            )

    def check_background_target(self) -> None:
        """`mask_background_target` base needs a mask, a background weight and a base to switch to."""
        if self.mask_background_target not in MASK_BACKGROUND_TARGETS:
            raise ConfigError(
                f"`mask_background_target` must be photo or base, got {quote(self.mask_background_target)}"
            )
        if self.mask_background_target == "photo":
            return
        if self.mask == "none" or self.mask_background_weight == 0.0:
            raise ConfigError(
                "`mask_background_target` base compares the background with the base's prediction, but "
                "it has no weight: give a `mask` and a `mask_background_weight` above 0 (e.g. 1)"
            )
        if not METHODS[self.method].bypassable:
            takes = ", ".join(name for name, info in METHODS.items() if info.bypassable)
            raise ConfigError(
                f"`mask_background_target` base needs the frozen base's prediction, which `method` "
                f"{self.method} changes as it trains (methods that keep it: {takes}); use photo"
            )

    def check_release(self) -> None:
        """`release_text_encoders` needs prompts that can be encoded once (the validation prompts are
        encoded before the encoders are released, and sampled from their embeddings)."""
        if METHODS[self.method].trains_text_side:
            raise ConfigError(
                f"`release_text_encoders` cannot be used with `method` {self.method}: it trains the text "
                "side, so its prompts are encoded again every step; drop `release_text_encoders`"
            )

    @property
    def prompt(self) -> str:
        """The training prompt, "a photo of a V* {macro class}" (paper, section 3)."""
        return f"a photo of a {self.token} {self.class_word}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """The config saved as JSON (``to_dict``), each setting checked against its field's type first:
        a ``ConfigError`` names the setting (``residual.rank``) and the type it needs."""
        return from_fields(cls, data)

    def resumable_with(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other`` and would change the result of a resumed run.
        ``steps`` and ``checkpoint_every`` may change (a run can be extended), ``lr`` (a diverged run
        can continue more gently from its last good checkpoint), and what is only observed: validation
        prompts and their frequency, the tracker, and whether the text encoders are released.
        `cache_latents` may not: it fixes the crop of a photo that is not square."""
        free = {
            "steps",
            "checkpoint_every",
            "validation_prompts",
            "validation_every",
            "report_to",
            "class_reason",
            "lr",
            "release_text_encoders",  # the same losses with the encoders loaded or released (tested)
        }
        if self.lr_schedule != "constant" or other.lr_schedule != "constant":
            free.discard("steps")  # a decaying rate is a function of the run's length: it cannot be extended
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in free and mine[k] != theirs[k])

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (1 .. `steps`): `lr`, or with `lr_schedule` cosine
        `lr` (1 + cos(pi (step - 1) / steps)) / 2, `lr` at the first step and near 0 at the last."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.steps))


def from_fields(cls: type[Any], data: Mapping[str, Any], where: str = "") -> Any:
    """A frozen config dataclass from its JSON form, every value checked against the field's annotation
    (JSON's lists become tuples, objects the nested dataclass); ``where`` prefixes nested names."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown settings {[where + k for k in unknown]}; this persres knows {sorted(names)}"
        )
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"setting {where + missing[0]!r} is missing")
    return cls(**typed_values(cls, data, where))


def typed_values(cls: type[Any], data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """The values of ``data`` that name a field of ``cls``, each checked against the field's annotation
    and converted (lists to tuples, objects to the nested dataclass); other names are left out. A value
    of another type is a ``ConfigError`` naming the setting and the type it needs."""
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        if name not in hints:
            continue
        converted = _typed(value, hints[name], where + name)
        if converted is _WRONG:
            wanted = _describe(hints[name])
            raise ConfigError(f"setting {where + name!r} is {shown(value)}, expected {wanted}")
        values[name] = converted
    return values


def _required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


_WRONG = object()  # _typed's answer for a value of another type


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type ``hint`` (a JSON list as a tuple, an object as a dataclass), or ``_WRONG``.
    Ints count as floats (JSON writes 1.0 as 1) but are kept: ``rank`` 16 is not the fraction 16.0."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return next((typed for arm in args if (typed := _typed(value, arm, name)) is not _WRONG), _WRONG)
    if origin is Literal:
        return value if any(type(value) is type(arg) and value == arg for arg in args) else _WRONG
    if origin is tuple:  # tuple[X, ...]
        if not isinstance(value, (list, tuple)):
            return _WRONG
        items = [_typed(item, args[0], name) for item in value]
        return _WRONG if any(item is _WRONG for item in items) else tuple(items)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_fields(hint, value, f"{name}.") if isinstance(value, dict) else _WRONG
    if hint is float:
        return value if type(value) in (int, float) else _WRONG
    if hint is type(None):
        return value if value is None else _WRONG
    return value if type(value) is hint else _WRONG  # str, int, bool: bool is not an int here


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"an object ({hint.__name__})"
    names = {str: "text", int: "a whole number", float: "a number", bool: "true or false", type(None): "null"}
    return names.get(hint, str(hint))


MAX_STEPS = 1000  # DDIM cannot take more steps than the 1000 training timesteps of Stable Diffusion


@dataclass(frozen=True)
class SampleSettings:
    """Sampling settings; ``height``/``width`` None means the model's native size, ``guidance`` None the
    base family's (its backbone's ``default_guidance``: classifier-free 7.5 on Stable Diffusion, the
    distilled 3.5 on Flux.1-dev), set by ``with_guidance`` once the base is known."""

    steps: int = 50
    guidance: float | None = None
    num_images: int = 1
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"`steps` must be in [1, {MAX_STEPS}], got {self.steps}")
        if self.num_images < 1:
            raise ConfigError(f"`num_images` must be >= 1, got {self.num_images}")
        if self.guidance is not None and not 0 <= self.guidance <= 100:  # also refuses NaN and infinity
            raise ConfigError(f"`guidance` must be a finite number in [0, 100], got {self.guidance}")
        if self.seed < 0:
            raise ConfigError(f"`seed` must be >= 0, got {self.seed}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"`{name}` {value} must be a positive multiple of 8")

    def with_guidance(self, default: float) -> SampleSettings:
        """These settings with ``default`` as the `guidance` when none was given; a given one is kept."""
        return self if self.guidance is not None else dataclasses.replace(self, guidance=default)
