"""Class images for prior preservation: cached by key, topped up, never half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from persres.config import SampleSettings
from persres.errors import ConfigError, InputError
from persres.training import prior
from persres.training.data import MAX_IMAGES, ConceptImages

FAST = SampleSettings(steps=2, guidance=7.5)


def draws(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the seed of every image drawn."""
    seeds: list[int] = []
    original = prior.draw

    def counting(pipe, prompt, seed, resolution, settings, path):  # type: ignore[no-untyped-def]
        seeds.append(seed)
        original(pipe, prompt, seed, resolution, settings, path)

    monkeypatch.setattr(prior, "draw", counting)
    return seeds


def test_cache_hit_draws_and_loads_nothing(conv_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seeds = draws(monkeypatch)
    folder = prior.class_images(str(conv_base), "dog", 2, 16, 5, cache_dir=tmp_path, settings=FAST)
    assert seeds == [5, 6]
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["0000.png", "0001.png"]
    assert Image.open(folder / "0000.png").size == (16, 16)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not load the base model")

    monkeypatch.setattr(prior, "load_pipeline", no_model)
    assert prior.class_images(str(conv_base), "dog", 2, 16, 5, cache_dir=tmp_path, settings=FAST) == folder
    assert prior.class_images(str(conv_base), "dog", 1, 16, 5, cache_dir=tmp_path, settings=FAST) == folder
    assert seeds == [5, 6]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_top_up_draws_only_the_missing_images(
    conv_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    seeds = draws(monkeypatch)
    folder = prior.class_images(str(conv_base), "dog", 2, 16, 0, cache_dir=tmp_path, settings=FAST)
    first = (folder / "0000.png").read_bytes()
    (folder / "0001.png").unlink()  # a gap is drawn again, with its own seed
    assert prior.class_images(str(conv_base), "dog", 3, 16, 0, cache_dir=tmp_path, settings=FAST) == folder
    assert seeds == [0, 1, 1, 2]
    assert (folder / "0000.png").read_bytes() == first
    assert len(prior.read_class_images(folder, 3, 16).tensors) == 3
    assert [p.name for p in prior.read_class_images(folder, 2, 16).paths] == ["0000.png", "0001.png"]


def test_key_depends_on_class_base_and_settings(conv_base: Path, linear_base: Path, tmp_path: Path):
    def folder(base: Path = conv_base, word: str = "dog", seed: int = 0, steps: int = 2) -> Path:
        settings = SampleSettings(steps=steps)
        return prior.class_images(str(base), word, 1, 16, seed, cache_dir=tmp_path, settings=settings)

    folders = [folder(), folder(word="cat"), folder(base=linear_base), folder(seed=1), folder(steps=1)]
    assert len(set(folders)) == len(folders)
    assert folder() == folders[0]


def test_identical_draws_are_reproducible(conv_base: Path, tmp_path: Path):
    a = prior.class_images(str(conv_base), "dog", 1, 16, 0, cache_dir=tmp_path / "a", settings=FAST)
    b = prior.class_images(str(conv_base), "dog", 1, 16, 0, cache_dir=tmp_path / "b", settings=FAST)
    assert (a / "0000.png").read_bytes() == (b / "0000.png").read_bytes()


def test_a_failed_draw_leaves_no_half_image(conv_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    original_save = Image.Image.save
    saved: list[int] = []

    def dying_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        if len(saved) == 2:  # the third image dies half-written
            Path(str(fp)).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        saved.append(1)
        original_save(self, fp, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prior.class_images(str(conv_base), "dog", 3, 16, 0, cache_dir=tmp_path, settings=FAST)
    monkeypatch.setattr(Image.Image, "save", original_save)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [".persres-prior.json", "0000.png", "0001.png"]
    seeds = draws(monkeypatch)
    assert prior.class_images(str(conv_base), "dog", 3, 16, 0, cache_dir=tmp_path, settings=FAST) == folder
    assert seeds == [2]
    assert len(prior.read_class_images(folder, 3, 16).tensors) == 3


def test_default_cache_is_under_persres_cache(
    conv_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path))
    folder = prior.class_images(str(conv_base), "dog", 1, 16, 0, settings=FAST)
    assert folder.parent == tmp_path / "prior"


def test_prior_folders_may_hold_more_than_the_photo_limit(tmp_path: Path):
    for i in range(MAX_IMAGES + 1):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i:04d}.png")
    with pytest.raises(InputError, match="personalization takes 1-50"):
        ConceptImages.from_folder(tmp_path, 8)  # the concept's photos: still 1-50
    assert len(prior.read_class_images(tmp_path, MAX_IMAGES + 1, 8).tensors) == MAX_IMAGES + 1


def test_progress_shows_before_the_base_model_loads(
    conv_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """--prior-images 10000000 ran for minutes with nothing shown: the bar now comes first."""

    def slow_load(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # stands for a model that takes a minute to load

    monkeypatch.setattr(prior, "load_pipeline", slow_load)
    with pytest.raises(KeyboardInterrupt):
        prior.class_images(str(conv_base), "dog", 3, 16, 0, cache_dir=tmp_path)
    assert "class images of 'a photo of a dog'" in capsys.readouterr().err


def test_the_count_is_bounded(conv_base: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="prior images must be in \\[1, 10,000\\]"):
        prior.class_images(str(conv_base), "dog", 10_000_000, 16, 0, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())
