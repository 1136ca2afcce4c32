"""The toy world's generator, captions, prompts and scoring rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from persres.evaluation.categories import CATEGORIES
from persres.toyworld.model import MAX_TOKENS, toy_tokenizer
from persres.toyworld.prompts import Expectation, concept_prompts
from persres.toyworld.quality import border_change, check, means, paired_differences
from persres.toyworld.scenes import (
    CLASSES,
    COLOURS,
    HELD_OUT,
    PATTERNS,
    PLACES,
    Scene,
    caption,
    random_scene,
    render,
)


def test_rendering_is_deterministic_and_seed_dependent() -> None:
    scene = random_scene(np.random.default_rng(3))
    first, mask = render(scene)
    again, _ = render(scene)
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    other, _ = render(Scene(**{**scene.truth(), "seed": scene.seed + 1}))  # type: ignore[arg-type]
    assert not np.array_equal(first, other)
    assert mask.shape == (32, 32) and 0.1 < mask.mean() < 0.9


def test_held_out_instances_never_drawn_for_training() -> None:
    rng = np.random.default_rng(0)
    drawn = {random_scene(rng).instance for _ in range(3000)}
    assert not drawn & set(HELD_OUT)
    assert len(drawn) > 0.9 * (len(CLASSES) * len(COLOURS) * len(PATTERNS) - len(HELD_OUT))


def test_object_colour_and_pattern_show_in_the_mask() -> None:
    scene = Scene("car", "blue", "solid", "snow", size=0.9, x=0.5, y=0.5)
    image, mask = render(scene)
    inside = image[mask > 0.99].astype(float)
    blue = np.array(COLOURS["blue"], float)
    assert np.median(np.abs(inside - blue).sum(1)) < 60  # mostly the instance colour (wheels are black)
    striped, _ = render(Scene("car", "blue", "striped", "snow", size=0.9, x=0.5, y=0.5))
    white = lambda im: (im[mask > 0.99].min(1) > 200).mean()  # noqa: E731
    assert white(image) < 0.02 and white(striped) > 0.25  # the pattern's white ink on blue


def test_every_caption_word_is_one_token_and_fits() -> None:
    tokenizer = toy_tokenizer()
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng)
        text = caption(scene)
        assert len(tokenizer.tokenize(text)) == len(text.split())
        assert len(tokenizer(text).input_ids) <= MAX_TOKENS


def test_captions_only_say_what_is_true() -> None:
    rng = np.random.default_rng(2)
    for _ in range(300):
        scene = random_scene(rng)
        text = caption(scene, rng)
        words = set(text.split())
        assert scene.cls in words
        assert not (words & set(COLOURS)) - {scene.colour}
        assert not (words & set(PATTERNS)) - {scene.pattern}
        for place, phrase in PLACES.items():
            if phrase in text:
                assert place == scene.background
        if "with" in words:
            assert scene.second is not None and text.endswith(scene.second)


def test_prompts_cover_the_six_kinds_with_their_truth() -> None:
    prompts = concept_prompts(("dog", "red", "striped"), per_kind=2)
    assert sorted({p.category for p in prompts}) == sorted(CATEGORIES)
    assert all(sum(p.category == c for p in prompts) == 2 for c in CATEGORIES)
    for i, instance in enumerate(HELD_OUT):  # twelve different prompts, whatever the offset
        assert len({p.text for p in concept_prompts(instance, per_kind=2, offset=i)}) == 12
    by_text = {p.text: p for p in prompts}
    recolour = next(p for p in prompts if p.category == "change_attribute")
    assert recolour.expect.asked_colour != "red" and "colour" not in recolour.expect.identity()
    sketch = by_text["a sketch of a V* dog"]
    assert sketch.expect.identity() == {"cls": "dog", "pattern": "striped"}
    styled = next(p for p in prompts if p.category == "object_in_style")
    assert styled.expect.cls != "dog" and styled.expect.identity()["colour"] == "red"
    assert by_text["a V* dog"].without_concept() == "a dog"


def test_check_scores_identity_and_asked_labels() -> None:
    expect = Expectation("dog", "red", "striped", background="beach")
    right = {"cls": "dog", "colour": "red", "pattern": "striped", "background": "beach"}
    assert check(right, expect)["identity"] == 1.0 and check(right, expect)["text"] == 1.0
    wrong_place = {**right, "background": "snow"}
    assert check(wrong_place, expect)["identity"] == 1.0 and check(wrong_place, expect)["text"] == 0.5
    assert check({**right, "pattern": "dotted"}, expect)["identity"] == 0.0


def test_border_change_reads_only_the_frame() -> None:
    a = np.zeros((32, 32, 3), np.uint8)
    b = a.copy()
    b[10:20, 10:20] = 255
    assert border_change(b, a) == 0.0
    b[0, :] = 255
    assert border_change(b, a) == pytest.approx(32 / (32 * 32 - 26 * 26))


def test_means_group_and_count() -> None:
    rows = [{"v": "a", "x": 1.0}, {"v": "a", "x": 0.0}, {"v": "b", "x": 1.0}]
    assert means(rows, ("v",)) == [{"v": "a", "n": 2, "x": 0.5}, {"v": "b", "n": 1, "x": 1.0}]


def _row(variant: str, prompt: str, seed: int, identity: float, text: float = 1.0) -> dict[str, object]:
    return {
        "variant": variant,
        "concept": "red dog",
        "prompt": prompt,
        "seed": seed,
        "identity": identity,
        "text": text,
    }


def test_paired_differences_pair_by_prompt_seed_and_occurrence() -> None:
    prompts = [f"p{i}" for i in range(10)]
    rows = [_row("ref", p, s, 0.0) for p in prompts for s in (0, 1)]
    rows += [_row("up", p, s, 1.0 if i % 2 else 0.0) for i, p in enumerate(prompts) for s in (0, 1)]
    # one prompt text drawn twice: its rows pair by occurrence (0 - 0 and 1 - 1), not by text alone
    rows += [_row("ref", "twice", 0, 0.0), _row("ref", "twice", 0, 1.0)]
    rows += [_row("up", "twice", 0, 1.0), _row("up", "twice", 0, 1.0)]
    (up,) = paired_differences(rows, "ref", ("identity", "text"), resamples=500)
    assert up["variant"] == "up" and up["prompts"] == 11
    mean, low, high = up["identity"]  # type: ignore[misc]
    assert mean == pytest.approx((5 + 0.5) / 11)  # "twice": (1 - 0 + 1 - 1) / 2
    assert low < mean < high and 0.0 <= low and high <= 1.0
    assert up["text"] == (0.0, 0.0, 0.0)


def test_toy_report_shows_every_variant_and_kind(tmp_path: Path) -> None:
    from PIL import Image

    from persres.toyworld.report import write_toy_report

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32), "red").save(photos / "ref.png")
    rows = []
    for k, prompt in enumerate(concept_prompts(("dog", "red", "striped"), per_kind=1)):
        for variant in ("base", "normal", "lag"):
            image = tmp_path / variant / f"{k}.png"
            image.parent.mkdir(exist_ok=True)
            Image.new("RGB", (32, 32), "blue").save(image)
            rows.append(
                {
                    "variant": variant,
                    "prompt": prompt.text,
                    "category": prompt.category,
                    "image": f"{variant}/{k}.png",
                    "identity": float(variant != "base"),
                    "text": 0.5,
                }
            )
    page = write_toy_report(rows, tmp_path, photos, tmp_path / "report.html", "t").read_text()
    assert page.count("<img") == 1 + len(rows) + 2  # references, every image, two figures
    for kind in CATEGORIES:
        assert f"<td class='l'>{kind}</td>" in page
    with pytest.raises(Exception, match="exists"):
        write_toy_report(rows, tmp_path, photos, tmp_path / "report.html", "t")
