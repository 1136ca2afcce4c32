"""Masked training (`mask`, `mask_background_weight`): the weighted loss (exactly the plain MSE under an
all-ones mask; a hand computation otherwise), masks from alpha channels and folders cropped and flipped
with their photos and area-averaged to the latent grid, bad masks refused by name with nothing written,
`mask` attention made by the frozen base under no_grad, `mask` none giving the losses persres gave before
masks existed, and masked runs resuming exactly, on SD 1.x and Flux; `mask_background_target` base holding
the background to the frozen base's prediction (the hand computation, one base pass, who may use it)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    assert_same_factors,
    interrupted_and_resumed,
    randomize_residuals,
    tiny_config,
    train_argv,
)
from PIL import Image

from persres.backbones import backbone_of
from persres.backbones.vae import Posterior
from persres.cli import main
from persres.config import TrainConfig
from persres.core.conditioning import encode
from persres.core.pipeline import load_pipeline
from persres.core.residuals import find_residuals
from persres.errors import ConfigError
from persres.methods import get_method
from persres.methods.catalog import METHODS
from persres.training import attention_masks
from persres.training.attention_masks import AttentionMasks, TrainedAttentionMasks, on_latent_grid
from persres.training.batches import TrainingData
from persres.training.data import ConceptImages
from persres.training.latent_cache import LatentCache
from persres.training.masks import anchored_mse, file_mask, read_masks, to_latent_grid, weighted_mse
from persres.training.train import denoising_loss, train

DATA = Path(__file__).parent / "data" / "mask-none-losses"
CPU = torch.device("cpu")
MASK_NONE_CASES = {  # tests/data/mask-none-losses/make.py's CASES
    "sd": ("conv_base", {}),
    "sd-lora": ("conv_base", {"method": "lora"}),
    "sd-buckets-cached": ("conv_base", {"resolution": 32, "buckets": True, "cache_latents": True,
                                        "min_crop": 1.0}),
    "sd-dreambooth-prior": ("conv_base", {"method": "dreambooth", "prior_images": 2, "steps": 3, "lr": 1e-4}),
    "flux": ("flux_base", {"steps": 3}),
}  # fmt: skip


def subject(height: int, width: int, seed: int) -> np.ndarray:
    """A (H, W) bool mask: a random rectangle, not touching the borders."""
    rng = np.random.default_rng(seed)
    top, left = int(rng.integers(1, height // 2)), int(rng.integers(1, width // 2))
    mask = np.zeros((height, width), bool)
    mask[top : top + height // 3, left : left + width // 3] = True
    return mask


@pytest.fixture(scope="module")
def masked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(photos, masks folder, alpha photos): three photos of different shapes whose pixels are white on
    the subject and black elsewhere, their masks (white = subject), and the same as RGBA photos whose
    colour is black on the subject (transparent elsewhere: composited on white, the photo is 1 - mask)."""
    root = tmp_path_factory.mktemp("masked")
    photos, masks, alpha = root / "photos", root / "masks", root / "alpha"
    for folder in (photos, masks, alpha):
        folder.mkdir()
    for i, (height, width) in enumerate([(24, 24), (20, 28), (30, 22)]):
        mask = subject(height, width, i)
        white = np.where(mask, 255, 0).astype(np.uint8)
        Image.fromarray(np.stack([white] * 3, -1)).save(photos / f"p{i}.jpg", quality=100)
        Image.fromarray(white).save(masks / f"p{i}.png")
        rgba = np.zeros((height, width, 4), np.uint8)
        rgba[..., 3] = white
        Image.fromarray(rgba, "RGBA").save(alpha / f"p{i}.png")
    return photos, masks, alpha


# -- the loss --------------------------------------------------------------------------------------


