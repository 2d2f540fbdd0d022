"""The exponential moving average of the weights, which samples, evaluations and the saved pipeline use."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from dia_diffusion.training.config import TrainingConfig

# diffusers' EMAModel warmup: decay = 1 - (1 + step)^-power, capped at ema_decay; 3/4 suits runs of ~10k steps.
EMA_WARMUP_POWER = 0.75


# The EMA and the optimizer update every parameter tensor (~200 of them) with one multi-tensor kernel instead of a
# Python loop over them: several milliseconds per step for a small UNet on the CPU, and fewer kernel launches on a GPU.
def make_ema(unet: UNet2DModel, config: TrainingConfig) -> EMAModel:
    return EMAModel(
        unet.parameters(),
        decay=config.ema_decay,
        use_ema_warmup=config.ema_warmup,
        power=EMA_WARMUP_POWER,
        model_cls=type(unet),
        model_config=unet.config,
        foreach=True,
    )


@contextmanager
def ema_weights(ema: EMAModel, unet: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Swaps the EMA weights into `unet` in eval mode; the training weights, mode and RNG streams come back after."""
    parameters = list(unet.parameters())
    ema.store(parameters)
    ema.copy_to(parameters)
    unet.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        unet.train()
        ema.restore(parameters)
