"""Image files and dataset errors for the data tests: pixels, PNGs, and the one-line message a bad spec gives."""

import numpy as np
import PIL.Image
import pytest

from dia_diffusion.data.image_datasets import DatasetSpecError, load_image_dataset


def spec_error(spec: str, **kwargs) -> str:
    """Loads a spec that must fail and returns its message, which must be a single line."""
    with pytest.raises(DatasetSpecError) as caught:
        load_image_dataset(spec, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write_png(path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def random_pixels(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