def step_inputs(base: Path, seed: int = 0) -> tuple[Any, Any, Any, torch.Tensor]:
    pipe = load_pipeline(str(base))
    backbone = backbone_of(pipe)
    text = encode(pipe, "a photo of a sks dog", CPU, 16).detach()
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return pipe, backbone, text, pixels


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])
def test_an_all_ones_mask_gives_exactly_the_unmasked_loss(model: str, request: pytest.FixtureRequest) -> None:
    pipe, backbone, text, pixels = step_inputs(request.getfixturevalue(model))
    denoiser, scheduler = backbone.denoiser(pipe), backbone.training_scheduler(pipe)

    def loss(mask: Any, background: float = 0.0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(3)
        return denoising_loss(denoiser, pipe, scheduler, text, pixels, generator, backbone, mask, background)

    plain = loss(None)
    assert torch.equal(loss(file_mask(torch.ones(2, 1, 16, 16))), plain)
    half = (torch.arange(16) < 8).float().expand(2, 1, 16, 16)
    assert torch.equal(loss(file_mask(half), background=1.0), plain)  # background weight 1: no mask
    assert not torch.equal(loss(file_mask(half)), plain)


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])
def test_the_masked_loss_is_the_weighted_mse_computed_by_hand(
    model: str, request: pytest.FixtureRequest
) -> None:
    pipe, backbone, text, pixels = step_inputs(request.getfixturevalue(model), seed=1)
    denoiser, scheduler = backbone.denoiser(pipe), backbone.training_scheduler(pipe)
    pixel_mask = (torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(5)) > 0.6).float()
    got = denoising_loss(
        denoiser, pipe, scheduler, text, pixels, torch.Generator().manual_seed(7), backbone,
        file_mask(pixel_mask), 0.25,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(7)  # the same draws, by hand
    latents = backbone.latents(pipe, backbone.posterior(pipe, pixels, CPU), generator)
    noisy, steps, target = backbone.noised(scheduler, latents, generator)
    with torch.no_grad():
        prediction = backbone.predict(pipe, denoiser, noisy, steps, text)
    error = (prediction.double() - target.double()) ** 2  # (B, C, h, w)
    batch, channels, height, width = error.shape
    factor = 16 // height
    numerator = denominator = 0.0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                cell = pixel_mask[b, 0, i * factor : (i + 1) * factor, j * factor : (j + 1) * factor]
                share = float(cell.double().mean())  # the area average
                weight = share + 0.25 * (1.0 - share)
                numerator += weight * float(error[b, :, i, j].sum())
                denominator += weight * channels
    assert 0 < pixel_mask.mean() < 1 and factor > 1
    assert got.item() == pytest.approx(numerator / denominator, rel=1e-6, abs=0)
    assert abs(got.item() - float(error.mean())) > 1e-4  # the weights matter


def test_weighted_mse_keeps_its_scale_and_ignores_zero_weights() -> None:
    prediction, target = torch.zeros(1, 2, 2, 2), torch.tensor([[[[1.0, 3.0], [0, 0]], [[1.0, 3.0], [0, 0]]]])
    weights = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert weighted_mse(prediction, target, weights).item() == 1.0  # only the first position counts
    assert weighted_mse(prediction, target, 4 * weights).item() == 1.0  # normalised by the weights


# -- masks from files ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "alpha"])
@pytest.mark.parametrize("buckets", [False, True])
def test_file_masks_are_cropped_and_flipped_with_their_photos(
    kind: str, buckets: bool, masked: tuple[Path, Path, Path]
) -> None:
    photos, masks, alpha = masked
    folder = photos if kind == "folder" else alpha
    images = ConceptImages.from_folder(folder, 16)
    images = images.with_masks(read_masks(str(masks) if kind == "folder" else "alpha", images.paths))
    data = TrainingData.of(images, "a photo of a sks dog", None, 16 if buckets else None)
    flips = 0
    for seed in range(12):
        plain, with_masks = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        unmasked = TrainingData.of(ConceptImages(images.paths, images.tensors, 16), data.prompts[0], None,
                                   16 if buckets else None).draw(3, plain, 0.6, True)  # fmt: skip
        drawn = data.draw(3, with_masks, 0.6, True)
        assert torch.equal(plain.get_state(), with_masks.get_state())  # the random stream stays aligned
        assert isinstance(drawn.pixels, torch.Tensor) and torch.equal(drawn.pixels, unmasked.pixels)
        assert drawn.masks is not None and drawn.masks.shape == (3, 1, *drawn.pixels.shape[-2:])
        brightness = (drawn.pixels[:, :1] + 1) / 2  # the photo is the mask (alpha: its complement)
        expected = brightness if kind == "folder" else 1 - brightness
        torch.testing.assert_close(drawn.masks, expected, atol=0.02, rtol=0)  # jpeg and rounding
        flips += int(drawn.masks.flip(-1).sub(expected).abs().max() > 0.5)  # a mirrored draw is told apart
    assert flips > 0


def test_cached_latents_keep_each_photos_fixed_crop_of_its_mask(masked: tuple[Path, Path, Path]) -> None:
    photos, masks, _ = masked
    images = ConceptImages.from_folder(photos, 16)
    images = images.with_masks(read_masks(str(masks), images.paths))

    def fake(pixels: torch.Tensor) -> Posterior:  # each photo's pixels stand for its posterior
        return Posterior(pixels, torch.zeros_like(pixels))

    cache = LatentCache.encode(images, fake, True)
    for seed in range(8):
        posterior, drawn, _ = cache.draw_masked(3, torch.Generator().manual_seed(seed))
        assert drawn is not None
        torch.testing.assert_close(drawn, (posterior.mean[:, :1] + 1) / 2, atol=0.02, rtol=0)


def test_pixel_masks_reach_the_latent_grid_by_area_average() -> None:
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :4] = 1.0  # the left quarter
    mask[..., 0, 4] = 1.0  # one pixel of the next cell
    grid = to_latent_grid(mask, (2, 2))  # 8 x 8 pixels a cell
    assert torch.equal(grid, torch.tensor([[[[0.5 + 1 / 64, 0.0], [0.5, 0.0]]]]))
    score = torch.arange(4.0).view(1, 1, 4)  # a 2 x 2 attention grid laid on 4 x 4 latents
    assert torch.equal(on_latent_grid(score, 2, 2), score.view(1, 1, 2, 2))
    assert on_latent_grid(score, 4, 4).shape == (1, 1, 4, 4)


