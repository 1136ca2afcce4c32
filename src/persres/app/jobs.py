"""Training and sampling for the app: library calls (``train``, ``load_personalized`` + ``sample``,
``export_lora``), one at a time on the machine.

gradio's queue already runs one job at a time; ``MACHINE`` also covers a training whose page was
closed: its thread trains on to the end (no job is lost), and the next job waits for it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from persres.app.photos import keep_photos
from persres.app.runstore import losses, new_run, photo_folder, run_config, run_folder
from persres.config import DEFAULT_TOKEN, ResidualConfig, SampleSettings, TimestepWeighting, TrainConfig
from persres.errors import ConfigError
from persres.files import write_json
from persres.formats.runfolder import EXPORTS, REQUEST, RESIDUALS_FILE, SAMPLES
from persres.inference.outputs import write_samples
from persres.inference.sampling import Sample, Sampler
from persres.methods.catalog import DEFAULT_METHOD, METHODS
from persres.methods.recipes import Overrides, train_config
from persres.toymodels import TOY_BASE, TOY_BASES, TOY_FLUX_BASE, locate_toy_model

MACHINE = threading.Lock()
VALIDATION_PROMPT = "a photo of a V* {}"


@dataclass(frozen=True)
class Recipe:
    """What the Train page's "advanced" fields start at for a base model."""

    steps: int
    lr: float
    rank: float | int
    batch_size: int
    resolution: int
    flip: bool
    masked: bool = False  # where "learn the concept, not its background" (`mask` attention-trained) starts
    timestep_weighting: TimestepWeighting = "none"


# The toy U-Net world's recipe, as scripts/demo.sh trains: the sweep's 400 steps at 5e-3, the class word's
# attention maps as the loss mask and min-SNR weighting, the options that won on the toy world's training
# instances and held on its held-out concepts (bench/RESULTS.md, "Learning the concept, not the photos").
TOY_RECIPE = Recipe(
    steps=400, lr=5e-3, rank=0.05, batch_size=4, resolution=32, flip=False, masked=True,
    timestep_weighting="min-snr",
)  # fmt: skip
# The toy Flux base: the same sweep's choice, unmasked (the options were measured on the U-Net world only;
# min-SNR weighs DDPM targets, not flow matching's).
TOY_FLUX_RECIPE = replace(TOY_RECIPE, masked=False, timestep_weighting="none")
TOY_RECIPES = {TOY_BASE: TOY_RECIPE, TOY_FLUX_BASE: TOY_FLUX_RECIPE}
PAPER_RECIPE = Recipe(  # the paper's, as persres train takes it
    steps=METHODS[DEFAULT_METHOD].recipe.steps,
    lr=METHODS[DEFAULT_METHOD].recipe.lr,
    rank=ResidualConfig().rank,
    batch_size=METHODS[DEFAULT_METHOD].recipe.batch_size,
    resolution=TrainConfig.resolution,
    flip=TrainConfig.flip,
)


def is_shipped_base(base: str) -> bool:
    """Whether ``base`` is one of the shipped toy world's bases (the U-Net's or the Flux-shaped one);
    False (not an error) where the toy world is absent."""
    return shipped_name(base) is not None


def shipped_name(base: str) -> str | None:
    """Which shipped toy-world base ``base`` is (``TOY_BASES``), or None."""
    for name in TOY_BASES:
        path = locate_toy_model(name)
        if path is not None and Path(base).resolve() == path.resolve():
            return name
    return None


def recipe_for(base: str) -> Recipe:
    """The toy world's recipe, or the paper's with the base family's `rank` and native `resolution` (as
    ``persres train`` takes them: on Flux.1 rank 21 at 1024 px, on SDXL 0.05 at 1024 px)."""
    shipped = shipped_name(base)
    if shipped is not None:
        return TOY_RECIPES[shipped]
    from persres.backbones import by_pipeline, rank_default_for
    from persres.backbones.folder import pipeline_class_name

    backbone = by_pipeline().get(pipeline_class_name(base) or "")
    if backbone is None:  # not readable here (e.g. a hub id not downloaded): training says why, by name
        return PAPER_RECIPE
    return replace(PAPER_RECIPE, rank=rank_default_for(base), resolution=backbone.default_resolution)


def parse_rank(text: str | float) -> float | int:
    """ "0.05" -> a fraction of each layer's width, "16" -> a fixed rank (as ``persres train --rank``)."""
    return ResidualConfig.parse_rank(str(text))


