"""Fixtures shared by several test files."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


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
