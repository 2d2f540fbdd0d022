"""Tiny training runs for the tests: a small UNet layout, a config that trains in seconds, and ways to look at a run."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from dia_diffusion.training import step as training_steps
from dia_diffusion.training.config import TrainingConfig, resolve_config
from dia_diffusion.training.loop import TrainingResult

TINY_UNET = {
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": 4,
    "norm_num_groups": 4,
    "dropout": 0.1,
}


def tiny_config(dataset: str, output_dir: Path, **overrides) -> TrainingConfig:
    settings = {
        "dataset": dataset,
        "output_dir": str(output_dir),
        "unet_config": TINY_UNET,
        "max_train_steps": 4,
        "train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "checkpointing_steps": 2,
        "log_every": 1,
        "report_to": "none",
        "num_sample_images": 4,
        "sample_inference_steps": 2,
        "eval_every": 0,
        **overrides,
    }
    return resolve_config("demo", settings)


def assert_same_weights(expected: TrainingResult, actual: TrainingResult) -> None:
    """The two runs ended with bitwise the same training weights and EMA weights."""
    for (name, value), other in zip(expected.unet.named_parameters(), actual.unet.parameters(), strict=True):
        assert torch.equal(value, other), name
    for shadow, other in zip(expected.ema.shadow_params, actual.ema.shadow_params, strict=True):
        assert torch.equal(shadow, other)


def watch_the_loss(patch: pytest.MonkeyPatch, seen: list) -> None:
    """Records (clean images, prediction type) for every loss computed while `patch` is active."""
    real_loss = training_steps.diffusion_loss

    def watched_loss(unet, noise_scheduler, clean_images):
        seen.append((clean_images.clone(), noise_scheduler.config.prediction_type))
        return real_loss(unet, noise_scheduler, clean_images)

    patch.setattr(training_steps, "diffusion_loss", watched_loss)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate_state() -> None:
    """accelerate's state is a per-process singleton: a second run in this process needs it cleared."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
