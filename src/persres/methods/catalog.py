"""Every personalization method persres trains, as data: its recipe (with the source of each number),
the settings only it takes, and what it can do. Without torch, so that parsing a command line, planning
a benchmark or drawing the app's page never loads a model library; ``persres.methods.get_method``
imports the implementation (``MethodInfo.implementation``) on first use.

Front ends ask a method what it can do (``trains_residuals``, ``samples_with_lag``, ``works_on_sdxl``,
``works_on_flux``, ``trains_on_8bit_base``, ``takes_prior_images``) instead of testing its name, and turn
a recipe into a training configuration with ``persres.methods.recipes.train_config`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from persres.errors import ConfigError, quote


@dataclass(frozen=True)
class Recipe:
    """A method's default training recipe for Stable Diffusion, as its authors give it.

    ``source`` cites where each number comes from (paper, section, or script and its defaults).
    ``prior_images`` > 0 turns on prior preservation: that many images of "a photo of a {class}" drawn
    by the base model (cached, reused across runs), weighted by ``prior_weight`` in the loss."""

    steps: int
    lr: float
    batch_size: int
    source: str
    prior_images: int = 0
    prior_weight: float = 0.0


@dataclass(frozen=True)
class MethodInfo:
    """One method: its name (as typed after ``--method``), where it is implemented, its recipe, the
    method-specific settings it takes (``rank``, ``init``, ``prior_images``, ``prior_weight``; the
    others are refused for it) and its capabilities.

    trains_residuals: its result is a persres residual file (``residuals.safetensors``): the rank the
        benchmark sweeps is its residuals', several concepts go in one image, ``export`` converts it.
    samples_with_lag: localized attention guidance (LAG) gates what it trained while sampling.
    works_on_sdxl: it trains on an SDXL base too (the others: SD 1.x/2.x).
    works_on_flux: it trains on a Flux.1 base too.
    trains_text_side: it trains a token embedding or the text side, so its prompts are encoded again every
        step and the text encoders cannot be released (`release_text_encoders`).
    trains_on_8bit_base: what it trains sits beside the base's weights (residuals, adapters, an embedding),
        so the frozen base may hold 8-bit weights (`quantize_base`); the others change or read the base's
        own weights (DreamBooth fine-tunes them, Custom Diffusion and Perfusion copy and edit K and V).
    bypassable: what it trains can be switched off during training (residuals bypassed, LoRA adapters
        disabled), so the frozen base's own prediction is at hand (`mask_background_target` base); the
        others train the base's weights or the text side, which no switch takes out of the prediction.
    """

    name: str
    implementation: str  # "module:class" implementing persres.methods.protocol.Method
    recipe: Recipe
    options: frozenset[str] = frozenset()
    trains_residuals: bool = False
    samples_with_lag: bool = False
    works_on_sdxl: bool = False
    works_on_flux: bool = False
    trains_text_side: bool = False
    trains_on_8bit_base: bool = False
    bypassable: bool = False

    @property
    def takes_prior_images(self) -> bool:
        """Prior preservation: class images drawn by the base model, weighted in the loss."""
        return "prior_images" in self.options


DEFAULT_METHOD = "residuals"  # the method persres is about, and what a run without "method" trained

_METHODS = (
    MethodInfo(
        name=DEFAULT_METHOD,
        implementation="persres.methods.residuals:Residuals",
        recipe=Recipe(
            steps=150,
            lr=1e-3,
            batch_size=4,
            source="Ham et al., CVPR 2024, sec. 4: 150 iterations, batch 4, learning rate 1e-3",
        ),
        options=frozenset({"rank", "init"}),
        trains_residuals=True,
        samples_with_lag=True,
        works_on_sdxl=True,
        works_on_flux=True,
        trains_on_8bit_base=True,
        bypassable=True,
    ),
    MethodInfo(
        name="lora",
        implementation="persres.methods.lora:LoRA",
        recipe=Recipe(
            steps=500,
            lr=1e-4,
            batch_size=1,
            source=(
                "diffusers examples/dreambooth/README.md, 'Training with Low-Rank Adaptation of Large "
                "Language Models (LoRA)' on Stable Diffusion 1.5: --max_train_steps=500 "
                "--learning_rate=1e-4 --train_batch_size=1 --gradient_accumulation_steps=1 "
                "--lr_scheduler=constant --lr_warmup_steps=0, no prior preservation; "
                "train_dreambooth_lora.py (diffusers main, 2026-08): --rank 4, lora_alpha=rank, "
                "init_lora_weights='gaussian', AdamW weight decay 1e-2"
            ),
        ),
        options=frozenset({"rank"}),
        works_on_flux=True,
        trains_on_8bit_base=True,
        bypassable=True,
    ),
    MethodInfo(
        name="dreambooth",
        implementation="persres.methods.dreambooth:DreamBooth",
        recipe=Recipe(
            steps=800,
            lr=5e-6,
            batch_size=1,
            prior_images=200,
            prior_weight=1.0,
            source=(
                "diffusers examples/dreambooth/README.md, 'Training with prior-preservation loss' (Stable "
                "Diffusion v1-4): --learning_rate=5e-6 --train_batch_size=1 --max_train_steps=800 "
                "--num_class_images=200 --with_prior_preservation --prior_loss_weight=1.0, constant lr, no "
                "warm-up; text encoder frozen (train_dreambooth.py without --train_text_encoder); AdamW "
                "betas (0.9, 0.999), weight decay 1e-2 (train_dreambooth.py defaults). Class images: the "
                "base model's DDIM samples of 'a photo of a {class}' (the script samples with the "
                "pipeline's own scheduler)"
            ),
        ),
        options=frozenset({"prior_images", "prior_weight"}),
    ),
    MethodInfo(
        name="custom-diffusion",
        implementation="persres.methods.custom_diffusion:CustomDiffusion",
        recipe=Recipe(
            steps=250,
            lr=4e-5,
            batch_size=2,
            prior_images=200,
            prior_weight=1.0,
            source=(
                "diffusers examples/custom_diffusion/README.md, 'Cat example' (Stable Diffusion v1-4): "
                "--train_batch_size=2 --learning_rate=1e-5 --scale_lr --max_train_steps=250 "
                "--num_class_images=200 --with_prior_preservation --prior_loss_weight=1.0 "
                "--lr_warmup_steps=0 --hflip --modifier_token '<new1>'; lr 4e-5 is 1e-5 after "
                "train_custom_diffusion.py's --scale_lr on one GPU: x batch 2 x gradient accumulation 1 x "
                "1 process, x 2 with prior preservation; --freeze_model crossattn_kv (the default: to_k, "
                "to_v of attn2), --initializer_token ktn, AdamW weight decay 1e-2 (script defaults). "
                "Regularisation images: generated by the base model here, real LAION images (--real_prior) "
                "in the paper and README"
            ),
        ),
        options=frozenset({"prior_images", "prior_weight"}),
        trains_text_side=True,
    ),
    MethodInfo(
        name="textual-inversion",
        implementation="persres.methods.textual_inversion:TextualInversion",
        recipe=Recipe(
            steps=3000,
            lr=2e-3,
            batch_size=4,
            source=(
                "diffusers examples/textual_inversion/README.md (Stable Diffusion 1.5, 'cat toy'): "
                "--train_batch_size=1 --gradient_accumulation_steps=4 --max_train_steps=3000 "
                "--learning_rate=5.0e-04 --scale_lr --lr_scheduler=constant --lr_warmup_steps=0; persres "
                "takes the effective batch 1 x 4 = 4 in one step and the learning rate --scale_lr makes of "
                "it, 5e-4 x 4 (accumulation) x 1 (batch) x 1 (process) = 2e-3; AdamW weight decay 1e-2 as "
                "the script"
            ),
        ),
        trains_text_side=True,
        trains_on_8bit_base=True,
    ),
    MethodInfo(
        name="perfusion",
        implementation="persres.methods.perfusion:Perfusion",
        recipe=Recipe(
            steps=400,
            lr=3e-2,
            batch_size=16,
            source=(
                "Tewel et al. 2023, implementation details (SD v1.5): 400 steps, batch 16, lr 0.03 for the "
                "K/V targets and 0.006 for the token embedding (here lr x EMBED_SCALE 0.2), about 4 "
                "minutes on one A100. These numbers were read through lucidrains/perfusion-pytorch and "
                "secondary summaries; the paper's own table was not available offline to check them. Gate: "
                "train beta 0.75 tau 0.1, inference beta 0.7 tau 0.15 (lucidrains' defaults, reviewed by "
                "the first author per its README)"
            ),
        ),
        trains_text_side=True,
    ),
)
METHODS: dict[str, MethodInfo] = {info.name: info for info in _METHODS}  # the only list of the methods


def method_info(name: str) -> MethodInfo:
    """The method called ``name``; an unknown name is refused with the choices."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {quote(name)}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def names_where(capable: bool, of: str) -> list[str]:
    """The methods whose capability ``of`` (e.g. "samples_with_lag") is ``capable``, in catalog order:
    for messages that say which methods a setting applies to."""
    return [name for name, info in METHODS.items() if bool(getattr(info, of)) is capable]
