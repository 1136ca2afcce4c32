"""The base-model protocol: which backbone a pipeline, a base folder or a U-Net gets, what it names as
residual targets, and that nothing outside ``persres/backbones`` tests the architecture itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

import persres
from persres.backbones import Backbone, backbone_for_base, backbone_of, backbone_of_denoiser
from persres.backbones.unet import SD, SDXL, UNetBackbone
from persres.config import ResidualConfig
from persres.core.residuals import find_proj_outs
from persres.errors import ModelError
from persres.testing.reference_configs import SD15_UNET, SD21_UNET, SDXL_UNET
from persres.testing.tiny import save_tiny_pipeline, tiny_pipeline, tiny_sdxl_pipeline

ARCHITECTURE_TESTS = re.compile(
    r"addition_embed_type|text_time|StableDiffusionXLPipeline|is_xl|FluxPipeline|FluxTransformer|"
    r"guidance_embeds|joint_attention_dim|is_flux"
)
MAY_NAME_ARCHITECTURES = {"testing"}  # published configs and test fixtures
MAY_NAME_FILES = {"toyworld/model_flux.py"}  # the toy Flux base's definition: builds one architecture


def proj_outs_as_before(unet: nn.Module) -> dict[str, tuple[int, ...]]:
    """Today's rule, written out: the proj_out of every Transformer2DModel, with its weight's shape."""
    return {
        f"{name}.proj_out": tuple(module.proj_out.weight.shape)
        for name, module in unet.named_modules()
        if isinstance(module, Transformer2DModel)
    }


def meta_unet(config: dict[str, object]) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def test_tiny_pipelines_get_the_unet_backbone_of_their_family() -> None:
    assert backbone_of(tiny_pipeline()) is SD
    assert backbone_of(tiny_pipeline(linear_projection=True)) is SD
    xl = tiny_sdxl_pipeline()
    assert backbone_of(xl) is SDXL
    assert backbone_of(xl).pipeline_class is StableDiffusionXLPipeline
    assert backbone_of(xl).default_resolution == 1024 and SD.default_resolution == 512
    assert len(SDXL.text_towers(xl)) == 2 and len(SD.text_towers(tiny_pipeline())) == 1
    assert isinstance(SD, UNetBackbone)
    protocol: Backbone = SDXL  # the U-Net family satisfies the protocol (checked by mypy)
    assert protocol.name


@pytest.mark.parametrize(
    ("config", "expected", "count"), [(SD15_UNET, SD, 16), (SD21_UNET, SD, 16), (SDXL_UNET, SDXL, 11)]
)
def test_published_unets_on_the_meta_device(
    config: dict[str, object], expected: Backbone, count: int
) -> None:
    unet = meta_unet(config)
    backbone = backbone_of_denoiser(unet)
    assert backbone is expected
    targets = backbone.residual_targets(unet)
    widths = {path: tuple(layer.weight.shape) for path, layer in targets.items()}
    assert widths == proj_outs_as_before(unet) and len(widths) == count
    assert {p: tuple(m.weight.shape) for p, m in find_proj_outs(unet).items()} == widths
    # the paper's rank rule: 5% of each layer's width m_i (16/32/64 for 320/640/1280)
    for path, layer in find_proj_outs(unet).items():
        assert (
            backbone.default_rank(path, layer, ResidualConfig())
            == {320: 16, 640: 32, 1280: 64}[widths[path][0]]
        )
    for path in targets:  # LAG reads the cross-attention of the block its residual closes
        layers = backbone.attention_layers(unet, path)
        assert layers and all(name.startswith(path.removesuffix("proj_out")) for name in layers)


def test_a_base_folder_gets_its_backbone_without_loading_weights(tmp_path: Path) -> None:
    folder = save_tiny_pipeline(tmp_path / "sd")
    assert backbone_for_base(str(folder)) is SD
    skeleton = SD.skeleton(str(folder))
    assert next(skeleton.parameters()).is_meta


def test_a_base_of_an_unknown_architecture_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelError) as caught:
        backbone_for_base(str(folder))
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_a_pipeline_without_a_unet_is_refused_in_one_line() -> None:
    pipe = tiny_pipeline()
    pipe.register_to_config(_name_or_path="my/base")
    pipe.unet = None
    with pytest.raises(ModelError, match="my/base is a StableDiffusionPipeline without a U-Net") as caught:
        backbone_of(pipe)
    assert "\n" not in str(caught.value)
    with pytest.raises(ModelError, match="no transformer blocks"):
        backbone_of_denoiser(nn.Linear(2, 2))
    assert isinstance(tiny_pipeline(), StableDiffusionPipeline)


def test_the_unet_backbone_trains_on_epsilon_or_v_as_the_scheduler_says() -> None:
    from diffusers import DDPMScheduler

    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(prediction_type=kind)
        noisy, steps, target = SD.noised(scheduler, latents, torch.Generator().manual_seed(1))
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        expected = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, steps)
        torch.testing.assert_close(target, expected)
        torch.testing.assert_close(noisy, scheduler.add_noise(latents, noise, steps))


def test_no_module_outside_backbones_tests_the_architecture() -> None:
    package = Path(persres.__file__).parent
    found = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if not {"backbones", *MAY_NAME_ARCHITECTURES} & set(path.relative_to(package).parts)
        and path.relative_to(package).as_posix() not in MAY_NAME_FILES
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if ARCHITECTURE_TESTS.search(line)
    ]
    assert not found, "ask persres.backbones instead:\n" + "\n".join(found)
