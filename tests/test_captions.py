"""Caption files beside the photos (`captions`): read, placeholder replaced, odd files refused by name,
never taken for photos; a run with captions trains each image on its own prompt."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, train_argv

from persres import read_residual_file
from persres.backbones.unet import SD
from persres.cli import main
from persres.core.conditioning import encode
from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError, InputError
from persres.training.batches import Drawn, TrainingData, batch_conditioning
from persres.training.captions import MAX_CAPTION_BYTES, read_captions
from persres.training.data import ConceptImages, list_images
from persres.training.train import train


@pytest.fixture
def folder(photos: Path, tmp_path: Path) -> Path:
    """The three photos (photo0-2.png), copied where captions can be written beside them."""
    return Path(shutil.copytree(photos, tmp_path / "photos"))


def caption(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / f"{name}.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def read(folder: Path, identifier: str = "sks") -> list[str | None]:
    return read_captions(list_images(folder, captions=True), identifier, "dog")


def test_captions_are_read_with_the_identifier_in_place_of_the_placeholder(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caption(folder, "photo0", "a photo of a V* dog on the grass\n")
    caption(folder, "photo1", "\ufeff[trigger] dog playing in the snow")  # ai-toolkit's, with a BOM
    assert list_images(folder, captions=True) == [folder / f"photo{i}.png" for i in range(3)]
    assert read(folder) == ["a photo of a sks dog on the grass", "sks dog playing in the snow", None]
    expected = ["a photo of a <sks> dog on the grass", "<sks> dog playing in the snow"]
    assert read(folder, "<sks>")[:2] == expected
    caption(folder, "photo2", "sks cat, at the beach")  # kohya's: the identifier written out; no class word
    with caplog.at_level(logging.WARNING):
        assert read(folder)[2] == "sks cat, at the beach"
    assert "1 of 3 captions do not say the class word 'dog' (photo2.txt)" in caplog.text


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"", "is empty; write a caption with V*"),
        (b" \n\t\n", "is empty"),
        (b"a V* dog\xff\xfe", r"is not UTF-8 text \(invalid start byte at byte 8\); save it as UTF-8"),
        (b"a V* dog\x00", "holds NUL bytes"),
        (b"a V* dog\na V* dog in the snow", "holds 2 lines; a caption is one line"),
        (b"a photo of a dog", "does not name the concept: write V\\* \\(or \\[trigger\\]\\)"),
        (b"a photo of a SKS dog", "does not name the concept"),  # the identifier in its own case
        (b"a V2* dog", "uses V2\\*, but a run learns one concept"),
        (b"a V* dog " + b"x" * MAX_CAPTION_BYTES, f"bytes, above {MAX_CAPTION_BYTES:,}"),
    ],
)
def test_odd_captions_are_refused_naming_the_file(folder: Path, text: bytes, error: str) -> None:
    path = caption(folder, "photo1", text)
    with pytest.raises(InputError, match=error) as caught:
        read(folder)
    assert str(path) in str(caught.value) and len(str(caught.value)) < 400


def test_caption_files_are_never_photos(folder: Path) -> None:
    caption(folder, "photo0", "a V* dog")
    with pytest.raises(InputError, match=r"not images: \['photo0.txt'\].*read with `captions`"):
        list_images(folder)  # without captions, as before (with a hint)
    caption(folder, "notes", "a V* dog")
    with pytest.raises(InputError, match="caption notes.txt but no photo named notes"):
        list_images(folder, captions=True)
    (folder / "notes.txt").unlink()
    shutil.copy(folder / "photo0.png", folder / "photo0.jpg")
    with pytest.raises(InputError, match="photo0.jpg and photo0.png would share the caption photo0.txt"):
        list_images(folder, captions=True)
    (folder / "photo0.txt").unlink()
    assert len(list_images(folder, captions=True)) == 4  # without a caption, two photos of one name are fine


def test_a_batch_is_conditioned_on_each_image_s_own_prompt(conv_base: Path, photos: Path) -> None:
    pipe = load_pipeline(str(conv_base))
    device = torch.device("cpu")
    prompts = ("a photo of a sks dog", "sks dog on the grass", "a photo of a sks dog")
    drawn = Drawn(torch.zeros(3, 3, 16, 16), prompts)
    asked: list[str] = []

    def encoded(prompt: str) -> object:
        asked.append(prompt)
        return encode(pipe, prompt, device, 16)

    joined = batch_conditioning(drawn, encoded, SD)
    assert asked == list(prompts[:2])  # each distinct prompt once
    for row, prompt in enumerate(prompts):
        assert torch.equal(joined.hidden[row], encode(pipe, prompt, device, 16).hidden[0])
    images = ConceptImages.from_folder(photos, 16)
    data = TrainingData.of(images, "the prompt", ["one", None, "three"], None)
    first = data.draw(8, torch.Generator().manual_seed(3), 0.85, True)
    pixels, picks = images.draw(8, torch.Generator().manual_seed(3), 0.85, True)
    assert torch.equal(first.pixels, pixels)  # without buckets, the square path's very draws
    assert first.prompts == tuple(["one", "the prompt", "three"][i] for i in picks)


def test_captions_on_without_caption_files_train_exactly_as_without(
    conv_base: Path, photos: Path, tmp_path: Path
) -> None:
    plain = train(tiny_config(conv_base, photos, steps=2), tmp_path / "plain", progress=False)
    on = train(tiny_config(conv_base, photos, steps=2, captions=True), tmp_path / "on", progress=False)
    expected, got = read_residual_file(plain.residuals).tensors, read_residual_file(on.residuals).tensors
    assert all(torch.equal(got[key], value) for key, value in expected.items())
    assert json.loads((tmp_path / "on" / "config.json").read_text())["captions"] is True


def test_captions_change_the_training(conv_base: Path, folder: Path, tmp_path: Path) -> None:
    plain = train(tiny_config(conv_base, folder, steps=2, captions=True), tmp_path / "a", progress=False)
    caption(folder, "photo0", "sks dog playing on the beach")
    captioned = train(tiny_config(conv_base, folder, steps=2, captions=True), tmp_path / "b", progress=False)
    expected = read_residual_file(plain.residuals).tensors
    got = read_residual_file(captioned.residuals).tensors
    assert any(not torch.equal(got[key], value) for key, value in expected.items())


def test_a_caption_whose_identifier_is_cut_off_is_refused_before_the_run(
    conv_base: Path, folder: Path, tmp_path: Path
) -> None:
    caption(folder, "photo2", "a photo of a " + "red " * 80 + "V* dog")
    with pytest.raises(ConfigError, match="caption of photo2.png: prompt .* falls past the text encoder"):
        train(tiny_config(conv_base, folder, captions=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_command_line_turns_captions_and_buckets_on(
    conv_base: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caption(folder, "photo1", "a V* dog on the grass")
    assert main(train_argv(conv_base, folder, tmp_path / "run", "--captions", "--buckets")) == 0
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (written["captions"], written["buckets"]) == (True, True)
    caption(folder, "photo2", "")
    assert main(train_argv(conv_base, folder, tmp_path / "other", "--captions")) == 2
    assert "photo2.txt is empty" in capsys.readouterr().err


def test_a_learned_token_trains_through_each_caption(
    conv_base: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Textual inversion's identifier is <sks>; its captions are encoded with gradients every step."""
    caption(folder, "photo0", "[trigger] dog on the grass")
    encoded: list[str] = []
    import persres.training.train as loop

    real = loop.encode

    def spy(pipe: object, prompt: str, *args: object) -> object:
        encoded.append(prompt)
        return real(pipe, prompt, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "encode", spy)
    config = tiny_config(conv_base, folder, method="textual-inversion", steps=3, captions=True, lr=1e-3)
    result = train(config, tmp_path / "run", progress=False)
    assert result.final_loss is not None
    assert "<sks> dog on the grass" in encoded  # re-encoded in the steps (no cache for a trained text side)
    assert set(encoded) == {"<sks> dog on the grass", "a photo of a <sks> dog"}
