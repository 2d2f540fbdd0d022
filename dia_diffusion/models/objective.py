"""What the UNet learns to predict: the target of DDPM's simple loss (Ho et al. 2020, eq. 14) for each of diffusers'
prediction types. Training draws the noise and timesteps at random; the held-out loss fixes them."""

import torch
from diffusers import DDPMScheduler


def prediction_target(
    noise_scheduler: DDPMScheduler, clean_images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The noise (`epsilon`), the clean image (`sample`) or the velocity (`v_prediction`, Salimans & Ho 2022)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean_images
    return noise_scheduler.get_velocity(clean_images, noise, timesteps)
