"""The held-out denoising loss: the training objective on images the model never saw, at fixed timesteps and with
fixed noise — `dia-diffusion heldout-loss`.

FD judges samples; it needs many of them and varies with the sample set. This loss measures the fit of the
denoiser directly. Its inputs are fixed: the first `num_images` images of a split, the same timesteps for every
image, and noise that is a pure function of (seed, image index). Every model evaluated with the same settings
therefore solves exactly the same denoising problems, so the difference between two models carries no sampling
noise of its own, and a paired comparison over training seeds separates variants with few seeds.

The timesteps cover `[0, num_train_timesteps)` in equal bands, `per_band` evenly spaced timesteps in each; the
mean over all of them estimates the expected DDPM loss under uniformly drawn timesteps (Ho et al. 2020, eq. 14),
and each band's mean says where on the noise scale a model fits better (low t: fine detail; high t: coarse layout).
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dia_diffusion.data.image_datasets import DatasetSpecError, image_transform, load_image_dataset
from dia_diffusion.models.objective import prediction_target
from dia_diffusion.pipelines.sampling import load_pipeline

DEFAULT_BANDS = 5
DEFAULT_PER_BAND = 2
DEFAULT_NUM_IMAGES = 2000


def band_timesteps(num_train_timesteps: int, bands: int, per_band: int) -> list[list[int]]:
    """`per_band` evenly spaced timesteps in each of `bands` equal bands; e.g. 1000, 5, 2 -> [[50, 150], ...]."""
    width = num_train_timesteps / bands
    return [
        [int(band * width + (index + 0.5) * width / per_band) for index in range(per_band)]
        for band in range(bands)
    ]


def fixed_noise(seed: int, indices: Sequence[int], count: int, shape: Sequence[int]) -> torch.Tensor:
    """[len(indices), count, *shape] standard normal noise; image j's noise depends only on (seed, j)."""
    return torch.stack(
        [
            torch.from_numpy(
                np.random.default_rng([seed, index]).standard_normal((count, *shape), np.float32)
            )
            for index in indices
        ]
    )


@torch.no_grad()
def heldout_loss(
    unet: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    images: torch.Tensor,
    timesteps_by_band: list[list[int]],
    seed: int,
    batch_size: int = 250,
    labels: torch.Tensor | None = None,
) -> dict:
    """The mean squared error of `unet`'s prediction on `images` ([N, C, H, W] in [-1, 1]), per timestep, per band
    and overall (the mean of the bands, which hold the same number of timesteps). A class-conditional UNet is given
    each image's true class (`labels` [N]): the loss it was trained on, without the dropped labels."""
    timesteps = [timestep for band in timesteps_by_band for timestep in band]
    device = next(unet.parameters()).device
    squared_errors = torch.zeros(len(timesteps), dtype=torch.float64)
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, len(images), batch_size):
            clean = images[start : start + batch_size].to(device)
            conditioning = (
                {} if labels is None else {"class_labels": labels[start : start + batch_size].to(device)}
            )
            indices = range(start, start + len(clean))
            noise = fixed_noise(seed, indices, len(timesteps), clean.shape[1:]).to(device)
            for position, timestep in enumerate(timesteps):
                t = torch.full((len(clean),), timestep, dtype=torch.long, device=device)
                noisy = noise_scheduler.add_noise(clean, noise[:, position], t)
                target = prediction_target(noise_scheduler, clean, noise[:, position], t)
                prediction = unet(noisy, t, **conditioning).sample
                error = F.mse_loss(prediction.float(), target.float(), reduction="sum")
                squared_errors[position] += error.double().cpu()
    finally:
        unet.train(was_training)
    per_timestep = (squared_errors / images[0].numel() / len(images)).tolist()
    by_timestep = dict(zip(timesteps, per_timestep))
    width = noise_scheduler.config.num_train_timesteps / len(timesteps_by_band)
    per_band = [
        {
            "band": [round(index * width), round((index + 1) * width)],
            "timesteps": band,
            "loss": float(np.mean([by_timestep[timestep] for timestep in band])),
        }
        for index, band in enumerate(timesteps_by_band)
    ]
    return {
        "heldout_loss": float(np.mean([row["loss"] for row in per_band])),
        "per_band": per_band,
        "per_timestep": {str(timestep): loss for timestep, loss in by_timestep.items()},
    }


def dataset_images(
    spec: str, split: str, count: int, resolution: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first `count` images of a split at the model's resolution and channels, in [-1, 1], and their labels
    (None where the dataset has none)."""
    dataset = load_image_dataset(spec, split)
    transform = image_transform(resolution, channels, random_flip=False)
    chosen = dataset.select(range(min(count, len(dataset))))
    labels = torch.tensor(chosen["label"]) if "label" in chosen.column_names else None
    return torch.stack([transform(image) for image in chosen["image"]]), labels


def evaluate(args: argparse.Namespace) -> dict:
    pipeline = load_pipeline(args.model, scheduler="ddpm")
    unet, noise_scheduler = pipeline.unet, pipeline.scheduler
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unet.to(device)
    resolution = unet.config.sample_size
    resolution = resolution[0] if isinstance(resolution, (list, tuple)) else resolution
    images, labels = dataset_images(
        args.dataset, args.split, args.num_images, resolution, unet.config.in_channels
    )
    conditional = bool(unet.config.get("num_class_embeds"))
    if conditional and labels is None:
        raise DatasetSpecError(f"--dataset {args.dataset!r} has no labels for the class-conditional model")
    bands = band_timesteps(noise_scheduler.config.num_train_timesteps, args.bands, args.per_band)
    result = heldout_loss(
        unet, noise_scheduler, images, bands, args.seed, args.batch_size, labels if conditional else None
    )
    return {
        **result,
        "model": str(args.model),
        "dataset": args.dataset,
        "split": args.split,
        "num_images": len(images),
        "seed": args.seed,
        "prediction_type": noise_scheduler.config.prediction_type,
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "heldout-loss",
        help="the denoising loss on held-out images at fixed timesteps and noise (for paired comparisons)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a trained pipeline folder")
    parser.add_argument("--dataset", required=True, help="a dataset spec, e.g. fashion_mnist")
    parser.add_argument("--split", default="test", help="a split the model did not train on (default: test)")
    parser.add_argument(
        "--num_images", type=int, default=DEFAULT_NUM_IMAGES, help="the split's first N images"
    )
    parser.add_argument("--bands", type=int, default=DEFAULT_BANDS, help="equal timestep bands")
    parser.add_argument("--per_band", type=int, default=DEFAULT_PER_BAND, help="timesteps evaluated per band")
    parser.add_argument("--seed", type=int, default=0, help="image j's noise is drawn from (seed, j)")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("num_images", "bands", "per_band", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    result = evaluate(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
