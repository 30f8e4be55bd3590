"""A resumable training sampler whose augmentation randomness is tied to each sample.

Each epoch is a permutation drawn from ``(seed, epoch)``; each drawn item carries its own seed,
used to seed the transforms. The data a step sees therefore depends only on the seed and the
position, not on the number of loader workers or on whether training was interrupted: resuming
from ``(epoch, batch)`` replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler


def _mix(*xs: int) -> int:
    # A cheap, well-spread 63-bit hash of a few integers (splitmix64 steps).
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` for one epoch, starting at ``start`` items in.

    With ``world > 1`` processes the epoch's one shuffled order is shared: each step consumes
    ``world * batch_size`` consecutive positions of it and ``rank`` takes its ``batch_size``
    slice, so the processes together see at each step what one process with batch
    ``world * batch_size`` sees, and each sample's seed depends on its position in the epoch,
    not on the rank. Only whole global batches are yielded then (every rank takes as many
    steps); ``start`` counts global positions. With ``accumulate`` batches per optimiser step,
    only whole steps' batches are yielded (an epoch's last, incomplete step is left out, as a
    loader's ``drop_last`` leaves out an incomplete batch).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch: int = 0,
        start: int = 0,
        *,
        rank: int = 0,
        world: int = 1,
        batch_size: int = 1,
        accumulate: int = 1,
    ) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.accumulate = accumulate

    def positions(self) -> list[int]:
        """This rank's positions in the epoch's order, in the order it takes them."""
        if self.world == 1 and self.accumulate == 1:
            return list(range(self.start, self.n))
        step = self.world * self.batch_size
        first = self.start + self.rank * self.batch_size
        steps = max(0, (self.n - self.start) // step)
        steps -= steps % self.accumulate
        return [first + k * step + j for k in range(steps) for j in range(self.batch_size)]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        for pos in self.positions():
            yield perm[pos], _mix(self.seed, self.epoch, pos)

    def __len__(self) -> int:
        return len(self.positions())


class SeededTransformDataset(Dataset):
    """Applies ``transforms`` to ``dataset[index]`` under a per-sample seed."""

    def __init__(self, dataset: Dataset, transforms: Callable) -> None:
        self.dataset, self.transforms = dataset, transforms

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        image, target = self.dataset[index]
        # Seed only the CPU generator (the transforms draw from it) and restore it afterwards.
        # torch.manual_seed would also queue a CUDA re-seed, which is slow and not undone here.
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(seed)
        try:
            return self.transforms(image, target)
        finally:
            gen.set_state(state)
