"""The order the training images are seen in: a pure function of (seed, epoch), so that a resumed run sees the images
an uninterrupted one would."""

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dia_diffusion.training.config import TrainingConfig


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation of the dataset every epoch, a pure function of (seed, epoch).

    Resuming therefore needs no sampler state, and every process draws the same permutation, which accelerate
    then deals out between them. accelerate calls `set_epoch` at the start of each pass.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.size).tolist()


def make_dataloader(items: Dataset, config: TrainingConfig) -> DataLoader:
    """Batches of the training `items` (a task's, see tasks.py) in the run's order."""
    # The flip happens in the loop, from the checkpointed RNG: a flip inside the transform would be drawn while
    # accelerate pre-fetches the next batch, one batch ahead of the checkpoint.
    return DataLoader(
        items,
        batch_size=config.train_batch_size,
        sampler=EpochShuffleSampler(len(items), config.seed),
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        # Seeds the worker processes, so a run with workers is as repeatable as one without.
        generator=torch.Generator().manual_seed(config.seed),
    )
