"""Fixtures shared by several test files."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

# An 8x8 grey UNet small enough for sampling and metric tests to run in well under a second.
TINY_GREY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)


# 24 images / batch 4 = 6 batches per epoch in the training tests.
TINY_DATASET_SIZE = 24


def save_tiny_dataset(folder: Path) -> str:
    from dia_diffusion.data import load_image_dataset

    load_image_dataset("digits").select(range(TINY_DATASET_SIZE)).save_to_disk(str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> str:
    """The first 24 scikit-learn digits as a `save_to_disk` folder: a dataset that trains in a fraction of a second."""
    return save_tiny_dataset(tmp_path_factory.mktemp("data") / "digits24")


@pytest.fixture
def isolated_run():
    """Fresh accelerate singletons for each training run in this process, and one thread: the tiny test models gain
    nothing from a second thread, and oversubscribed threads slow them down many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
