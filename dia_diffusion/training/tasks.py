"""What differs between the tasks the one training loop serves, as a small object per task: the model a run starts
from and its noise schedule, how the data become training items and a batch becomes the clean samples and the UNet's
other inputs, which pipeline samples and is saved, and what the sample grid shows. Everything else (the loop,
checkpoints and resume, EMA, metrics, evaluation) is shared.

- `UnconditionalTask`: images alone; a diffusers `DDPMPipeline`.
- `ClassConditionalTask`: images and their class labels; the UNet has one class embedding per class plus a null
  class, which a label is dropped to with probability `class_dropout` so that the model also learns the
  unconditional prediction that classifier-free guidance needs (Ho & Salimans 2022); a `ClassConditionalPipeline`.
- `TextToImageTask` (text_to_image_task.py): a pretrained Stable Diffusion's UNet fine-tuned on captioned images.
"""

import math

import datasets
import torch
from accelerate import Accelerator
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline
from torch.utils.data import Dataset

from dia_diffusion.data.decoded_images import training_pixels
from dia_diffusion.pipelines.class_conditional import ClassConditionalPipeline
from dia_diffusion.training.config import TrainingConfig, TrainingConfigError
from dia_diffusion.training.initial_weights import load_initial_unet
from dia_diffusion.training.presets import build_unet


class UnconditionalTask:
    name = "unconditional-image-generation"

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config

    def unet_arguments(self) -> dict:
        """What the task adds to the UNet's layout."""
        return {}

    def place(self, accelerator: Accelerator) -> None:
        """Moves what the task itself runs (frozen encoders) to the training device; images need nothing."""

    def initial_unet(self) -> torch.nn.Module:
        """The model the run starts from: a fresh one of the preset's layout (with what the task adds to it), or the
        saved UNet of `--init_unet`, which must have the task's layout."""
        config = self.config
        if config.init_unet is not None:
            unet = load_initial_unet(config.init_unet, config.unet, config.dia_options())
            for name, value in self.unet_arguments().items():
                if unet.config.get(name) != value:
                    raise TrainingConfigError(
                        f"--init_unet '{config.init_unet}' has {name}={unet.config.get(name)!r}; this "
                        f"{self.name} run needs {value!r}"
                    )
            return unet
        try:
            return build_unet(
                config.unet, {**config.unet_arguments(), **self.unet_arguments()}, config.dia_options()
            )
        except ValueError as error:
            raise TrainingConfigError(
                f"the UNet of --preset {config.preset} with these flags cannot be built: {error}"
            ) from None

    def noise_scheduler(self) -> DDPMScheduler:
        config = self.config
        return DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            variance_type=config.variance_type,
            prediction_type=config.prediction_type,
        )

    def training_items(self, dataset: datasets.Dataset) -> Dataset:
        return training_pixels(dataset, self.config.resolution, self.config.channels)

    def clean_samples(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the model learns to denoise: the images, flipped at random with `--random_flip` (drawn here, from
        the checkpointed global stream, not in the data loader, which runs a batch ahead)."""
        images = batch["pixel_values"]
        return random_horizontal_flip(images) if self.config.random_flip else images

    def unet_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The UNet's arguments besides the noisy samples and timesteps, for one training batch."""
        return {}

    def pipeline(self, unet: torch.nn.Module) -> DiffusionPipeline:
        """The pipeline that samples the grid and the evaluation."""
        pipeline = DDPMPipeline(unet=unet, scheduler=self.noise_scheduler())
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def published_pipeline(self, unet: torch.nn.Module) -> DiffusionPipeline:
        """The pipeline the run saves."""
        return self.pipeline(unet)

    def sample(self, pipeline: DiffusionPipeline, count: int, generator: torch.Generator, steps: int):
        """`count` images as a float array [N, H, W, C] in [0, 1], for the sample grid."""
        return pipeline(
            batch_size=count, generator=generator, num_inference_steps=steps, output_type="np"
        ).images

    def grid_columns(self, count: int) -> int:
        return math.ceil(math.sqrt(count))


class ClassConditionalTask(UnconditionalTask):
    name = "class-conditional-image-generation"

    def __init__(self, config: TrainingConfig, names: list[str]) -> None:
        super().__init__(config)
        self.names = names

    @property
    def null_class(self) -> int:
        return len(self.names)

    def unet_arguments(self) -> dict:
        return {"num_class_embeds": len(self.names) + 1}

    def training_items(self, dataset: datasets.Dataset) -> Dataset:
        return training_pixels(dataset, self.config.resolution, self.config.channels, with_labels=True)

    def unet_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["class_labels"]
        # Drawn from the global stream, which checkpoints save: a resumed run drops the labels it would have dropped.
        dropped = torch.rand(labels.shape, device=labels.device) < self.config.class_dropout
        return {"class_labels": torch.where(dropped, self.null_class, labels)}

    def pipeline(self, unet: torch.nn.Module) -> DiffusionPipeline:
        pipeline = ClassConditionalPipeline(
            unet=unet, scheduler=self.noise_scheduler(), id2label=dict(enumerate(self.names))
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def sample(self, pipeline: DiffusionPipeline, count: int, generator: torch.Generator, steps: int):
        """Every class in turn (image i shows class i mod K), so a grid with K columns has one class per column."""
        labels = [index % len(self.names) for index in range(count)]
        return pipeline(
            labels,
            self.config.guidance_scale,
            generator=generator,
            num_inference_steps=steps,
            output_type="np",
        ).images

    def grid_columns(self, count: int) -> int:
        return min(len(self.names), count)


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
