"""Macro class and identifier choice: WordNet ranking, cache, strategies, --class-word auto, tokens."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import drop_model_max_length
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPModel

from persres import read_residual_file
from persres.cli import main
from persres.errors import ConfigError
from persres.evaluation.evaluate import CLIP_MEAN, CLIP_STD, Scorers, preprocess
from persres.evaluation.macro import Suggestion, choose, noun_embeddings, suggest_classes
from persres.testing.tiny import save_tiny_clip
from persres.words import load_nouns, real_words

NOUNS = ["dog", "cat", "cup", "car", "chair", "beach", "snow", "forest", "city", "ball", "studio", "grass"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def noun_file(tmp_path: Path) -> Path:
    path = tmp_path / "nouns.txt"
    path.write_text("\n".join(NOUNS) + "\n")
    return path


def test_the_shipped_wordnet_table() -> None:
    nouns = load_nouns()
    assert len(nouns) == 117_798
    by_lemma = {n.lemma: n for n in nouns}
    assert by_lemma["entity"].depth == 0 and by_lemma["dog"].depth < by_lemma["beagle"].depth
    assert "physical entity" in by_lemma  # multi-word lemmas with spaces
    words = real_words()
    assert {"dog", "run", "quickly", "the"} <= words and "sks" not in words


def test_ranking_equals_brute_force(clip: Path, photos: Path, noun_file: Path) -> None:
    scorers = Scorers.load(str(clip), None, "cpu")
    found = suggest_classes(scorers, photos, top=5, nouns=load_nouns(noun_file), progress=False)
    model = CLIPModel.from_pretrained(clip).eval()

    images = [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=preprocess(images, 224, 224, CLIP_MEAN, CLIP_STD))
        image_emb = getattr(image_out, "pooler_output", image_out).numpy()
        tokens = scorers.tokenizer(
            [f"a photo of a {n}." for n in NOUNS],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        )
        text_out = model.get_text_features(input_ids=tokens.input_ids)
        text_emb = getattr(text_out, "pooler_output", text_out).numpy()
    mean = (image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)).mean(0)
    mean /= np.linalg.norm(mean)
    cosines = text_emb @ mean / np.linalg.norm(text_emb, axis=1)
    order = np.argsort(-cosines)[:5]
    assert [s.noun for s in found] == [NOUNS[i] for i in order]
    assert [s.score for s in found] == pytest.approx([float(cosines[i]) for i in order], abs=1e-5)


def test_second_call_hits_the_cache(
    clip: Path, photos: Path, noun_file: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorers = Scorers.load(str(clip), None, "cpu")
    first = suggest_classes(scorers, photos, top=5, nouns=load_nouns(noun_file), progress=False)
    cached = list(own_cache.glob("nouns/*.safetensors"))
    assert len(cached) == 1
    monkeypatch.setattr(Scorers, "clip_texts", lambda *a, **k: pytest.fail("text embeddings recomputed"))
    again = suggest_classes(
        Scorers.load(str(clip), None, "cpu"), photos, top=5, nouns=load_nouns(noun_file), progress=False
    )
    assert again == first


def test_balanced_takes_the_most_general_noun_within_the_margin() -> None:
    ranked = [
        Suggestion("beagle", 0.300, 11, 0),
        Suggestion("hound", 0.296, 10, 1),
        Suggestion("dog", 0.295, 8, 5),
        Suggestion("animal", 0.270, 6, 9),
    ]
    assert choose(ranked, "nearest").noun == "beagle"
    assert choose(ranked, "balanced", margin=0.01).noun == "dog"  # animal is too far
    assert choose(ranked, "balanced", margin=0.001).noun == "beagle"
    assert choose(ranked, "balanced", margin=0.05).noun == "animal"


def test_suggest_class_cli_json(
    clip: Path, photos: Path, noun_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "suggest-class",
        "--images",
        str(photos),
        "--clip",
        str(clip),
        "--nouns",
        str(noun_file),
        "--top",
        "3",
        "--json",
        "--device",
        "cpu",
        "--strategy",
        "balanced",
    ]
    assert main(argv) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 3 and all({"noun", "score"} <= set(item) for item in listed)
    assert {item["noun"] for item in listed} <= set(NOUNS)


def test_class_word_auto_end_to_end(
    conv_base: Path, clip: Path, photos: Path, noun_file: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = ["train", "--base", str(conv_base), "--images", str(photos), "--out", str(run)]
    argv += ["--class-word", "auto", "--clip", str(clip), "--nouns", str(noun_file)]
    argv += ["--steps", "1", "--batch-size", "1", "--resolution", "16", "--device", "cpu"]
    assert main(argv) == 0
    metadata = read_residual_file(run / "residuals.safetensors").metadata
    scorers = Scorers.load(str(clip), None, "cpu")
    best = suggest_classes(scorers, photos, top=1, nouns=load_nouns(noun_file), progress=False)[0]
    assert metadata["class_word"] == best.noun
    assert metadata["class_word_reason"].startswith(
        f"--class-word auto: noun from {noun_file} chosen by nearest"
    )
    assert json.loads((run / "config.json").read_text())["class_word"] == metadata["class_word"]




def test_decompression_bomb_is_refused_by_suggest_class(
    clip: Path,
    noun_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "photos" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 400 pixels: PIL only warns
    argv = [
        "suggest-class",
        "--images",
        str(tmp_path / "photos"),
        "--clip",
        str(clip),
        "--nouns",
        str(noun_file),
    ]
    assert main([*argv, "--device", "cpu"]) == 2
    assert "bomb.png has 400 pixels, above the decompression-bomb limit of 300" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"dog\ncaf\xe9\n", "is not UTF-8 text"),  # a Latin-1 file
        (b"dog\t3\t5\ncat\tdeep\t1\n", "line 2: 'cat\\tdeep\\t1' must be 'noun' or"),
        (b"dog\t-4\t1\n", "line 1"),
        (b"dog\t1\t2\t3\n", "line 1"),
        (b"\n  \n", "holds no noun"),
    ],
)
def test_bad_noun_lists_are_named(
    clip: Path, photos: Path, tmp_path: Path, content: bytes, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    nouns = tmp_path / "nouns.txt"
    nouns.write_bytes(content)
    argv = ["suggest-class", "--images", str(photos), "--clip", str(clip), "--nouns", str(nouns)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"noun list {nouns}" in err and problem in err


def damage(path: Path, kind: str) -> None:
    good = load_file(str(path))["embeddings"]
    bad = {
        "dtype": good.half(),
        "width": torch.nn.functional.normalize(torch.randn(good.shape[0], good.shape[1] + 1), dim=-1),
        "flat": good.flatten(),
        "nan": good.clone().fill_(float("nan")),
        "norm": good * 3,
        "key": None,
    }[kind]
    save_file({"other": good} if bad is None else {"embeddings": bad.contiguous()}, str(path))


@pytest.mark.parametrize("kind", ["dtype", "width", "flat", "nan", "norm", "key"])
def test_a_damaged_noun_cache_is_recomputed(
    clip: Path,
    photos: Path,
    noun_file: Path,
    own_cache: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    scorers = Scorers.load(str(clip), None, "cpu")
    first = suggest_classes(scorers, photos, top=5, nouns=load_nouns(noun_file), progress=False)
    (cached,) = own_cache.glob("nouns/*.safetensors")
    damage(cached, kind)
    with caplog.at_level(logging.WARNING, logger="persres"):
        again = suggest_classes(scorers, photos, top=5, nouns=load_nouns(noun_file), progress=False)
    assert [s.noun for s in again] == [s.noun for s in first]
    assert [s.score for s in again] == pytest.approx([s.score for s in first], abs=1e-6)
    assert f"noun embedding cache {cached} is damaged" in caplog.text
    assert load_file(str(cached))["embeddings"].shape == (len(NOUNS), 16)  # rewritten whole


def test_an_unwritable_noun_cache_only_warns(
    clip: Path,
    photos: Path,
    noun_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "a-file"))
    with caplog.at_level(logging.WARNING, logger="persres"):
        found = suggest_classes(
            Scorers.load(str(clip), None, "cpu"), photos, 3, nouns=load_nouns(noun_file), progress=False
        )
    assert len(found) == 3 and "cannot write the noun embedding cache" in caplog.text


def test_noun_cache_key_covers_the_tokenizer(
    clip: Path, photos: Path, noun_file: Path, tmp_path: Path, own_cache: Path
) -> None:
    """Same text weights, another vocabulary (two words' ids swapped): other token ids, other embeddings."""
    other = tmp_path / "clip-other-vocab"
    shutil.copytree(clip, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["dog</w>"], vocab["cat</w>"] = vocab["cat</w>"], vocab["dog</w>"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    first, second = Scorers.load(str(clip), None, "cpu"), Scorers.load(str(other), None, "cpu")
    assert first.tokenizer("dog").input_ids != second.tokenizer("dog").input_ids
    nouns = [n.lemma for n in load_nouns(noun_file)]
    noun_embeddings(first, nouns, progress=False)
    from_second = noun_embeddings(second, nouns, progress=False)
    assert len(list(own_cache.glob("nouns/*.safetensors"))) == 2
    fresh = noun_embeddings(second, nouns, cache=tmp_path / "fresh-cache", progress=False)
    assert torch.equal(from_second, fresh)
    noun_embeddings(first, nouns, progress=False)  # a tokenizer that has been used keeps its key
    assert len(list(own_cache.glob("nouns/*.safetensors"))) == 2


def test_suggest_class_with_a_clip_tokenizer_without_model_max_length(
    clip: Path,
    photos: Path,
    noun_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loose = drop_model_max_length(save_tiny_clip(tmp_path / "clip"))  # the same weights as ``clip``
    argv = ["suggest-class", "--images", str(photos), "--nouns", str(noun_file), "--json", "--device", "cpu"]
    assert main([*argv, "--clip", str(loose)]) == 0
    found = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("PERSRES_CACHE", str(tmp_path / "other-cache"))  # embed the nouns again
    assert main([*argv, "--clip", str(clip)]) == 0
    assert found == json.loads(capsys.readouterr().out)


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
    with pytest.raises(ConfigError, match="`margin`"):
        suggest_classes(first, photos, 3, "balanced", margin=-1, nouns=nouns, progress=False)
