"""Fixtures shared by several test files."""

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


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need CUDA; where there is none they are reported as skipped, not failed."""
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)
