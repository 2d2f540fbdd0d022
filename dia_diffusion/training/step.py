"""One optimisation step of a diffusion model: DDPM's loss (with Min-SNR weighting and a noise offset when asked
for), the backward pass and the clipped optimizer update."""

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from dia_diffusion.models.objective import prediction_target
from dia_diffusion.training.checkpointing import find_latest_checkpoint
from dia_diffusion.training.config import TrainingConfig
from dia_diffusion.training.tasks import UnconditionalTask


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def training_step(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, torch.Tensor],
    config: TrainingConfig,
    task: UnconditionalTask | None = None,
) -> torch.Tensor:
    """One micro-batch: loss, backward, and (at the end of an accumulation window) the clipped optimizer step.
    `task` (default: unconditional) says what is denoised (images, or a text-to-image task's latents) and what the
    UNet is given besides (class labels, the captions' encoding).

    Returns every process's loss. When any is not finite nothing is updated: the caller stops the run.
    """
    task = task or UnconditionalTask(config)
    clean_samples = task.clean_samples(batch)
    loss = diffusion_loss(
        unet,
        noise_scheduler,
        clean_samples,
        **task.unet_inputs(batch),
        **loss_options(config),
    )
    losses = accelerator.gather(loss.detach()[None])
    if not torch.isfinite(losses).all():
        return losses
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def check_finite(losses: torch.Tensor, step: int, checkpoints_dir: Path) -> None:
    """Raises NonFiniteLossError, naming the step and the last good checkpoint, when any process's loss is not
    finite."""
    if not torch.isfinite(losses).all():
        raise NonFiniteLossError(
            f"the loss became {losses[~torch.isfinite(losses)][0].item()} at step {step}; "
            "training stopped before that step's update "
            f"(last good checkpoint: {find_latest_checkpoint(checkpoints_dir) or 'none'})"
        )


def loss_options(config: TrainingConfig) -> dict[str, float]:
    """The loss settings that differ from DDPM's, and only those: the default loss draws exactly DDPM's numbers."""
    options = {}
    if config.noise_offset:
        options["noise_offset"] = config.noise_offset
    if config.snr_gamma is not None:
        options["snr_gamma"] = config.snr_gamma
    return options


def diffusion_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean_images: torch.Tensor,
    noise_offset: float = 0.0,
    snr_gamma: float | None = None,
    **unet_inputs,
) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) for the scheduler's prediction type; `unet_inputs` (class labels,
    encoder hidden states) go to the UNet with the noisy images.

    `noise_offset` adds a per-image, per-channel constant to the noise (Guttenberg 2023), so that the model can
    shift an image's mean brightness, which plain Gaussian noise at the last timestep hides from it. `snr_gamma`
    weights each image's loss by min(SNR(t), gamma) / SNR(t) for epsilon (/ (SNR(t) + 1) for v), the Min-SNR-gamma
    strategy (Hang et al. 2023, eq. 9 and its v form), which stops the low-noise timesteps from dominating."""
    noise = torch.randn_like(clean_images)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(*clean_images.shape[:2], 1, 1, device=clean_images.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = unet(noisy_images, timesteps, **unet_inputs).sample
    target = prediction_target(noise_scheduler, clean_images, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * min_snr_weights(noise_scheduler, timesteps, snr_gamma)).mean()


def min_snr_weights(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma's weights of the loss of the scheduler's prediction type, relative to DDPM's uniform ones."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # "sample": an x0 loss is weighted by min(SNR, gamma) itself
