"""The sample grid a run writes every `--sample_every` steps: the pipeline's images, upscaled to be seen."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from diffusers import DiffusionPipeline

from dia_diffusion.training.config import TrainingConfig
from dia_diffusion.training.tasks import UnconditionalTask

# Sample grids are upscaled (nearest) so that every image is at least this many pixels wide.
GRID_MIN_CELL_PIXELS = 64


def write_sample_grid(
    task: UnconditionalTask, pipeline: DiffusionPipeline, config: TrainingConfig, path: Path
) -> None:
    """What `task` samples for the grid (a class-conditional task: one class per column)."""
    generator = torch.Generator().manual_seed(config.seed)
    images = task.sample(pipeline, config.num_sample_images, generator, config.sample_inference_steps)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    scale = math.ceil(GRID_MIN_CELL_PIXELS / pixels.shape[-1])
    if scale > 1:
        pixels = F.interpolate(pixels, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(pixels, nrow=task.grid_columns(len(pixels)), padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}")
    torchvision.utils.save_image(grid, staged, format="png")
    staged.replace(path)
