"""One optimisation step of a diffusion model: DDPM's loss, the backward pass and the clipped optimizer update."""

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler

from dia_diffusion.models.objective import prediction_target
from dia_diffusion.training.checkpointing import find_latest_checkpoint
from dia_diffusion.training.config import TrainingConfig
from dia_diffusion.training.tasks import UnconditionalTask

UNCONDITIONAL = UnconditionalTask()


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def training_step(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_scheduler: DDPMScheduler,
    batch: dict[str, torch.Tensor],
    config: TrainingConfig,
    task: UnconditionalTask = UNCONDITIONAL,
) -> torch.Tensor:
    """One micro-batch: loss, backward, and (at the end of an accumulation window) the clipped optimizer step.
    `task` says what the UNet is given besides the noisy images (the class labels of a class-conditional task).

    Returns every process's loss. When any is not finite nothing is updated: the caller stops the run.
    """
    clean_images = batch["pixel_values"]
    if config.random_flip:
        clean_images = random_horizontal_flip(clean_images)
    loss = diffusion_loss(unet, noise_scheduler, clean_images, **task.unet_inputs(batch))
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


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def diffusion_loss(
    unet: torch.nn.Module, noise_scheduler: DDPMScheduler, clean_images: torch.Tensor, **unet_inputs
) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) for the scheduler's prediction type; `unet_inputs` (class labels)
    go to the UNet with the noisy images."""
    noise = torch.randn_like(clean_images)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (clean_images.shape[0],), device=clean_images.device
    )
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = unet(noisy_images, timesteps, **unet_inputs).sample
    target = prediction_target(noise_scheduler, clean_images, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
