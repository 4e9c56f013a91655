"""Length-grouped batching: batches of similar lengths, so that little of a batch is padding.

transformers 5 dropped ``group_by_length``; its mega-batch algorithm lives on as
``trainer_pt_utils.get_length_grouped_indices``, which we drive with our own seeded generator: shuffle,
cut into mega-batches of ``mega_batch_mult * batch_size``, sort each by length, longest batch first.
The order depends only on ``seed`` and the epoch, so every rank draws the same order (accelerate then
hands each rank its own batches) and a resumed run skips into the very same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from transformers.trainer_pt_utils import get_length_grouped_indices


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    def __init__(self, lengths: Sequence[int], batch_size: int, *, seed: int = 0, mega_batch_mult: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, self.mega_batch_mult, generator))


def padding_fraction(lengths: Sequence[int], order: Sequence[int], batch_size: int) -> float:
    """Share of padded positions when ``order`` is cut into batches padded to their longest row."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start:start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch) - sum(batch)
    return padded / max(real + padded, 1)