# -- refusals --------------------------------------------------------------------------------------


def bad_mask_cases(root: Path, photos: Path) -> dict[str, tuple[str, str]]:
    """case -> (`mask`, the file the refusal names); each in a folder of its own."""
    cases: dict[str, tuple[str, str]] = {}
    names = sorted(p.name for p in photos.iterdir())

    def folder(case: str) -> Path:
        made = root / case
        made.mkdir(parents=True)
        for name in names:
            Image.fromarray(np.full((24, 24), 255, np.uint8)).save(made / (Path(name).stem + ".png"))
        return made

    made = folder("missing")
    (made / "p1.png").unlink()
    cases["missing"] = (str(made), "p1.jpg")
    made = folder("unreadable")
    (made / "p1.png").write_bytes(b"not an image at all")
    cases["unreadable"] = (str(made), "p1.png")
    made = folder("empty")
    (made / "p2.png").write_bytes(b"")
    cases["empty"] = (str(made), "p2.png")
    made = folder("black")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(made / "p0.png")
    cases["all zero"] = (str(made), "p0.png")
    made = folder("size")
    Image.fromarray(np.full((20, 24), 255, np.uint8)).save(made / "p0.png")  # p0 is 24 x 24
    cases["wrong size"] = (str(made), "p0.png")
    made = folder("two")
    Image.fromarray(np.full((24, 24), 255, np.uint8)).save(made / "p2.jpg")
    cases["two masks"] = (str(made), "p2.jpg")
    cases["no folder"] = (str(root / "nowhere"), "nowhere")
    return cases


