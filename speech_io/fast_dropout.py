"""Dropout whose mask is drawn from random bytes: on a CPU, torch's Bernoulli masks cost more than the matrix
products of a small transformer's training step (BENCHMARKS.md, "Speech out"); eight mask values from each random
64-bit word cost a ninth of them in bfloat16."""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 128  # a mask value is one byte's low 7 bits: a drop probability is a whole number of 1/128ths


def drop_levels(p: float) -> int:
    """The 1/128ths of values dropped for a drop probability ``p``: the nearest, but at least one for any p > 0 and
    at most 127 for any p < 1 (so a small dropout is never silently none, nor a large one all)."""
    levels = round(p * LEVELS)
    return 0 if p <= 0 else LEVELS if p >= 1 else min(max(levels, 1), LEVELS - 1)


class FastDropout(nn.Dropout):
    """`nn.Dropout` with ``p`` rounded to a multiple of 1/128 (`drop_levels`; ``p`` reads the rounded value), its
    mask from random bytes; the kept values are scaled by ``1 / (1 - p)`` as torch's are, and in eval mode it
    passes its input through."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(drop_levels(p) / LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threshold = drop_levels(self.p)  # from p here, so a p set later (a schedule) takes effect
        if not self.training or threshold == 0:
            return x
        if threshold == LEVELS:
            return x * 0
        count = x.numel()
        # random_() fills an int64 with [0, 2**63): every byte's low 7 bits are uniform (the top byte's 8th is not)
        words = torch.empty((count + 7) // 8, dtype=torch.int64, device=x.device).random_()
        keep = (words.view(torch.uint8)[:count].view(x.shape) & (LEVELS - 1)) >= threshold
        return x * keep * (LEVELS / (LEVELS - threshold))


def use_fast_dropout(module: nn.Module) -> nn.Module:
    """Replace every `nn.Dropout` inside ``module`` by a `FastDropout` of the same ``p`` (attention's own dropout,
    inside `nn.MultiheadAttention`, and an in-place one stay torch's); returns ``module``."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Dropout and not child.inplace:
            setattr(module, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return module
