"""What the command line calls each setting the library names.

The library's messages name a setting by its field or parameter name in backticks ("`steps` must be
>= 1, got 0", "choose another `out`"), so that a library user, the web app and the command line each
read them in their own words. This module holds the one table from setting to flag (or positional
argument) and ``for_command_line``, which the CLI's error printer and its log handler apply.

Where one setting has a different flag in some command, the table keeps the common one and says so.
"""

from __future__ import annotations

import logging

from persres.errors import with_names

FLAGS: dict[str, str] = {
    # what a command reads
    "base": "--base",
    "images": "--images",
    "residuals": "--residuals",
    "references": "--references",
    "dataset": "--dataset",
    "nouns": "--nouns",
    "clip": "--clip",
    "dino": "--dino",
    "source": "RUN_OR_FILE",  # export's positional argument
    "file": "FILE",  # info's positional argument
    "path": "FILE",  # import-lora's positional argument (import_lora's path)
    # what a command writes, and how
    "out": "--out",
    "overwrite": "--overwrite",
    "resume": "--resume",
    "runs": "--runs",
    "fmt": "--format",  # export_lora's fmt
    "scale": "--scale",
    # training (TrainConfig and its residual settings)
    "class_word": "--class-word",
    "token": "--token",
    "steps": "--steps",  # also sampling's DDIM steps in sample; benchmark calls those --sample-steps
    "batch_size": "--batch-size",
    "lr": "--lr",
    "lr_schedule": "--lr-schedule",
    "timestep_weighting": "--timestep-weighting",
    "rank": "--rank",  # the residuals' rank (ResidualConfig.rank)
    "lora_rank": "--rank",  # the same flag sets a LoRA's rank with --method lora
    "init": "--init",
    "resolution": "--resolution",
    "seed": "--seed",
    "mixed_precision": "--mixed-precision",
    "gradient_checkpointing": "--gradient-checkpointing",
    "checkpoint_every": "--checkpoint-every",
    "flip": "--no-flip",  # the flag turns the flip off
    "captions": "--captions",
    "buckets": "--buckets",
    "release_text_encoders": "--release-text-encoders",
    "quantize_base": "--quantize-base",
    "cache_latents": "--cache-latents",
    "mask": "--mask",
    "mask_background_weight": "--mask-background-weight",
    "mask_background_target": "--mask-background-target",
    "validation_prompts": "--validation-prompt",  # given once per prompt
    "validation_every": "--validation-every",
    "report_to": "--report-to",
    "method": "--method",
    "prior_images": "--prior-images",
    "prior_weight": "--prior-weight",
    "device": "--device",
    # sampling (SampleSettings and sample_to_folder)
    "prompt": "--prompt",
    "prompts": "--prompt",  # given once per prompt
    "sampler": "--sampler",
    "guidance": "--guidance",
    "num_images": "--num-images",
    "height": "--height",
    "width": "--width",
    "precision": "--precision",
    "save_masks": "--save-masks",
    # benchmark (BenchmarkConfig)
    "concepts": "--concept",  # given once per concept
    "methods": "--method",  # given once per method
    "ranks": "--rank",  # given once per rank
    "samplers": "--sampler",
    "class_sources": "--class-source",
    "images_per_prompt": "--images-per-prompt",
    "max_prompts": "--max-prompts",
    "sample_steps": "--sample-steps",
    # suggestions
    "top": "--top",
    "strategy": "--strategy",  # train calls it --class-strategy (with --class-word auto)
    "margin": "--margin",
}


def for_command_line(message: str) -> str:
    """``message`` with each backticked setting replaced by its flag: "`steps` must be >= 1" ->
    "--steps must be >= 1". A name the table does not know is left bare, without its backticks."""
    return with_names(message, FLAGS)


class FlagNames(logging.Filter):
    """Log records shown by the CLI name flags, as its error messages do."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "`" in record.msg:
            record.msg = for_command_line(record.msg)
        return True
