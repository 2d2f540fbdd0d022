"""The sample grid a run writes every `--sample_every` steps: the pipeline's images, upscaled to be seen."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from diffusers import DDPMPipeline

from dia_diffusion.training.config import TrainingConfig

# Sample grids are upscaled (nearest) so that every image is at least this many pixels wide.
GRID_MIN_CELL_PIXELS = 64


def write_sample_grid(pipeline: DDPMPipeline, config: TrainingConfig, path: Path) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    images = pipeline(
        batch_size=config.num_sample_images,
        generator=generator,
        num_inference_steps=config.sample_inference_steps,
        output_type="np",
    ).images
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
    scale = math.ceil(GRID_MIN_CELL_PIXELS / pixels.shape[-1])
    if scale > 1:
        pixels = F.interpolate(pixels, scale_factor=scale, mode="nearest")
    grid = torchvision.utils.make_grid(
        pixels, nrow=math.ceil(math.sqrt(len(pixels))), padding=2, pad_value=1.0
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}")
    torchvision.utils.save_image(grid, staged, format="png")
    staged.replace(path)
