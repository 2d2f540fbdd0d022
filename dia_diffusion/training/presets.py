"""Named training presets, and the `--unet` choice that turns a preset's UNet layout into a model.

A preset is a complete recipe: data, UNet layout, diffusion schedule, optimisation, EMA, checkpoint, sampling and
evaluation cadence. `train/train_ddpm.py --preset NAME` starts from it and every flag overrides one of its values;
the result is written to the run folder as `training_config.json`. `TEXT_TO_IMAGE_PRESETS` are the recipes of
`train/train_text_to_image.py`, whose model, VAE, text encoder and noise schedule come from `--pretrained_model`.
"""

from dataclasses import dataclass
from typing import Any

from diffusers import UNet2DModel

from dia_diffusion.models.unet_2d_dia import DIAUNet2DModel

# `--unet` values -> DIAUNet2DModel's `dia_attention` (None: diffusers' stock UNet2DModel, no attention module).
UNET_VARIANTS: dict[str, str | None] = {
    "dia": "dia_lstm",
    "se-shared": "se_shared",
    "se-per-layer": "se_per_layer",
    "stock": None,
}


@dataclass(frozen=True)
class Preset:
    description: str
    settings: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        description="scikit-learn's 8x8 digits, a small DIA UNet; trains, samples and evaluates in minutes on 2 CPU cores",
        settings={
            "dataset": "digits",
            "resolution": 8,
            "channels": 1,
            # A mirrored digit is a different glyph, so no flips.
            "random_flip": False,
            "unet": "dia",
            "unet_config": {
                "block_out_channels": (32, 64),
                "layers_per_block": 1,
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": 8,
                "norm_num_groups": 8,
            },
            # The cosine schedule (Nichol & Dhariwal 2021) destroys a small image's content more gradually than
            # the linear one; at 8x8 it gave clearer digits and a lower FD for the same 2000 steps.
            "beta_schedule": "squaredcos_cap_v2",
            "max_train_steps": 1500,
            "train_batch_size": 64,
            "learning_rate": 1e-3,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 100,
            "max_grad_norm": 1.0,
            "ema_decay": 0.999,
            "ema_warmup": True,
            "checkpointing_steps": 500,
            "checkpoints_total_limit": 2,
            "sample_every": 0,
            "sample_inference_steps": 250,
            "eval_every": 1500,
            "eval_num_samples": 500,
            "eval_inference_steps": 50,
        },
    ),
    "fmnist-32": Preset(
        description="Fashion-MNIST resized to 32x32, a small UNet with attention at 16x16",
        settings={
            "dataset": "fashion_mnist",
            "resolution": 32,
            "channels": 1,
            "random_flip": True,
            "unet": "dia",
            "unet_config": {
                "block_out_channels": (32, 64, 64),
                "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": 16,
                "norm_num_groups": 8,
                "dropout": 0.1,
            },
            "max_train_steps": 20_000,
            "train_batch_size": 128,
            "learning_rate": 2e-4,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 1000,
            "max_grad_norm": 1.0,
            "ema_decay": 0.999,
            "ema_warmup": True,
            "checkpointing_steps": 2000,
            "checkpoints_total_limit": 3,
            "sample_every": 5000,
            "sample_inference_steps": 1000,
            "eval_every": 5000,
            "eval_num_samples": 1000,
            "eval_inference_steps": 50,
        },
    ),
    "cifar10-ddpm": Preset(
        description="the DDPM paper's CIFAR-10 setup (Ho et al. 2020): 35.7M parameters, 800k steps of batch 128",
        settings={
            "dataset": "cifar10",
            "resolution": 32,
            "channels": 3,
            "random_flip": True,
            "unet": "dia",
            # The paper's layout: widths 128-256-256-256, two resnets per level, single-head attention at 16x16.
            "unet_config": {
                "block_out_channels": (128, 256, 256, 256),
                "layers_per_block": 2,
                "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                "attention_head_dim": None,
                "norm_num_groups": 32,
                "dropout": 0.1,
            },
            "num_train_timesteps": 1000,
            "beta_schedule": "linear",
            # The paper's CIFAR-10 sampler uses sigma_t^2 = beta_t.
            "variance_type": "fixed_large",
            "max_train_steps": 800_000,
            "train_batch_size": 128,
            "learning_rate": 2e-4,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 5000,
            "max_grad_norm": 1.0,
            "ema_decay": 0.9999,
            "ema_warmup": False,
            "checkpointing_steps": 10_000,
            "checkpoints_total_limit": 3,
            "sample_every": 20_000,
            "sample_inference_steps": 1000,
            "eval_every": 0,
        },
    ),
}


TEXT_TO_IMAGE_PRESETS: dict[str, Preset] = {
    "sd-finetune": Preset(
        description="fine-tune a Stable Diffusion 1.x/2.x UNet on captioned images (the settings of diffusers' "
        "text-to-image example, at batch 1 x 4 accumulation steps)",
        settings={
            "dataset": None,
            "resolution": 512,
            "channels": 3,
            "random_flip": False,
            "center_crop": False,
            "unet": "dia",
            "unet_config": {},
            "max_train_steps": 15_000,
            "train_batch_size": 1,
            "gradient_accumulation_steps": 4,
            "learning_rate": 1e-5,
            "lr_scheduler": "constant",
            "lr_warmup_steps": 0,
            "adam_weight_decay": 1e-2,
            "max_grad_norm": 1.0,
            "ema_decay": 0.9999,
            "ema_warmup": False,
            # Stable Diffusion was trained with 10 % of captions dropped; keeping that keeps guidance working.
            "caption_dropout": 0.1,
            "guidance_scale": 7.5,
            "checkpointing_steps": 500,
            "checkpoints_total_limit": 3,
            "sample_every": 500,
            "num_sample_images": 4,
            "sample_inference_steps": 30,
            "eval_every": 0,
        },
    ),
}


def unet_arguments(unet_config: dict[str, Any], resolution: int, channels: int) -> dict[str, Any]:
    """A UNet layout at the data's resolution and channel count: the complete UNet2DModel arguments."""
    return {**unet_config, "sample_size": resolution, "in_channels": channels, "out_channels": channels}


def build_unet(variant: str, unet_config: dict[str, Any], dia_options: dict[str, Any]) -> UNet2DModel:
    """The `--unet` variant of one UNet2DModel layout.

    `unet_config` holds UNet2DModel arguments (sample size and channels included); `dia_options` holds
    `dia_sharing`, `dia_reduction`, `dia_hidden_channels`, `dia_gate`, `dia_condition` and `dia_global_cell`, which
    the stock UNet ignores.
    """
    if variant not in UNET_VARIANTS:
        raise ValueError(f"unet must be one of {', '.join(UNET_VARIANTS)}, got {variant!r}")
    attention = UNET_VARIANTS[variant]
    if attention is None:
        return UNet2DModel(**unet_config)
    return DIAUNet2DModel(**unet_config, dia_attention=attention, **dia_options)