def make_config(
    base: str,
    photos: Path,
    class_word: str,
    token: str,
    steps: int,
    lr: float,
    rank: str | float,
    recipe: Recipe,
    buckets: bool = False,
    masked: bool = False,
) -> TrainConfig:
    """The app's run: personalized residuals with the base's recipe; ``masked``: `mask` attention-trained
    (the class word's maps read in the training pass: no extra time per step)."""
    if not class_word.strip():
        raise ConfigError("class word is empty: say what the concept is, e.g. dog")
    try:
        parsed = parse_rank(rank)
    except ValueError:
        raise ConfigError(f"rank {rank!r} must be a fraction like 0.05 or a whole number like 16") from None
    steps = int(steps or 0)  # an emptied field: TrainConfig names the setting
    overrides = Overrides(steps=steps, batch_size=recipe.batch_size, lr=float(lr or 0), rank=parsed)
    return train_config(
        DEFAULT_METHOD,  # the app trains personalized residuals
        base,
        str(photos),
        class_word.strip(),
        overrides,
        token=token.strip() or DEFAULT_TOKEN,
        resolution=recipe.resolution,
        flip=recipe.flip,
        checkpoint_every=max(1, steps // 4),
        validation_prompts=(VALIDATION_PROMPT.format(class_word.strip()),),
        buckets=buckets,
        mask="attention-trained" if masked else "none",
        timestep_weighting=recipe.timestep_weighting,
    )


@dataclass
class Update:
    """One report from a training: the losses so far, and at the end the result or the error."""

    run: str
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    done: bool = False
    error: BaseException | None = None


class TrainingJob:
    """``train`` in a thread of its own, reporting each step's loss through a queue."""

    def __init__(self, config: TrainConfig, out: Path, resume: bool, device: str) -> None:
        self.config, self.out, self.resume, self.device = config, out, resume, device
        self.events: queue.Queue[tuple[int, float] | BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self.work, name=f"persres-train-{out.name}", daemon=True)

    def work(self) -> None:
        from persres.training.train import train  # torch and diffusers load with the first job, not the page

        with MACHINE:
            try:
                train(
                    self.config,
                    self.out,
                    resume=self.resume,
                    device=self.device,
                    progress=False,
                    callback=lambda step, loss: self.events.put((step, loss)),
                )
            except BaseException as exc:  # reported to the page, which shows it
                self.events.put(exc)
                return
        self.events.put(None)

    def updates(self, poll_s: float = 0.5) -> Iterator[Update]:
        """Start the training and report at least every ``poll_s`` seconds until it ends."""
        self.thread.start()
        update = Update(self.out.name, self.config.steps)
        while True:
            try:
                event = self.events.get(timeout=poll_s)
            except queue.Empty:
                yield update
                continue
            while True:  # everything that arrived meanwhile, then one report
                if event is None or isinstance(event, BaseException):
                    update.done, update.error = True, event
                    yield update
                    return
                if self.resume and not update.losses:  # the curve up to the checkpoint resumed from
                    update.losses = [row for row in losses(self.out) if row[0] < event[0]]
                update.losses.append(event)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    break
            yield update


def start_training(
    runs: Path,
    name: str,
    uploads: Sequence[str],
    base: str,
    class_word: str,
    token: str,
    steps: int,
    lr: float,
    rank: str | float,
    device: str = "auto",
    buckets: bool = False,
    masked: bool = False,
) -> TrainingJob:
    """Check the settings and photos, make the run's folder and keep its photos; the job to run."""
    recipe = recipe_for(base)
    # bad settings: nothing written
    make_config(base, Path("."), class_word, token, steps, lr, rank, recipe, buckets, masked)
    out = new_run(runs, name or f"{token.strip() or 'sks'}-{class_word}")
    try:
        photos = photo_folder(runs, out)
        keep_photos(uploads, photos)
    except BaseException:
        out.rmdir()
        raise
    config = make_config(base, photos, class_word, token, steps, lr, rank, recipe, buckets, masked)
    write_json(out / REQUEST, config.to_dict())
    return TrainingJob(config, out, resume=False, device=device)


def resume_training(runs: Path, name: str, device: str = "auto") -> TrainingJob:
    """Continue an interrupted run (browser closed, server restarted) from its newest checkpoint."""
    out = run_folder(runs, name)
    return TrainingJob(run_config(out), out, resume=True, device=device)


def sample_runs(
    runs: Path,
    names: Sequence[str],
    prompt: str,
    sampler: str,
    seed: int,
    steps: int,
    device: str = "auto",
) -> list[Sample]:
    """Sample ``prompt`` with the runs' concepts (V* or V1*, V2*) on the base they were trained on, the
    same noise for normal and LAG."""
    from persres.inference.personalized import load_personalized
    from persres.inference.sampling import sample

    if not 1 <= len(names) <= 2:
        raise ConfigError(f"choose one or two runs to sample, got {len(names)}")
    folders = [run_folder(runs, n) for n in names]
    base = trained_base(folders)
    settings = SampleSettings(steps=int(steps), seed=int(seed))
    with MACHINE:
        pipe, concepts = load_personalized(base, [str(f / RESIDUALS_FILE) for f in folders], device)
        samples = sample(
            pipe,
            [prompt],
            concepts,
            settings,
            cast(Sampler, sampler),  # sample() refuses any other name
            save_masks=sampler != "normal",
            progress=False,
        )
    write_samples(folders[0] / SAMPLES, samples, settings, {"base": base, "runs": list(names)})
    return samples


def trained_base(folders: Sequence[Path]) -> str:
    """The base model the runs were trained on; runs of two bases cannot be sampled together."""
    bases = {f.name: run_config(f).base for f in folders}
    if len(set(bases.values())) > 1:
        trained = "; ".join(f"{name} on {base}" for name, base in bases.items())
        raise ConfigError(f"runs trained on different base models cannot be sampled together ({trained})")
    return next(iter(bases.values()))


def base_label(base: str) -> str:
    """How the page names a base model: the shipped toy world's by its family, any other by itself."""
    from persres.backbones import by_pipeline
    from persres.backbones.folder import pipeline_class_name

    backbone = by_pipeline().get(pipeline_class_name(base) or "")
    family = f", {backbone.name}-shaped" if backbone is not None else ""
    return f"the shipped toy world{family} (models/{Path(base).name})" if is_shipped_base(base) else base


def export_run(runs: Path, name: str, fmt: str) -> Path:
    """The run as a LoRA file in ``RUN/exports/`` (rewritten on each request)."""
    from persres.formats.lora_files import export_lora

    folder = run_folder(runs, name)
    (folder / EXPORTS).mkdir(exist_ok=True)
    return export_lora(folder, fmt, folder / EXPORTS / f"{folder.name}-{fmt}.safetensors", overwrite=True)
