"""The training images decoded once: the same floats as the per-image transform, through a DataLoader."""

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from dia_diffusion.data import decoded_images
from dia_diffusion.data.decoded_images import DecodedImages, training_pixels
from dia_diffusion.data.image_datasets import add_training_transform, load_image_dataset


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits").select(range(100))


def first_batch(items, indices) -> torch.Tensor:
    return next(iter(DataLoader(items, batch_size=len(indices), sampler=indices)))["pixel_values"]


@pytest.mark.parametrize(("resolution", "channels"), [(8, 1), (12, 3)])
def test_decoded_pixels_equal_the_per_image_transform_bit_for_bit(digits, resolution, channels):
    decoded = training_pixels(digits, resolution, channels)
    assert isinstance(decoded, DecodedImages) and len(decoded) == len(digits)
    assert decoded.pixels.dtype == torch.uint8
    indices = [97, 3, 3, 50, 0]
    batch = first_batch(decoded, indices)
    reference = first_batch(add_training_transform(digits, resolution, channels, random_flip=False), indices)
    assert batch.shape == (5, channels, resolution, resolution) and batch.dtype == torch.float32
    assert torch.equal(batch, reference)
    assert torch.equal(decoded[50]["pixel_values"], reference[3])


def test_a_dataset_too_large_for_memory_is_transformed_per_batch(digits, monkeypatch):
    # 100 grey 8x8 images are 6400 bytes of uint8 pixels.
    monkeypatch.setattr(decoded_images, "MAX_DECODED_BYTES", 6399)
    items = training_pixels(digits, 8, 1)
    assert isinstance(items, datasets.Dataset)
    assert torch.equal(
        first_batch(items, [1, 2]), first_batch(training_pixels(digits.select(range(3)), 8, 1), [1, 2])
    )
