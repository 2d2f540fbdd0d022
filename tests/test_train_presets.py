"""Presets resolve to working configs, flags override them, and `--unet` picks the intended model."""

import pytest
import torch
from diffusers import UNet2DModel

from dia_diffusion import DIAUNet2DModel
from dia_diffusion.training.config import TrainingConfigError, resolve_config
from dia_diffusion.training.presets import PRESETS, UNET_VARIANTS, build_unet


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_every_preset_builds_every_variant(preset, variant):
    config = resolve_config(preset, {"output_dir": "unused", "unet": variant})
    with torch.device("meta"):
        unet = build_unet(config.unet, config.unet_arguments(), config.dia_options())
    assert unet.config.sample_size == config.resolution
    assert unet.config.in_channels == unet.config.out_channels == config.channels
    if variant == "stock":
        assert type(unet) is UNet2DModel
    else:
        assert isinstance(unet, DIAUNet2DModel)
        assert unet.config.dia_attention == UNET_VARIANTS[variant]


def test_cifar10_ddpm_is_the_paper_setup():
    config = resolve_config("cifar10-ddpm", {"output_dir": "unused"})
    assert (config.learning_rate, config.lr_warmup_steps, config.max_grad_norm) == (2e-4, 5000, 1.0)
    assert (config.ema_decay, config.train_batch_size, config.max_train_steps) == (0.9999, 128, 800_000)
    assert (config.num_train_timesteps, config.beta_schedule) == (1000, "linear")
    assert config.unet_config["dropout"] == 0.1
    with torch.device("meta"):
        stock = build_unet("stock", config.unet_arguments(), config.dia_options())
        dia = build_unet("dia", config.unet_arguments(), config.dia_options())
    # Ho et al. 2020 report 35.7M parameters for this network.
    assert parameter_count(stock) == 35_746_307
    assert parameter_count(dia) <= 1.01 * parameter_count(stock)
    assert [type(block).__name__ for block in stock.down_blocks] == [
        "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D",
    ]  # fmt: skip


def test_flags_override_the_preset_and_none_keeps_it():
    overrides = {
        "output_dir": "unused",
        "learning_rate": 1e-4,
        "train_batch_size": None,
        "dia_gate": "identity",
    }
    config = resolve_config("cifar10-ddpm", overrides)
    assert config.learning_rate == 1e-4
    assert config.train_batch_size == 128
    assert config.dia_options()["dia_gate"] == "identity"
    with torch.device("meta"):
        unet = build_unet(config.unet, config.unet_arguments(), config.dia_options())
    assert unet.config.dia_gate == "identity"


def test_unknown_variant_and_setting_are_named():
    with pytest.raises(
        ValueError, match="unet must be one of dia, se-shared, se-per-layer, stock, got 'vit'"
    ):
        build_unet("vit", {}, {})
    with pytest.raises(TrainingConfigError, match="unknown setting"):
        resolve_config("demo", {"output_dir": "unused", "learning_rat": 1e-4})
    with pytest.raises(TrainingConfigError, match="--max_train_steps must be positive, got 0"):
        resolve_config("demo", {"output_dir": "unused", "max_train_steps": 0})
