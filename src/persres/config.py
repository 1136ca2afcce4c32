"""Frozen configuration dataclasses with the paper's defaults.

Every value here is either from the paper (Ham et al., CVPR 2024) or a documented choice of ours
where the paper is silent (see PAPER.md, lines marked "choice"). Validation lives in
``__post_init__`` so a bad value fails where it is made, with the argument named.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from persres.errors import ConfigError, quote

InitMode = Literal["zero", "random"]
MixedPrecision = Literal["no", "fp16", "bf16"]
ReportTo = Literal["none", "tensorboard", "wandb"]
REPORT_TO = ("none", "tensorboard", "wandb")
DEFAULT_TOKEN = "sks"
# The personalization methods (persres.methods) and the method-specific settings each one takes; the
# CLI refuses a setting the chosen method does not take. Kept here, without torch, for instant parsing.
METHOD_OPTIONS: dict[str, frozenset[str]] = {
    "residuals": frozenset({"rank", "init"}),
    "lora": frozenset({"rank"}),
    "dreambooth": frozenset({"prior_images", "prior_weight"}),
    "custom-diffusion": frozenset({"prior_images", "prior_weight"}),
    "textual-inversion": frozenset(),
    "perfusion": frozenset(),
}
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
            raise ConfigError(f"rank must be a number, got {quote(repr(rank))}")
        if isinstance(rank, float) and not 0.0 < rank <= 1.0:
            raise ConfigError(
                f"rank {rank} is neither a fraction in (0, 1] nor an integer >= 1; "
                "use e.g. 0.05 (5% of each layer's width) or 16 (a fixed rank)"
            )
        if isinstance(rank, int) and not 1 <= rank <= MAX_RANK:
            raise ConfigError(
                f"rank {rank} must be >= 1 and <= {MAX_RANK}; use e.g. 0.05 (a fraction) or 16 (a fixed rank)"
            )
        if self.init not in ("zero", "random"):
            raise ConfigError(f"init must be 'zero' or 'random', got {quote(str(self.init))}")

    def rank_for(self, width: int, layer: str = "") -> int:
        """The rank of a residual on a layer ``width`` channels wide."""
        if isinstance(self.rank, float):
            return max(1, round(self.rank * width))
        if self.rank > width:
            raise ConfigError(
                f"rank {self.rank} is above the width {width} of layer {layer or '?'}; "
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
                raise ConfigError(f"--rank {quote(text)} is not a number; use e.g. 0.05 or 16") from None
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
    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
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
    method: str = "residuals"  # persres.methods: residuals, lora, dreambooth, custom-diffusion, ...
    lora_rank: int = 4  # --method lora: rank of each adapter (diffusers' DreamBooth-LoRA default)
    prior_images: int = 0  # methods with prior preservation: class images drawn by the base model
    prior_weight: float = 1.0  # weight of the prior-preservation loss (DreamBooth: 1)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "resolution", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name, high in (
            ("steps", MAX_STEPS_TRAIN),
            ("batch_size", MAX_BATCH_SIZE),
            ("prior_images", MAX_PRIOR_IMAGES),
            ("lora_rank", MAX_RANK),
        ):
            value = getattr(self, name)
            if value > high:
                raise ConfigError(f"{name.replace('_', '-')} must be <= {high:,}, got {value:,}")
        if not 0 < self.lr <= 1:  # also refuses NaN and infinity
            raise ConfigError(f"lr must be in (0, 1], got {self.lr}; the paper uses 1e-3")
        if self.resolution % 8:
            raise ConfigError(f"resolution {self.resolution} must be a multiple of 8 (e.g. 512)")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            got = quote(str(self.mixed_precision))
            raise ConfigError(f"mixed-precision must be no, fp16 or bf16, got {got}")
        if not 0.0 < self.min_crop <= 1.0:
            raise ConfigError(f"min_crop must be in (0, 1], got {self.min_crop}")
        for name in ("class_word", "token"):
            value = getattr(self, name)
            if not value.strip():
                raise ConfigError(f"{name.replace('_', '-')} must not be empty")
        if any(ch.isspace() for ch in self.token):
            raise ConfigError(f"token {quote(self.token)} must be a single word without spaces")
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"report-to must be one of {', '.join(REPORT_TO)}, got {quote(str(self.report_to))}"
            )
        if self.method not in METHOD_OPTIONS:
            raise ConfigError(f"method {quote(self.method)} is not one of {', '.join(METHOD_OPTIONS)}")
        if self.lora_rank < 1 or self.prior_images < 0:
            raise ConfigError(
                f"lora rank must be >= 1 and prior images >= 0, got {self.lora_rank}, {self.prior_images}"
            )
        if not 0 <= self.prior_weight <= 100:
            raise ConfigError(f"prior weight must be a finite number in [0, 100], got {self.prior_weight}")
        if self.validation_every is not None:
            if self.validation_every < 1:
                raise ConfigError(f"validation-every must be >= 1, got {self.validation_every}")
            if not self.validation_prompts:
                raise ConfigError(
                    "--validation-every needs at least one --validation-prompt to sample; add one, "
                    "or drop --validation-every"
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
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"unknown training settings {unknown}; this persres knows {sorted(fields)}")
        values = dict(data)
        if "residual" in values:
            values["residual"] = ResidualConfig(**values["residual"])
        if "validation_prompts" in values:
            values["validation_prompts"] = tuple(values["validation_prompts"])
        return cls(**values)

    def resumable_with(self, other: TrainConfig) -> list[str]:
        """Settings that differ from ``other`` and would change the result of a resumed run.
        ``steps`` and ``checkpoint_every`` may change (a run can be extended), ``lr`` (a diverged run
        can continue more gently from its last good checkpoint), and what is only observed: validation
        prompts and their frequency, and the tracker."""
        free = {
            "steps",
            "checkpoint_every",
            "validation_prompts",
            "validation_every",
            "report_to",
            "class_reason",
            "lr",
        }
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in free and mine[k] != theirs[k])


MAX_STEPS = 1000  # DDIM cannot take more steps than the 1000 training timesteps of Stable Diffusion


@dataclass(frozen=True)
class SampleSettings:
    """DDIM sampling settings; ``height``/``width`` None means the model's native size."""

    steps: int = 50
    guidance: float = 7.5
    num_images: int = 1
    seed: int = 0
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"--steps must be in [1, {MAX_STEPS}], got {self.steps}")
        if self.num_images < 1:
            raise ConfigError(f"--num-images must be >= 1, got {self.num_images}")
        if not 0 <= self.guidance <= 100:  # also refuses NaN and infinity
            raise ConfigError(f"--guidance must be a finite number in [0, 100], got {self.guidance}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"--{name} {value} must be a positive multiple of 8")
