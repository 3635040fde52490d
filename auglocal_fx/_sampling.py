"""The order of the training data: each process's slice of each global batch."""

from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler

__all__ = ["GlobalBatchSampler"]


class GlobalBatchSampler(Sampler[List[int]]):
    """This process's slice of each global batch of a seeded per-epoch permutation."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int, seed: int):
        self.size, self.batch_size, self.rank, self.world, self.seed = size, batch_size, rank, world, seed
        self.epoch, self.start = 0, 0

    @property
    def steps(self) -> int:
        """Optimizer steps per epoch (an incomplete last batch is dropped if there is a full one)."""
        return max(1, self.size // self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=g).tolist()
        per_rank = self.batch_size // self.world
        for step in range(self.start, self.steps):
            batch = perm[step * self.batch_size:(step + 1) * self.batch_size]
            if len(batch) < self.batch_size:  # dataset smaller than one batch
                batch = (batch * (self.batch_size // max(1, len(batch)) + 1))[:self.batch_size]
            yield batch[self.rank * per_rank:(self.rank + 1) * per_rank]
