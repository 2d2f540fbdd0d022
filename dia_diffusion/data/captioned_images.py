"""Captioned images as text-to-image training items: the image resized, cropped and maybe flipped, and the caption's
token ids; or, once encoded (`--cache_latents`), the VAE's latent distribution and the text encoder's output.

A random crop or flip drawn from the global RNG inside a dataset would be drawn while accelerate pre-fetches the next
batch, one batch ahead of the checkpoint, and a resumed run would see other crops. So every random choice of an item
(crop position, flip, which of several captions) comes from a generator seeded with (seed, epoch, index): a pure
function of where the run is, like the data order (`training/data_order.py`), whatever the workers or pre-fetching.
"""

from collections.abc import Callable

import datasets
import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from dia_diffusion.data.image_datasets import DatasetSpecError
from dia_diffusion.data.image_modes import UnsupportedImageError, model_image


class CaptionedImages(Dataset):
    """Items `{"pixel_values": float32 [3, R, R] in [-1, 1], "input_ids": long [L]}` from a dataset with "image" and
    "text" columns. The image's shorter side is resized to R, then cut to R x R at the centre (`center_crop`) or at
    a random place, and flipped left-right with probability 1/2 when `random_flip`; a row with several captions
    gives one of them at random. `tokenize` turns a caption into its padded token ids."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        resolution: int,
        tokenize: Callable[[str], torch.Tensor],
        seed: int,
        center_crop: bool = True,
        random_flip: bool = False,
    ) -> None:
        self.dataset = dataset
        self.resolution = resolution
        self.tokenize = tokenize
        self.seed = seed
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """accelerate's data loader calls it at the start of every pass."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        # One read of the batch's rows (the DataLoader asks for a batch at once) costs less than a read per row.
        columns = self.dataset[indices]
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return [self.item(index, row) for index, row in zip(indices, rows)]

    def item(self, index: int, row: dict) -> dict[str, torch.Tensor]:
        draws = np.random.default_rng([self.seed, self.epoch, index])
        image = TF.resize(rgb(row["image"]), self.resolution, interpolation=TF.InterpolationMode.BILINEAR)
        width, height = image.size
        if self.center_crop:
            top, left = (height - self.resolution) // 2, (width - self.resolution) // 2
        else:
            top, left = (
                int(draws.integers(height - self.resolution + 1)),
                int(draws.integers(width - self.resolution + 1)),
            )
        image = TF.crop(image, top, left, self.resolution, self.resolution)
        if self.random_flip and draws.random() < 0.5:
            image = TF.hflip(image)
        pixels = TF.normalize(TF.to_tensor(image), [0.5] * 3, [0.5] * 3)
        return {"pixel_values": pixels, "input_ids": self.tokenize(one_caption(row["text"], draws))}


def rgb(image):
    try:
        return model_image(image, 3)
    except UnsupportedImageError as error:
        name = getattr(image, "filename", "")
        raise DatasetSpecError(f"image {f'file {name!r}' if name else 'of the dataset'} {error}") from None


def one_caption(text: str | list[str] | None, draws: np.random.Generator) -> str:
    if isinstance(text, str):
        return text
    if not text:
        return ""
    return text[int(draws.integers(len(text)))]


class EncodedItems(Dataset):
    """Items that are rows of tensors computed once (`--cache_latents`): `{name: tensor[index]}`."""

    def __init__(self, **columns: torch.Tensor) -> None:
        sizes = {len(values) for values in columns.values()}
        if len(sizes) != 1:
            raise ValueError(
                f"columns of different lengths: { {name: len(v) for name, v in columns.items()} }"
            )
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: values[index] for name, values in self.columns.items()}
