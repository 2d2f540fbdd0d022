"""What differs between the tasks the one training loop serves, as a small object per task: how the data become
training items, what the UNet is given besides the noisy images, which pipeline samples and is saved, and what the
sample grid shows. Everything else (the loop, checkpoints and resume, EMA, metrics, evaluation) is shared.

- `UnconditionalTask`: images alone; a diffusers `DDPMPipeline`.
- `ClassConditionalTask`: images and their class labels; the UNet has one class embedding per class plus a null
  class, which a label is dropped to with probability `class_dropout` so that the model also learns the
  unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022); a `ClassConditionalPipeline`.
"""

import math

import datasets
import torch
from diffusers import DDPMPipeline, DiffusionPipeline
from torch.utils.data import Dataset

from dia_diffusion.data.class_labels import class_names
from dia_diffusion.data.decoded_images import training_pixels
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline
from dia_diffusion.training.config import TrainingConfig


class UnconditionalTask:
    name = "unconditional-image-generation"

    def unet_arguments(self) -> dict:
        """What the task adds to the UNet's layout."""
        return {}

    def training_items(self, dataset: datasets.Dataset, config: TrainingConfig) -> Dataset:
        return training_pixels(dataset, config.resolution, config.channels)

    def unet_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's arguments besides the noisy images and timesteps, for one training batch."""
        return {}

    def pipeline(self, unet, scheduler) -> DiffusionPipeline:
        return DDPMPipeline(unet=unet, scheduler=scheduler)

    def sample(self, pipeline: DiffusionPipeline, count: int, generator: torch.Generator, steps: int):
        """`count` images as a float array [N, H, W, C] in [0, 1], for the sample grid."""
        return pipeline(
            batch_size=count, generator=generator, num_inference_steps=steps, output_type="np"
        ).images

    def grid_columns(self, count: int) -> int:
        return math.ceil(math.sqrt(count))


class ClassConditionalTask(UnconditionalTask):
    name = "class-conditional-image-generation"

    def __init__(self, names: list[str], class_dropout: float, guidance_scale: float) -> None:
        self.names = names
        self.class_dropout = class_dropout
        self.guidance_scale = guidance_scale

    @property
    def null_class(self) -> int:
        return len(self.names)

    def unet_arguments(self) -> dict:
        return {"num_class_embeds": len(self.names) + 1}

    def training_items(self, dataset: datasets.Dataset, config: TrainingConfig) -> Dataset:
        return training_pixels(dataset, config.resolution, config.channels, with_labels=True)

    def unet_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["class_labels"]
        # Drawn from the global stream, which checkpoints save: a resumed run drops the labels it would have dropped.
        dropped = torch.rand(labels.shape, device=labels.device) < self.class_dropout
        return {"class_labels": torch.where(dropped, self.null_class, labels)}

    def pipeline(self, unet, scheduler) -> DiffusionPipeline:
        return ClassConditionalPipeline(unet=unet, scheduler=scheduler, id2label=dict(enumerate(self.names)))

    def sample(self, pipeline: DiffusionPipeline, count: int, generator: torch.Generator, steps: int):
        """Every class in turn (image i shows class i mod K), so a grid with K columns has one class per column."""
        labels = [index % len(self.names) for index in range(count)]
        return pipeline(
            labels, self.guidance_scale, generator=generator, num_inference_steps=steps, output_type="np"
        ).images

    def grid_columns(self, count: int) -> int:
        return min(len(self.names), count)


def make_task(config: TrainingConfig, dataset: datasets.Dataset) -> UnconditionalTask:
    if not config.class_conditional:
        return UnconditionalTask()
    return ClassConditionalTask(
        class_names(dataset, config.dataset), config.class_dropout, config.guidance_scale
    )
