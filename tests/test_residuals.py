"""Invariants of the residual wrapper on tiny U-Nets, Conv2d (SD 1.x) and Linear (SD 2.x) proj_out."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import randomize_residuals, run_unet, unet_inputs
from torch import nn

from persres import (
    ResidualConfig,
    ResidualProjOut,
    add_residuals,
    count_parameters,
    find_residuals,
    fold_residuals,
    merge_residuals,
    remove_residuals,
    residuals_disabled,
    unmerge_residuals,
)
from persres.core.residuals import find_proj_outs
from persres.errors import ConfigError
from persres.testing.reference_configs import SD15_UNET, SD21_UNET


def test_parameter_count_is_sum_of_2_m_r(unet: nn.Module) -> None:
    residuals = add_residuals(unet, ResidualConfig(rank=0.05))
    expected = 0
    for wrapper in residuals.values():
        m = wrapper.base.weight.shape[0]
        assert wrapper.rank == max(1, round(0.05 * m))
        expected += 2 * m * wrapper.rank
    assert count_parameters(residuals) == expected
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    assert trainable == expected


def test_keys_are_module_paths_of_every_transformer_proj_out(unet: nn.Module) -> None:
    residuals = add_residuals(unet)
    assert sorted(residuals) == [
        "down_blocks.0.attentions.0.proj_out",
        "mid_block.attentions.0.proj_out",
        "up_blocks.1.attentions.0.proj_out",
        "up_blocks.1.attentions.1.proj_out",
    ]
    for path, wrapper in residuals.items():
        assert unet.get_submodule(path) is wrapper


@pytest.mark.parametrize("config", [SD15_UNET, SD21_UNET], ids=["sd15-conv", "sd21-linear"])
def test_stable_diffusion_has_1239040_parameters_at_rank_5_percent(config: dict) -> None:
    with torch.device("meta"):  # the real architecture, no memory
        unet = UNet2DConditionModel(**config)
        residuals = add_residuals(unet)
    assert len(residuals) == 16
    assert sorted({w.rank for w in residuals.values()}) == [16, 32, 64]
    assert count_parameters(residuals) == 1_239_040
    total = sum(p.numel() for p in unet.parameters())
    assert 0.0013 < count_parameters(residuals) / total < 0.0015  # "about 0.14% of the U-Net"


def test_fixed_rank_and_rank_errors(unet: nn.Module) -> None:
    residuals = add_residuals(unet, ResidualConfig(rank=3))
    assert {w.rank for w in residuals.values()} == {3}
    remove_residuals(unet)
    with pytest.raises(ConfigError, match="above the width 32 of layer down_blocks.0.attentions.0.proj_out"):
        add_residuals(unet, ResidualConfig(rank=33))
    with pytest.raises(ConfigError, match="must be >= 1"):
        ResidualConfig(rank=0)
    with pytest.raises(ConfigError, match="fraction"):
        ResidualConfig(rank=1.5)


def test_adding_twice_is_refused(unet: nn.Module) -> None:
    add_residuals(unet)
    with pytest.raises(ConfigError, match="already has residuals"):
        add_residuals(unet)


def test_zero_init_gives_the_base_output(unet: nn.Module) -> None:
    inputs = unet_inputs(unet)
    before = run_unet(unet, inputs)
    add_residuals(unet, ResidualConfig(init="zero"))
    assert torch.equal(run_unet(unet, inputs), before)


def test_random_init_moves_the_output_a_little(unet: nn.Module) -> None:
    inputs = unet_inputs(unet)
    before = run_unet(unet, inputs)
    residuals = add_residuals(unet, ResidualConfig(init="random"))
    assert all(w.A.abs().sum() > 0 and w.B.abs().sum() > 0 for w in residuals.values())
    after = run_unet(unet, inputs)
    assert not torch.equal(after, before)
    assert (after - before).abs().max() < 0.1


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def cast_inputs(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    latents, steps, text = inputs
    return latents.to(dtype), steps, text.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_merged_equals_unmerged_and_unmerge_restores_weights(unet: nn.Module, dtype: torch.dtype) -> None:
    unet.to(dtype)
    inputs = cast_inputs(unet_inputs(unet), dtype)
    add_residuals(unet)
    randomize_residuals(unet)
    weights = {p: w.base.weight.detach().clone() for p, w in find_residuals(unet).items()}
    unmerged = run_unet(unet, inputs)
    merge_residuals(unet)
    assert all(w.merged for w in find_residuals(unet).values())
    assert any(not torch.equal(w.base.weight, weights[p]) for p, w in find_residuals(unet).items())
    if dtype == torch.float32:  # in half precision the merged weight is rounded, the residual is not
        torch.testing.assert_close(run_unet(unet, inputs), unmerged, atol=1e-5, rtol=1e-5)
    unmerge_residuals(unet)
    for path, wrapper in find_residuals(unet).items():  # restored, not W + A B - A B
        assert torch.equal(wrapper.base.weight, weights[path]), path
    assert torch.equal(run_unet(unet, inputs), unmerged)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_disabled_equals_base(unet: nn.Module, dtype: torch.dtype, merged: bool) -> None:
    unet.to(dtype)
    inputs = cast_inputs(unet_inputs(unet), dtype)
    base = run_unet(unet, inputs)
    add_residuals(unet)
    randomize_residuals(unet)
    if merged:
        merge_residuals(unet)
    weights = {p: w.base.weight.detach().clone() for p, w in find_residuals(unet).items()}
    personalized = run_unet(unet, inputs)
    assert (personalized.float() - base.float()).abs().max() > 1e-3
    with residuals_disabled(unet):
        assert torch.equal(run_unet(unet, inputs), base)
    assert torch.equal(run_unet(unet, inputs), personalized)
    for path, wrapper in find_residuals(unet).items():  # merged again exactly as before
        assert wrapper.merged == merged and wrapper.enabled
        assert torch.equal(wrapper.base.weight, weights[path]), path


def test_remove_restores_modules_and_state_dict(unet: nn.Module) -> None:
    originals = {name: m for name, m in unet.named_modules() if name.endswith("proj_out")}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    add_residuals(unet)
    randomize_residuals(unet)
    merge_residuals(unet)  # removing a merged residual must unmerge first
    remove_residuals(unet)
    assert not find_residuals(unet)
    for name, module in originals.items():
        assert unet.get_submodule(name) is module
    after = unet.state_dict()
    assert list(after) == list(state)
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_remove_restores_requires_grad_flags(unet: nn.Module) -> None:
    for i, param in enumerate(unet.parameters()):  # some trainable, some not, proj_out weights included
        param.requires_grad_(i % 3 == 0)
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    assert any(flags[f"{path}.weight"] for path in find_proj_outs(unet))
    add_residuals(unet)
    assert not any(p.requires_grad for n, p in unet.named_parameters() if not n.endswith((".A", ".B")))
    randomize_residuals(unet)
    merge_residuals(unet)
    remove_residuals(unet)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags
    add_residuals(unet)  # a second round trip still restores them
    remove_residuals(unet)
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags


def test_a_refused_rank_leaves_the_unet_untouched(unet: nn.Module) -> None:
    unet.requires_grad_(True)
    with pytest.raises(ConfigError, match="above the width"):
        add_residuals(unet, ResidualConfig(rank=48))  # fits the 64-wide layers, not the 32-wide one
    assert not find_residuals(unet)
    assert all(p.requires_grad for p in unet.parameters())


def test_fold_leaves_a_plain_unet_with_the_same_output(unet: nn.Module) -> None:
    inputs = unet_inputs(unet)
    add_residuals(unet)
    randomize_residuals(unet)
    personalized = run_unet(unet, inputs)
    assert fold_residuals(unet) == 4
    assert not any(isinstance(m, ResidualProjOut) for m in unet.modules())
    torch.testing.assert_close(run_unet(unet, inputs), personalized, atol=1e-5, rtol=1e-5)


def test_factors_stay_fp32_on_a_half_precision_base(unet: nn.Module) -> None:
    unet.to(torch.bfloat16)
    residuals = add_residuals(unet)
    randomize_residuals(unet)
    for wrapper in residuals.values():
        assert wrapper.A.dtype == wrapper.B.dtype == torch.float32
        assert wrapper.base.weight.dtype == torch.bfloat16
    latents, steps, text = unet_inputs(unet)
    out = unet(latents.bfloat16(), steps, encoder_hidden_states=text.bfloat16()).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(w.A.grad is not None and w.A.grad.dtype == torch.float32 for w in residuals.values())


def test_only_residuals_get_gradients(unet: nn.Module) -> None:
    residuals = add_residuals(unet)
    latents, steps, text = unet_inputs(unet)
    unet(latents, steps, encoder_hidden_states=text).sample.square().mean().backward()
    for name, param in unet.named_parameters():
        is_factor = name.endswith((".A", ".B"))
        assert param.requires_grad == is_factor, name
        assert (param.grad is not None) == is_factor, name
    # zero-init: A starts at zero but gets a gradient; B's gradient is zero until A moves
    assert all(w.A.grad.abs().sum() > 0 for w in residuals.values())
