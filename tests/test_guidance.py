"""The `guidance` sampling uses when none is given is the base family's (``Backbone.default_guidance``):
classifier-free 7.5 on Stable Diffusion, the distilled 3.5 on Flux.1-dev (FluxPipeline's own default); a
given one is kept. Checked on what persres hands the pipeline, on tiny SD and tiny Flux bases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from persres.config import SampleSettings
from persres.core.pipeline import load_pipeline
from persres.errors import ConfigError
from persres.evaluation.benchmark import BenchmarkConfig, with_base_guidance
from persres.formats.concepts import Concept
from persres.inference.sampling import sample

PROMPT = "a photo of a V* dog"
CONCEPT = Concept("sks", "dog")


def guidance_passed(base: Path, guidance: float | None, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(the guidance_scale persres passed to the pipeline, the one its Sample records)."""
    pipe = load_pipeline(str(base))
    called: list[float] = []
    original = type(pipe).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        called.append(kwargs["guidance_scale"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    settings = SampleSettings(steps=1, height=16, width=16, guidance=guidance)
    [item] = sample(pipe, [PROMPT], [CONCEPT], settings, progress=False)
    [passed] = called
    return passed, item.guidance


@pytest.mark.parametrize(("family", "default"), [("flux", 3.5), ("sd", 7.5)])
def test_sampling_without_guidance_uses_the_base_familys_and_keeps_a_given_one(
    family: str, default: float, flux_base: Path, linear_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = flux_base if family == "flux" else linear_base
    assert guidance_passed(base, None, monkeypatch) == (default, default)
    assert guidance_passed(base, 2.0, monkeypatch) == (2.0, 2.0)
    assert guidance_passed(base, 0.0, monkeypatch) == (0.0, 0.0)  # a given 0 is not "none given"


def test_sample_settings_default_leaves_guidance_to_the_base_and_checks_a_given_one() -> None:
    assert SampleSettings().guidance is None
    assert SampleSettings().with_guidance(3.5).guidance == 3.5
    assert SampleSettings(guidance=7.5).with_guidance(3.5).guidance == 7.5
    with pytest.raises(ConfigError, match=r"`guidance` must be a finite number in \[0, 100\], got nan"):
        SampleSettings(guidance=float("nan"))


def test_a_benchmark_records_its_base_familys_guidance_before_running(
    flux_base: Path, linear_base: Path, tmp_path: Path
) -> None:
    """Resolved from model_index.json before benchmark.json is written, so a rerun compares numbers (and a
    benchmark folder written when 7.5 was every base's default still resumes on SD)."""
    flux = BenchmarkConfig(dataset="d", base=str(flux_base), out=str(tmp_path))
    sd = BenchmarkConfig(dataset="d", base=str(linear_base), out=str(tmp_path))
    assert with_base_guidance(flux).sample.guidance == 3.5
    assert with_base_guidance(sd).sample.guidance == 7.5
    given = BenchmarkConfig("d", str(flux_base), str(tmp_path), sample=SampleSettings(guidance=5.0))
    assert with_base_guidance(given).sample.guidance == 5.0