def test_every_bad_mask_is_refused_by_name_before_anything_is_written(
    conv_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    square = tmp_path / "square"  # 24 x 24 photos, as the cases' masks
    square.mkdir()
    for i in range(3):
        Image.fromarray(np.where(subject(24, 24, i), 255, 0).astype(np.uint8)).convert("RGB").save(
            square / f"p{i}.jpg"
        )
    cases = bad_mask_cases(tmp_path / "masks", square)
    plain = tmp_path / "plain"  # RGB photos: no alpha
    plain.mkdir()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(plain / "red.png")
    opaque = tmp_path / "opaque"
    opaque.mkdir()
    Image.new("RGBA", (24, 24), (200, 10, 10, 255)).save(opaque / "solid.png")
    clear = tmp_path / "clear"
    clear.mkdir()
    Image.new("RGBA", (24, 24), (200, 10, 10, 0)).save(clear / "invisible.png")
    runs = [(square, mask, named) for mask, named in cases.values()]
    runs += [(plain, "alpha", "red.png"), (opaque, "alpha", "solid.png"), (clear, "alpha", "invisible.png")]
    for images, mask, named in runs:
        out = tmp_path / "runs" / Path(mask).name
        assert main(train_argv(conv_base, images, out, "--mask", mask)) == 2, (mask, named)
        error = capsys.readouterr().err
        assert named in error and "error" in error, (named, error)
        assert not out.exists(), named  # nothing written
    assert main(train_argv(conv_base, square, tmp_path / "w", "--mask-background-weight", "0.5")) == 2
    error = capsys.readouterr().err
    assert "--mask-background-weight" in error and "--mask" in error and not (tmp_path / "w").exists()


def test_settings_are_checked() -> None:
    config = TrainConfig(base="b", images="i", class_word="dog")
    assert (config.mask, config.mask_background_weight) == ("none", 0.0)
    for bad in ({"mask": "alpha", "mask_background_weight": 1.5}, {"mask": " "},
                {"mask": "alpha", "mask_background_weight": float("nan")},
                {"mask": "attention", "captions": True}, {"mask": "attention-trained", "captions": True},
                {"mask": "attention-trained", "gradient_checkpointing": True}):  # fmt: skip
        with pytest.raises(ConfigError):
            TrainConfig(base="b", images="i", class_word="dog", **bad)  # type: ignore[arg-type]
    old = {k: v for k, v in config.to_dict().items() if not k.startswith("mask")}
    assert TrainConfig.from_dict(old) == config  # configs written before masks load


# -- the background held to the base (`mask_background_target` base) ------------------------------


def test_anchored_mse_is_the_hand_computation_and_weighted_mse_when_the_base_is_the_target() -> None:
    draw = torch.Generator().manual_seed(11)
    prediction, target, base = (torch.randn(2, 3, 4, 4, generator=draw) for _ in range(3))
    mask = torch.rand(2, 1, 4, 4, generator=draw)  # soft weights, as a file mask's area averages
    per_image = torch.tensor([0.5, 2.0])
    got = anchored_mse(prediction, target, base, mask, 0.3, per_image)
    numerator = denominator = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    m, p = float(mask[b, 0, i, j]), float(prediction[b, c, i, j])
                    term = m * (p - float(target[b, c, i, j])) ** 2
                    term += 0.3 * (1 - m) * (p - float(base[b, c, i, j])) ** 2
                    numerator += float(per_image[b]) * term
                    denominator += m + 0.3 * (1 - m)
    assert got.item() == pytest.approx(numerator / denominator, rel=1e-5)
    same = anchored_mse(prediction, target, target, mask, 0.3, per_image)
    weights = mask + 0.3 * (1 - mask)
    torch.testing.assert_close(same, weighted_mse(prediction, target, weights, per_image))


class Kept:
    """A step's mask as the loss asks for it, kept with the step's noisy latents and timesteps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def watching(self, noisy: torch.Tensor) -> Any:
        return self.inner.watching(noisy)

    def __call__(self, noisy: torch.Tensor, steps: torch.Tensor, text: Any) -> torch.Tensor:
        self.noisy, self.steps, self.mask = noisy, steps, self.inner(noisy, steps, text)
        return self.mask

    def base_prediction(self) -> torch.Tensor | None:
        return self.inner.base_prediction()


@pytest.mark.parametrize("mask", ["folder", "attention", "attention-trained"])
def test_the_background_is_held_to_the_base_with_one_base_pass(
    mask: str, conv_base: Path, photos: Path
) -> None:
    """Residuals at zero: the model is the base, so the background's term is 0 and only the subject's
    error counts; random residuals: the background's error against the base's own prediction counts too.
    Each loss runs the denoiser twice (the trained pass and one of the base: `mask` attention's own)."""
    pipe, backbone, text, pixels = step_inputs(conv_base, seed=2)
    config = tiny_config(conv_base, photos)
    get_method("residuals").prepare(pipe, config, torch.Generator().manual_seed(0))
    denoiser, scheduler = backbone.denoiser(pipe), backbone.training_scheduler(pipe)
    half = (torch.arange(16) < 8).float().expand(2, 1, 16, 16)
    masks: Any = {
        "folder": lambda: file_mask(half),
        "attention": lambda: AttentionMasks.of(pipe, config.prompt, "dog"),
        "attention-trained": lambda: TrainedAttentionMasks.of(pipe, config.prompt, "dog"),
    }[mask]
    passes: list[bool] = []
    handle = denoiser.register_forward_pre_hook(lambda *_: passes.append(torch.is_grad_enabled()))

    def loss(target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, and by hand: the step's mask, the trained model's and the base's errors."""
        kept = Kept(masks())
        generator = torch.Generator().manual_seed(5)
        got = denoising_loss(denoiser, pipe, scheduler, text, pixels, generator, backbone, kept, 1.0,
                             background_target=target)  # fmt: skip
        generator = torch.Generator().manual_seed(5)  # the same draws, by hand
        latents = backbone.latents(pipe, backbone.posterior(pipe, pixels, CPU), generator)
        _, _, wanted = backbone.noised(scheduler, latents, generator)
        with torch.no_grad():
            trained = backbone.predict(pipe, denoiser, kept.noisy, kept.steps, text)
            with attention_masks.base_only(denoiser):
                frozen = backbone.predict(pipe, denoiser, kept.noisy, kept.steps, text)
        return got, kept.mask, (trained - wanted).square(), (trained - frozen).square()

    try:
        passes.clear()
        got, m, subject, background = loss("base")
        assert passes[:2] == [True, False]  # the trained pass, then one of the base
        assert torch.equal(background, torch.zeros_like(background))  # zero residuals: the base itself
        assert got.item() == pytest.approx(float((m * subject).mean()), rel=1e-5)  # sum(w) = sum(1)
        randomize_residuals(denoiser, std=0.5)
        passes.clear()
        got, m, subject, background = loss("base")
        assert len(passes) == 4 and passes[:2] == [True, False]  # 2 in the loss, 2 by hand
        assert float(((1 - m) * background).mean()) > 0 and 0 < float(m.mean()) < 1
        assert got.item() == pytest.approx(float((m * subject + (1 - m) * background).mean()), rel=1e-5)
        photo, _, _, _ = loss("photo")  # background weight 1 on the photo: the plain MSE
        assert photo.item() == pytest.approx(float(subject.mean()), rel=1e-5)
        assert abs(got.item() - photo.item()) > 1e-6
    finally:
        handle.remove()


def test_the_background_target_is_checked(conv_base: Path, photos: Path, tmp_path: Path) -> None:
    for bad in ({"mask_background_target": "base"},  # no mask
                {"mask": "attention", "mask_background_target": "base"},  # weight 0
                {"mask": "attention", "mask_background_weight": 1.0, "mask_background_target": "sky"},
                {"mask": "attention", "mask_background_weight": 1.0, "mask_background_target": "base",
                 "method": "dreambooth"}):  # fmt: skip
        with pytest.raises(ConfigError, match="mask_background_target"):
            TrainConfig(base="b", images="i", class_word="dog", **bad)  # type: ignore[arg-type]
    out = tmp_path / "run"
    argv = train_argv(conv_base, photos, out, "--method", "lora", "--mask", "attention",
                      "--mask-background-weight", "1", "--mask-background-target", "base")  # fmt: skip
    assert main(argv) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["mask"], written["mask_background_target"]) == ("attention", "base")
    assert main(train_argv(conv_base, photos, tmp_path / "db", "--method", "textual-inversion", "--mask",
                           "attention", "--mask-background-weight", "1", "--mask-background-target",
                           "base")) == 2  # fmt: skip
    assert not (tmp_path / "db").exists()


# -- attention masks -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])
def test_attention_masks_come_from_the_frozen_base_without_gradients(
    model: str, photos: Path, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue(model)
    pipe = load_pipeline(str(base))
    config = tiny_config(base, photos)
    get_method("residuals").prepare(pipe, config, torch.Generator().manual_seed(0))
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    text = encode(pipe, config.prompt, CPU, 16).detach()
    masks = AttentionMasks.of(pipe, config.prompt, "dog")
    assert int(masks.columns.sum()) >= 1
    before = dict(denoiser.attn_processors)
    latents = torch.randn(
        2, 4 if model == "conv_base" else 16, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    noisy = latents.clone().requires_grad_(True)
    steps = torch.tensor([500, 900]) if model == "conv_base" else torch.tensor([500.0, 900.0])
    grad_seen: list[bool] = []
    handle = denoiser.register_forward_pre_hook(lambda *_: grad_seen.append(torch.is_grad_enabled()))
    try:
        first = masks(noisy, steps, text)
    finally:
        handle.remove()
    assert grad_seen == [False]  # the base's pass runs under no_grad
    assert not first.requires_grad and first.shape == (2, 1, 8, 8)
    assert set(first.unique().tolist()) == {0.0, 1.0} and first.mean() == 0.5  # the median rule
    assert all(p.grad is None for p in denoiser.parameters())
    assert {k: type(v) for k, v in denoiser.attn_processors.items()} == {
        k: type(v) for k, v in before.items()
    }
    wrappers = find_residuals(denoiser)
    assert wrappers and all(w.enabled for w in wrappers.values())  # switched back on
    randomize_residuals(denoiser, std=5.0)  # what is trained does not move the base's map
    assert torch.equal(masks(noisy, steps, text), first)


def test_attention_masks_read_the_base_under_a_lora_and_leave_it_trainable(
    conv_base: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(str(conv_base))
    text = encode(pipe, tiny_config(conv_base, photos).prompt, CPU, 16).detach()
    noisy, steps = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        torch.tensor([300, 700]),
    )
    first = AttentionMasks.of(pipe, "a photo of a sks dog", "dog")(noisy, steps, text)  # no adapters yet
    config = tiny_config(conv_base, photos, method="lora")
    trainable = get_method("lora").prepare(pipe, config, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in trainable.params.values():
            param.normal_(0, 3.0)  # an adapter that moves every map
    masks = AttentionMasks.of(pipe, "a photo of a sks dog", "dog")
    assert torch.equal(masks(noisy, steps, text), first)
    monkeypatch.setattr(attention_masks, "base_only", lambda _: contextlib.nullcontext())
    assert not torch.equal(masks(noisy, steps, text), first)  # the adapters would have moved it
    assert all(p.requires_grad for p in trainable.params.values())  # the adapters are back on, trainable
    adapted = backbone_of(pipe).predict(pipe, pipe.unet, noisy, steps, text)
    assert adapted.requires_grad


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])
def test_attention_trained_reads_the_training_pass_detached(
    model: str, photos: Path, request: pytest.FixtureRequest
) -> None:
    base = request.getfixturevalue(model)
    pipe = load_pipeline(str(base))
    config = tiny_config(base, photos)
    get_method("residuals").prepare(pipe, config, torch.Generator().manual_seed(0))  # B = 0: the base
    backbone = backbone_of(pipe)
    denoiser = backbone.denoiser(pipe)
    text = encode(pipe, config.prompt, CPU, 16).detach()
    channels = 4 if model == "conv_base" else 16
    noisy = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(2))
    steps = torch.tensor([400, 800]) if model == "conv_base" else torch.tensor([400.0, 800.0])
    frozen = AttentionMasks.of(pipe, config.prompt, "dog")
    trained = TrainedAttentionMasks.of(pipe, config.prompt, "dog")
    with pytest.raises(RuntimeError, match="inside watching"):
        trained(noisy, steps, text)  # asked for without a pass to read
    with trained.watching(noisy):
        prediction = backbone.predict(pipe, denoiser, noisy, steps, text)
    mask = trained(noisy, steps, text)
    assert prediction.requires_grad and not mask.requires_grad  # the training pass, the mask detached
    assert torch.equal(mask, frozen(noisy, steps, text))  # residuals at zero: the base's own map
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    randomize_residuals(denoiser, std=5.0)  # trained residuals move the trained model's maps, not the base's
    with trained.watching(noisy):
        backbone.predict(pipe, denoiser, noisy, steps, text)
    assert not torch.equal(trained(noisy, steps, text), frozen(noisy, steps, text))
    assert torch.equal(frozen(noisy, steps, text), mask)


def test_attention_masks_pick_the_class_words_columns(conv_base: Path) -> None:
    pipe = load_pipeline(str(conv_base))
    masks = AttentionMasks.of(pipe, "a photo of a sks dog", "dog")
    ids = pipe.tokenizer("a photo of a sks dog").input_ids
    dog = pipe.tokenizer("dog", add_special_tokens=False).input_ids
    assert masks.columns.shape == (1, 1, 77)
    expected = [i for i, token in enumerate(ids) if token in dog]
    assert masks.columns[0, 0].nonzero().flatten().tolist() == expected
    with pytest.raises(ConfigError, match="class word"):
        AttentionMasks.of(pipe, "a photo of a sks", "dog")


# -- training runs ---------------------------------------------------------------------------------


def losses(config: TrainConfig, out: Path) -> list[float]:
    seen: list[float] = []
    train(config, out, progress=False, callback=lambda _, loss: seen.append(loss))
    return seen


@pytest.mark.parametrize("case", sorted(MASK_NONE_CASES))
def test_mask_none_gives_the_losses_of_persres_before_masks(
    case: str, photos: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Recorded with one thread before `mask` existed: bit for bit on one thread, within float32's last
    bits with more (a sum's order changes with the thread count: CI runs two)."""
    before = json.loads((DATA / "losses.json").read_text())[case]
    model, changes = MASK_NONE_CASES[case]
    got = losses(tiny_config(request.getfixturevalue(model), photos, **changes), tmp_path / "run")
    got_t, before_t = torch.tensor(got, dtype=torch.float64), torch.tensor(before, dtype=torch.float64)
    if torch.get_num_threads() == 1:
        assert torch.equal(got_t, before_t)
    torch.testing.assert_close(got_t, before_t, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model", ["conv_base", "flux_base"])
@pytest.mark.parametrize("mask", ["folder", "attention", "attention-trained"])
def test_masked_runs_train_and_resume_exactly(
    model: str, mask: str, masked: tuple[Path, Path, Path], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    photos, folder = masked[0], masked[1]
    setting = str(folder) if mask == "folder" else mask
    config = tiny_config(request.getfixturevalue(model), photos, mask=setting, mask_background_weight=0.1,
                         steps=4, lr=5e-2)  # fmt: skip
    whole = losses(config, tmp_path / "whole")
    plain = losses(tiny_config(request.getfixturevalue(model), photos, steps=4, lr=5e-2), tmp_path / "plain")
    assert len(whole) == 4 and all(np.isfinite(whole)) and whole != plain
    resumed = interrupted_and_resumed(config, tmp_path / "split", 3)
    assert_same_factors(resumed, tmp_path / "whole" / "residuals.safetensors")
    written = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert (written["mask"], written["mask_background_weight"]) == (setting, 0.1)


@pytest.mark.parametrize("mask", ["alpha", "attention"])
def test_lora_trains_with_masks_from_the_command_line(
    mask: str, conv_base: Path, masked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    alpha = masked[2]
    out = tmp_path / "run"
    argv = train_argv(
        conv_base, alpha, out, "--method", "lora", "--mask", mask, "--mask-background-weight", "0.2"
    )
    assert main(argv) == 0
    written = json.loads((out / "config.json").read_text())
    assert (written["method"], written["mask"], written["mask_background_weight"]) == ("lora", mask, 0.2)
    rows = (out / "logs" / "loss.csv").read_text().splitlines()
    assert len(rows) == 3  # the header and two steps


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_with_either_kind_of_mask(
    method: str, conv_base: Path, masked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    photos, folder = masked[0], masked[1]
    for mask in (str(folder), "attention", "attention-trained"):
        config = tiny_config(conv_base, photos, method=method, mask=mask, steps=2, lr=1e-4)
        out = tmp_path / Path(mask).name
        seen = losses(config, out)
        assert len(seen) == 2 and all(np.isfinite(seen)), (method, mask)
        assert json.loads((out / "config.json").read_text())["mask"] == mask


def test_sdxl_trains_with_attention_masks(
    xl_base: Path, masked: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    config = tiny_config(xl_base, masked[0], mask="attention", mask_background_weight=0.1, steps=2)
    seen = losses(config, tmp_path / "run")
    plain = losses(tiny_config(xl_base, masked[0], steps=2), tmp_path / "plain")
    assert all(np.isfinite(seen)) and seen != plain


def test_the_app_offers_attention_masks_and_the_toy_recipe_starts_with_them() -> None:
    pytest.importorskip("gradio")
    from persres.app.jobs import PAPER_RECIPE, TOY_RECIPE, make_config

    plain = make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "0.05", TOY_RECIPE)
    masked = make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "0.05", TOY_RECIPE, masked=True)
    assert (plain.mask, masked.mask, masked.mask_background_weight) == ("none", "attention-trained", 0.0)
    assert TOY_RECIPE.masked and masked.timestep_weighting == plain.timestep_weighting == "min-snr"
    paper = make_config("b", Path("p"), "dog", "sks", 10, 5e-3, "0.05", PAPER_RECIPE)
    assert not PAPER_RECIPE.masked and (paper.mask, paper.timestep_weighting) == ("none", "none")


def test_the_toy_world_writes_true_object_masks_that_train(conv_base: Path, tmp_path: Path) -> None:
    from persres.toyworld.experiment import reference_photos

    instance = ("dog", "red", "striped")
    photos = reference_photos(instance, tmp_path / "photos", count=3, masks=tmp_path / "masks")
    kept = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert kept == sorted(p.name for p in photos.iterdir()) and len(kept) == 3
    for name in kept:
        mask = np.asarray(Image.open(tmp_path / "masks" / name))
        assert mask.shape == (32, 32) and 0 < (mask > 127).mean() < 0.9  # an object on a background
    config = tiny_config(conv_base, photos, mask=str(tmp_path / "masks"), resolution=32, steps=2)
    assert all(np.isfinite(losses(config, tmp_path / "run")))
