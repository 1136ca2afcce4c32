"""Which tokens carry a prompt: the text encoders the denoiser attends to (``prompt_readers``: SD's CLIP,
SDXL's two CLIPs, Flux's T5, not its pooled CLIP). On a tiny Flux base a prompt longer than CLIP's 77
tokens but within T5's 512 is sampled (LAG finds V* at its T5 position) and trained on (a validation
prompt, a caption); one whose identifier T5 would cut is refused naming T5; the identifier is checked
with T5's tokenizer."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import tiny_config

from persres.cli import main
from persres.config import ResidualConfig, SampleSettings
from persres.core.pipeline import load_pipeline, load_prompt_readers, prompt_readers
from persres.core.residuals import add_residuals
from persres.core.tokens import PromptReader, check_identifier_read, suggest_tokens
from persres.errors import ConfigError
from persres.formats.concepts import Concept, plan_prompts
from persres.inference.sampling import prompt_columns, sample
from persres.testing.tiny import t5_word_tokenizer, word_tokenizer
from persres.training.train import train

CONCEPT = Concept("sks", "dog")
LONG = "a photo of a " + "red " * 100 + "V* dog"  # 108 CLIP tokens, 107 T5 tokens; V* at 105 / 104
TOO_LONG = "a photo of a " + "red " * 600 + "V* dog"  # V* past T5's 512


def names_and_limits(readers: list[PromptReader]) -> list[tuple[str, int]]:
    return [(reader.name, reader.limit) for reader in readers]


def test_the_prompt_is_read_by_t5_on_flux_and_by_clip_on_stable_diffusion(
    flux_base: Path, linear_base: Path, xl_base: Path
) -> None:
    """Loaded and read from the folder without weights (the benchmark's check) alike."""
    flux = [("T5EncoderModel", 512)]
    assert names_and_limits(prompt_readers(load_pipeline(str(flux_base)))) == flux
    assert names_and_limits(load_prompt_readers(str(flux_base))) == flux
    assert names_and_limits(load_prompt_readers(str(linear_base))) == [("CLIPTextModel", 77)]
    xl = names_and_limits(load_prompt_readers(str(xl_base)))
    assert xl == [("CLIPTextModel", 77), ("CLIPTextModelWithProjection", 77)]


def test_a_flux_prompt_past_clips_77_tokens_samples_with_v_star_at_its_t5_position(
    flux_base: Path, linear_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipe = load_pipeline(str(flux_base))
    add_residuals(pipe.transformer, ResidualConfig(rank=2))  # LAG needs residuals to place
    [plan] = plan_prompts([LONG], [CONCEPT])
    clip_ids = pipe.tokenizer(plan.expanded, verbose=False).input_ids
    t5_ids = pipe.tokenizer_2(plan.expanded).input_ids
    assert len(clip_ids) == 108 and len(t5_ids) == 107
    columns = prompt_columns(prompt_readers(pipe), plan, [CONCEPT], require=True)  # (1, 512)
    sks, dog = pipe.tokenizer_2.convert_tokens_to_ids(["\u2581sks", "\u2581dog"])
    assert columns.shape == (1, 512) and columns[0].nonzero().flatten().tolist() == [104, 105]
    assert [t5_ids[104], t5_ids[105]] == [sks, dog]
    settings = SampleSettings(steps=1, height=16, width=16)
    with caplog.at_level(logging.WARNING):
        [normal, lag] = sample(pipe, [LONG], [CONCEPT], settings, "both", progress=False)
    assert normal.image.size == lag.image.size == (16, 16)
    assert "cut off" not in caplog.text and "truncated" not in caplog.text  # CLIP's pooled cut is normal
    assert "sequence length is longer" not in caplog.text
    sd = load_pipeline(str(linear_base))  # the same prompt on CLIP's 77 tokens loses V*
    with pytest.raises(ConfigError, match=r"text encoder's limit of 77 tokens \(CLIPTextModel\)"):
        sample(sd, [LONG], [CONCEPT], settings, progress=False)


def test_a_flux_prompt_whose_identifier_t5_cuts_is_refused_naming_t5(flux_base: Path) -> None:
    pipe = load_pipeline(str(flux_base))
    with pytest.raises(ConfigError) as refused:
        sample(pipe, [TOO_LONG], [CONCEPT], SampleSettings(steps=1, height=16, width=16), progress=False)
    message = str(refused.value)
    assert "is 607 tokens and its identifier V* ('sks') falls past the text encoder's limit of 512" in message
    assert "(T5EncoderModel)" in message and "shorten the prompt or move V* nearer its start" in message


def test_training_on_flux_takes_a_long_validation_prompt_and_caption_and_refuses_one_t5_cuts(
    flux_base: Path, photos: Path, tmp_path: Path
) -> None:
    config = tiny_config(flux_base, photos, steps=1, batch_size=1, validation_prompts=(LONG,))
    result = train(config, tmp_path / "long", device="cpu", progress=False)
    captions = replace(config, images=str(tmp_path / "captioned"), captions=True)
    assert result.steps == 1 and len(list((tmp_path / "long" / "validation").glob("step-*/*.png"))) == 2
    captioned = tmp_path / "captioned"
    shutil.copytree(photos, captioned)
    [first, *_] = sorted(captioned.glob("*.png"))
    first.with_suffix(".txt").write_text(LONG)
    train(captions, tmp_path / "caption", device="cpu", progress=False)
    first.with_suffix(".txt").write_text(TOO_LONG)
    with pytest.raises(ConfigError, match=rf"caption of {first.name}: .* 512 tokens \(T5EncoderModel\)"):
        train(captions, tmp_path / "cut", device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"limit of 512 tokens \(T5EncoderModel\)"):
        train(replace(config, validation_prompts=(TOO_LONG,)), tmp_path / "cut2", device="cpu")
    assert not (tmp_path / "cut").exists() and not (tmp_path / "cut2").exists()


def test_the_identifier_is_checked_with_each_prompt_tokenizer_once_per_split(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One CLIP token but four T5 pieces: warned of naming T5's tokenizer; the same split twice (SDXL's
    two CLIP tokenizers) once."""
    clip = PromptReader(word_tokenizer(["zwx", "dog"]), 77, "CLIPTextModel")
    t5 = PromptReader(t5_word_tokenizer(["dog"]), 512, "T5EncoderModel")
    with caplog.at_level(logging.WARNING):
        check_identifier_read([t5], "zwx", set())
    assert caplog.text.count("identifier 'zwx' is") == 1 and "for T5EncoderModel's tokenizer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_identifier_read([clip, clip], "zwx", set())
        check_identifier_read([clip, replace(clip, name="CLIPTextModelWithProjection")], "dog", {"dog"})
    assert "is 1 tokens" not in caplog.text and "tokens (" not in caplog.text
    assert caplog.text.count("'dog' is a common English word") == 1


def test_suggested_identifiers_are_one_token_for_every_tokenizer_that_carries_the_prompt(
    flux_base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLIP's rarest whole words (its BPE order) that T5 also reads as one token: on Flux T5 carries V*."""
    clip = word_tokenizer(["sks", "zwx", "qqq", "dog"])
    assert suggest_tokens(clip, {"dog"}, count=5) == ["zwx", "sks", "qqq"]
    assert suggest_tokens(clip, {"dog"}, count=5, readers=[t5_word_tokenizer(["sks", "dog"])]) == ["sks"]
    assert main(["suggest-token", "--base", str(flux_base), "--top", "2"]) == 0
    suggested = capsys.readouterr().out.split()
    t5 = load_prompt_readers(str(flux_base))[0].tokenizer
    assert len(suggested) == 2 and all(len(t5.tokenize(word)) == 1 for word in suggested)


def test_suggest_token_says_so_when_no_rare_word_is_one_token_for_t5(
    flux_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "flux"
    shutil.copytree(flux_base, base)
    shutil.rmtree(base / "tokenizer_2")
    t5_word_tokenizer(["a", "photo", "of", "dog"]).save_pretrained(base / "tokenizer_2")  # no rare word whole
    assert main(["suggest-token", "--base", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no rare word of 3-4 letters is one token for every tokenizer of" in err
    assert len(err.splitlines()) == 1 and "--token" in err
