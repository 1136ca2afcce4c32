"""Metrics against an independent computation with tiny random CLIP and ViT models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import drop_model_max_length
from PIL import Image
from transformers import CLIPModel, ViTModel

from persres.cli import main
from persres.errors import ConfigError, InputError, ModelError
from persres.evaluation.evaluate import (
    CLIP_MEAN,
    CLIP_STD,
    Scorers,
    evaluate_folder,
    preprocess,
    prompts_for,
    strip_identifier,
)
from persres.testing.tiny import save_tiny_clip, save_tiny_dino


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scorers")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def scorers(models: tuple[Path, Path]) -> Scorers:
    return Scorers.load(str(models[0]), str(models[1]), "cpu")


def draw(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> Path:
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = colour
    array[size[1] // 4 :, : size[0] // 2] = (255 - colour[0], colour[2], colour[1])
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    generated, references = tmp_path / "gen", tmp_path / "refs"
    generated.mkdir()
    references.mkdir()
    prompts = ["a photo of a V* dog on the beach", "a painting of a V* dog", "a V* dog in the snow"]
    for i, prompt in enumerate(prompts):
        draw(generated / f"{i:04d}-x-normal.png", (40 * i, 200, 90))
        (generated / f"{i:04d}-x-normal.json").write_text(json.dumps({"prompt": prompt, "token": "sks"}))
    draw(generated / "0000-x-both.png", (0, 0, 0))  # a grid: must be ignored
    for i in range(2):
        draw(references / f"ref{i}.jpg", (200, 30 * i, 10), size=(50, 70))
    return generated, references


def test_identifier_is_removed_from_prompts() -> None:
    assert strip_identifier("a photo of a V* dog on the beach") == "a photo of a dog on the beach"
    assert strip_identifier("a V1* dog playing with a V2* cat") == "a dog playing with a cat"
    assert strip_identifier("photo of a <new1> barn") == "photo of a barn"
    assert strip_identifier("a sks dog near sksx", token="sks") == "a dog near sksx"


def test_preprocessing_resizes_the_shorter_side_and_crops_the_centre() -> None:
    array = np.zeros((200, 300, 3), np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:200] = (0, 255, 0)
    array[:, 200:] = (0, 0, 255)
    pixels = preprocess([Image.fromarray(array)], 224, 224, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (1, 3, 224, 224)
    back = pixels[0].permute(1, 2, 0).numpy() * np.array(CLIP_STD) + np.array(CLIP_MEAN)  # (224, 224, 3)
    # 300x200 -> 336x224, centre crop keeps columns 56..279: red 56..111, green 112..223, blue 224..279
    assert np.allclose(back[100, 10], [1, 0, 0], atol=0.02)
    assert np.allclose(back[100, 112], [0, 1, 0], atol=0.02)
    assert np.allclose(back[100, 214], [0, 0, 1], atol=0.02)


def test_scores_equal_an_independent_computation(
    scorers: Scorers, models: tuple[Path, Path], folders: tuple[Path, Path]
) -> None:
    generated, references = folders
    result = evaluate_folder(generated, references, scorers=scorers)
    assert result["num_images"] == 3 and result["num_references"] == 2
    assert [r["text"] for r in result["images"]] == [
        "a photo of a dog on the beach",
        "a painting of a dog",
        "a dog in the snow",
    ]

    clip = CLIPModel.from_pretrained(models[0]).eval()
    dino = ViTModel.from_pretrained(models[1], add_pooling_layer=False).eval()
    gen_images = [Image.open(generated / f"{i:04d}-x-normal.png") for i in range(3)]
    ref_images = [Image.open(references / f"ref{i}.jpg") for i in range(2)]
    with torch.no_grad():
        clip_pixels = preprocess(gen_images + ref_images, 224, 224, CLIP_MEAN, CLIP_STD)
        image_emb = clip.get_image_features(pixel_values=clip_pixels)
        image_emb = (image_emb.pooler_output if hasattr(image_emb, "pooler_output") else image_emb).numpy()
        tokens = scorers.tokenizer(
            [r["text"] for r in result["images"]],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        )
        text_emb = clip.get_text_features(input_ids=tokens.input_ids)
        text_emb = (text_emb.pooler_output if hasattr(text_emb, "pooler_output") else text_emb).numpy()
        dino_pixels = preprocess(
            gen_images + ref_images, 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        )
        dino_emb = dino(pixel_values=dino_pixels).last_hidden_state[:, 0].numpy()

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    for i, row in enumerate(result["images"]):
        assert row["clip_t"] == pytest.approx(2.5 * max(cos(image_emb[i], text_emb[i]), 0.0), abs=1e-5)
        assert row["clip_i"] == pytest.approx(
            np.mean([cos(image_emb[i], image_emb[3 + r]) for r in range(2)]), abs=1e-5
        )
        assert row["dino_i"] == pytest.approx(
            np.mean([cos(dino_emb[i], dino_emb[3 + r]) for r in range(2)]), abs=1e-5
        )
    all_pairs = np.mean([cos(image_emb[g], image_emb[3 + r]) for g in range(3) for r in range(2)])
    assert result["clip_i"] == pytest.approx(all_pairs, abs=1e-5)
    assert result["clip_t"] == pytest.approx(np.mean([r["clip_t"] for r in result["images"]]), abs=1e-6)


def test_text_alignment_is_clamped_at_zero(scorers: Scorers) -> None:
    from persres.evaluation.evaluate import text_alignment

    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    b = torch.nn.functional.normalize(torch.tensor([[-1.0, 0.2], [1.0, 1.0]]), dim=-1)
    assert text_alignment(a, b).tolist() == pytest.approx([0.0, 2.5 / np.sqrt(2)])


def test_images_without_sidecars_need_a_prompt(scorers: Scorers, tmp_path: Path) -> None:
    (tmp_path / "gen").mkdir()
    (tmp_path / "refs").mkdir()
    draw(tmp_path / "gen" / "a.png", (10, 20, 30))
    draw(tmp_path / "refs" / "r.png", (10, 20, 30))
    with pytest.raises(ConfigError, match="has no JSON sidecar"):
        evaluate_folder(tmp_path / "gen", tmp_path / "refs", scorers=scorers)
    result = evaluate_folder(
        tmp_path / "gen", tmp_path / "refs", prompt="a photo of a sks dog", token="sks", scorers=scorers
    )
    assert result["images"][0]["text"] == "a photo of a dog"
    assert result["clip_i"] == pytest.approx(1.0, abs=1e-5)  # identical images
    assert result["dino_i"] == pytest.approx(1.0, abs=1e-5)


def test_cli_writes_json_and_refuses_to_overwrite(
    models: tuple[Path, Path], folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    generated, references = folders
    out = tmp_path / "scores.json"
    argv = [
        "evaluate",
        "--images",
        str(generated),
        "--references",
        str(references),
        "--clip",
        str(models[0]),
        "--dino",
        str(models[1]),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    saved = json.loads(out.read_text())
    assert set(saved) >= {"clip_t", "clip_i", "dino_i", "images", "clip_model", "dino_model"}
    assert json.loads(capsys.readouterr().out)["clip_t"] == saved["clip_t"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv[:-2], "--references", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err


def test_decompression_bomb_is_refused(
    models: tuple[Path, Path],
    folders: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    generated, references = folders
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # the 64x48 images (3072 pixels) warn: refused too
    argv = ["evaluate", "--images", str(generated), "--references", str(references)]
    assert main([*argv, "--clip", str(models[0]), "--dino", str(models[1]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "0000-x-normal.png has 3,072 pixels, above the decompression-bomb limit of 2,000" in err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"prompt": "a V* dog", "token": 5}', "'token' must be str"),
        ('{"prompt": "a V* dog", "concepts": [{"token": 7}]}', "'concepts' must be objects"),
        ('{"prompt": 3}', "'prompt' must be str"),
        ("\xff\xfe{", "not valid JSON"),
    ],
)
def test_damaged_sidecars_are_named(
    models: tuple[Path, Path],
    folders: tuple[Path, Path],
    content: str,
    problem: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    generated, references = folders
    (generated / "0001-x-normal.json").write_bytes(content.encode("latin-1"))
    argv = ["evaluate", "--images", str(generated), "--references", str(references)]
    assert main([*argv, "--clip", str(models[0]), "--dino", str(models[1]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "0001-x-normal.json" in err and problem in err and "delete it" in err


def test_a_clip_tokenizer_without_model_max_length(
    scorers: Scorers,
    models: tuple[Path, Path],
    folders: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clip = drop_model_max_length(save_tiny_clip(tmp_path / "clip"))  # the same weights as models[0]
    loose = Scorers.load(str(clip), str(models[1]), "cpu")
    assert loose.tokenizer.model_max_length > 10**9
    texts = ["a photo of a dog", "a painting of a dog " * 30]  # 150 tokens: truncated at 77
    assert torch.equal(loose.clip_texts(texts), scorers.clip_texts(texts))
    generated, references = folders
    argv = ["evaluate", "--images", str(generated), "--references", str(references), "--clip", str(clip)]
    assert main([*argv, "--dino", str(models[1]), "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_folder(generated, references, scorers=scorers)
    assert printed["clip_t"] == expected["clip_t"] and printed["num_images"] == 3


def test_preprocessing_sizes_follow_torchvision() -> None:
    # torchvision: Resize(256) on 683x512 gives 341x256 (truncated); CenterCrop(224) starts at 58
    array = np.zeros((512, 683, 3), np.uint8)
    array[:, :300] = 255
    pixels = preprocess([Image.fromarray(array)], 256, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    column = pixels[0, 0, 100].numpy()  # one row of the crop
    edge = int(np.argmax(column < 0.5))  # first dark column of the crop
    assert abs(edge - (int(300 * 341 / 683) - 58)) <= 1


def test_scoring_models_of_another_architecture_are_refused(tmp_path: Path) -> None:
    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dino(tmp_path / "dino")
    with pytest.raises(ModelError, match="`dino` .* is not a ViTModel checkpoint"):
        Scorers.load(str(clip), str(clip), "cpu")
    with pytest.raises(ModelError, match="`clip` .* is not a CLIPTextModel checkpoint"):
        Scorers.load(str(dino), None, "cpu")


def test_broken_sidecars_are_named(tmp_path: Path) -> None:
    image = tmp_path / "0000-x-normal.png"
    Image.new("RGB", (4, 4)).save(image)
    for content in ("{not json", "[1, 2]", '{"prompt": null}', '{"prompt": "a", "concepts": "sks"}'):
        image.with_suffix(".json").write_text(content)
        with pytest.raises(InputError, match="sidecar .*0000-x-normal.json"):
            prompts_for([image], None, None)
