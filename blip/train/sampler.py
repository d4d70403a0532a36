"""Global batches split over ranks: every rank sees the same steps, each its own part of a batch.

``training.batch_size`` is the *global* batch: each epoch the training set is permuted (a
generator seeded from (training.seed, member, epoch), so every rank draws the same order and
a resumed run the order of the uninterrupted one), cut into consecutive global batches, and
rank r of W takes the structures at positions r, r + W, r + 2W, ... of each. Every structure
is used exactly once per epoch on exactly one rank. A rank left without a structure (a last
batch smaller than W) gets a placeholder (the batch's first structure) with weight 0, so that
every rank runs the same sequence of passes and collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Step:
    global_indices: np.ndarray  # the global batch (dataset indices, in batch order)
    positions: list  # positions within the global batch of this rank's structures
    indices: list  # dataset indices of this rank's structures (the placeholder when weight is 0)
    weight: float  # 1, or 0 for a placeholder


class GlobalBatchSampler:
    """Steps of one epoch for one rank; also a ``batch_sampler`` (lists of indices) for a DataLoader."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0, member: int = 0):
        self.n, self.batch_size, self.rank, self.world = int(n), int(batch_size), int(rank), int(world)
        self.seed, self.member, self.epoch = int(seed), int(member), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.member, self.epoch]).permutation(self.n)

    def steps(self) -> list[Step]:
        order, out = self.order(), []
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            positions = list(range(self.rank, len(batch), self.world))
            if positions:
                out.append(Step(batch, positions, [int(batch[p]) for p in positions], 1.0))
            else:
                out.append(Step(batch, [0], [int(batch[0])], 0.0))
        return out

    def __iter__(self):
        return iter([s.indices for s in self.steps()])

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices r, r + W, ... of ``n`` items: rank r's part of an evaluation pass."""
    return list(range(rank, n, world))
