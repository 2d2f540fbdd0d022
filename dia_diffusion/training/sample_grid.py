"""The sample grid a run writes every `--sample_every` steps: the pipeline's images, upscaled to be seen."""

from pathlib import Path

import torch
import torchvision
from diffusers import DiffusionPipeline

from dia_diffusion.pipelines.sampling import enlarged_to_be_seen
from dia_diffusion.training.config import TrainingConfig
from dia_diffusion.training.tasks import UnconditionalTask


def write_sample_grid(
    task: UnconditionalTask, pipeline: DiffusionPipeline, config: TrainingConfig, path: Path
) -> None:
    """What `task` samples for the grid (a class-conditional task: one class per column)."""
    generator = torch.Generator().manual_seed(config.seed)
    images = task.sample(pipeline, config.num_sample_images, generator, config.sample_inference_steps)
    pixels = enlarged_to_be_seen(torch.from_numpy(images).permute(0, 3, 1, 2))
    grid = torchvision.utils.make_grid(pixels, nrow=task.grid_columns(len(pixels)), padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}")
    torchvision.utils.save_image(grid, staged, format="png")
    staged.replace(path)
