"""The training images decoded once, at start-up, into one uint8 tensor that every epoch then indexes.

Decoding, converting and resizing an image costs tens of microseconds, every epoch again: with a small UNet that is a
tenth of a CPU training step, and on a GPU it is the step's bottleneck. Kept as uint8, the whole of CIFAR-10 takes
150 MB. The [-1, 1] floats are computed per batch with the operations of torchvision's `ToTensor` and `Normalize`,
so they equal those of `data.image_transform` (without flip) bit for bit; a dataset too large for memory keeps the
per-image transform.
"""

import datasets
import torch
from torch.utils.data import Dataset

from dia_diffusion.data.image_datasets import add_training_transform, to_uint8_images

# Above this many bytes of uint8 pixels the images are decoded per batch instead.
MAX_DECODED_BYTES = 2 * 2**30
DECODE_CHUNK = 1024


class DecodedImages(Dataset):
    """Items `{"pixel_values": float32 [C, H, W] in [-1, 1]}` from uint8 pixels [N, C, H, W], with `"class_labels"`
    when the labels [N] are given."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.pixels = pixels
        self.labels = labels

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # One conversion for the whole batch; the DataLoader's collate stacks the rows back.
        values = to_unit_range(self.pixels[indices])
        if self.labels is None:
            return [{"pixel_values": row} for row in values]
        return [
            {"pixel_values": row, "class_labels": label} for row, label in zip(values, self.labels[indices])
        ]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> [-1, 1] float32 exactly as `ToTensor()` then `Normalize(0.5, 0.5)` compute it."""
    return pixels.to(torch.get_default_dtype()).div(255).sub(0.5).div(0.5)


def training_pixels(
    dataset: datasets.Dataset, resolution: int, channels: int, with_labels: bool = False
) -> Dataset:
    """The dataset's images (and, `with_labels`, its class ids) as training items: decoded once when they fit in
    memory, else per batch."""
    if len(dataset) * channels * resolution**2 > MAX_DECODED_BYTES:
        return add_training_transform(
            dataset, resolution, channels, random_flip=False, with_labels=with_labels
        )
    labels = torch.tensor(dataset["label"], dtype=torch.long) if with_labels else None
    images = dataset.select_columns("image")
    chunks = [
        to_uint8_images(images[start : start + DECODE_CHUNK]["image"], resolution, channels)
        for start in range(0, len(images), DECODE_CHUNK)
    ]
    return DecodedImages(torch.cat(chunks), labels)
