"""Edge cases of evaluation, the benchmark runner and the macro class: clear errors, exact semantics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from persres.benchmark import BenchmarkConfig, check_same_settings
from persres.categories import prompt_category
from persres.cc101 import load_dataset
from persres.errors import ConfigError, InputError, ModelError
from persres.evaluate import Scorers, preprocess, prompts_for
from persres.macro import load_nouns, suggest_classes
from persres.tiny import save_tiny_clip, save_tiny_dino, word_tokenizer
from persres.tokens import suggest_tokens


def make_dataset(root: Path, prompt_lines: str, data_dir: str = "./images/pet_dog") -> Path:
    (root / "images" / "pet_dog").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(root / "images" / "pet_dog" / "a.png")
    (root / "p.txt").write_text(prompt_lines)
    entry = {"class_prompt": "dog", "instance_data_dir": data_dir, "prompt_filename": "p.txt"}
    (root / "dataset.json").write_text(json.dumps([entry]))
    return root


def test_prompt_files_written_with_the_modifier_token(tmp_path: Path) -> None:
    entry = load_dataset(make_dataset(tmp_path, "<new1> dog swimming in a pool\na photo of {}\n"))[0]
    assert entry.prompts == ("V* dog swimming in a pool", "a photo of V* dog")
    assert entry.prompts_with("beagle") == ("V* beagle swimming in a pool", "a photo of V* beagle")
    (tmp_path / "p.txt").write_text("a dog without the concept\n")
    with pytest.raises(InputError, match="needs a \\{\\} or <new1>"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("data_dir", [".", "./", "images/\x00x"])
def test_odd_dataset_paths_are_refused(tmp_path: Path, data_dir: str) -> None:
    with pytest.raises(InputError, match="dataset folder itself|NUL"):
        load_dataset(make_dataset(tmp_path, "{}\n", data_dir))


def test_non_utf8_prompt_files_are_named(tmp_path: Path) -> None:
    make_dataset(tmp_path, "{}\n")
    (tmp_path / "p.txt").write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(InputError, match="p.txt is not UTF-8"):
        load_dataset(tmp_path)


def test_multi_word_class_words_do_not_decide_the_category() -> None:
    assert prompt_category("photo of a V* kids table chair.", "kids table chair") == "identity"
    assert prompt_category("a photo of V* wine glass", "wine glass") == "identity"
    assert prompt_category("V* wine glass on the beach", "wine glass") == "change_background"


def test_benchmark_settings_are_fixed_per_output_folder(tmp_path: Path) -> None:
    config = BenchmarkConfig(dataset="d", base="b", out=str(tmp_path), samplers=("lag", "lag", "normal"))
    assert config.samplers == ("lag", "normal")  # a repeated flag counts once
    check_same_settings(tmp_path, config)
    check_same_settings(tmp_path, config)  # the same settings resume
    with pytest.raises(ConfigError, match="other settings \\(images_per_prompt\\)"):
        check_same_settings(tmp_path, replace(config, images_per_prompt=2))
    with pytest.raises(ConfigError, match="--max-prompts must be >= 1"):
        BenchmarkConfig(dataset="d", base="b", out="o", max_prompts=0)


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
    with pytest.raises(ModelError, match="--dino .* is not a ViTModel checkpoint"):
        Scorers.load(str(clip), str(clip), "cpu")
    with pytest.raises(ModelError, match="--clip .* is not a CLIPTextModel checkpoint"):
        Scorers.load(str(dino), None, "cpu")


def test_broken_sidecars_are_named(tmp_path: Path) -> None:
    image = tmp_path / "0000-x-normal.png"
    Image.new("RGB", (4, 4)).save(image)
    for content in ("{not json", "[1, 2]", '{"prompt": null}', '{"prompt": "a", "concepts": "sks"}'):
        image.with_suffix(".json").write_text(content)
        with pytest.raises(InputError, match="sidecar .*0000-x-normal.json"):
            prompts_for([image], None, None)


def test_noun_cache_is_per_model_and_survives_damage(
    tmp_path: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))
    (tmp_path / "nouns.txt").write_text("dog\ncat\ncup\n")
    nouns = load_nouns(tmp_path / "nouns.txt")
    first = Scorers.load(str(save_tiny_clip(tmp_path / "a", seed=0)), None, "cpu")
    second = Scorers.load(str(save_tiny_clip(tmp_path / "b", seed=1)), None, "cpu")
    a = suggest_classes(first, photos, 3, nouns=nouns, progress=False)
    suggest_classes(second, photos, 3, nouns=nouns, progress=False)
    cached = sorted((tmp_path / "cache" / "nouns").glob("*.safetensors"))
    assert len(cached) == 2  # another model, another cache entry
    for path in cached:
        path.write_bytes(b"damaged")
    assert suggest_classes(first, photos, 3, nouns=nouns, progress=False) == a  # recomputed, same ranking
    with pytest.raises(ConfigError, match="--margin"):
        suggest_classes(first, photos, 3, "balanced", margin=-1, nouns=nouns, progress=False)


def test_suggest_token_count_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--top must be >= 1"):
        suggest_tokens(word_tokenizer(["sks"]), set(), count=0)
