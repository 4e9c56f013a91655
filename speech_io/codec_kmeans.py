"""K-means over frames: how `SpeechTokenizerCodec.fill_codebooks` seeds a fresh codec's RVQ codebooks and
`WhisperUnitCodec.fill_codebooks` draws its units."""

from __future__ import annotations

import torch


def nearest(samples: torch.Tensor, means: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """Index of the nearest mean for every sample, in blocks to bound memory."""
    norms = means.pow(2).sum(1)
    return torch.cat([(norms - 2 * part @ means.T).argmin(1) for part in samples.split(block)])


def kmeans(samples: torch.Tensor, size: int, iters: int, generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(means ``(size, D)``, cluster sizes) from a seeded subset and ``iters`` Lloyd rounds."""
    # Seed from distinct frames only: repeated frames (e.g. zero residuals of one-member clusters)
    # would make identical codes, whose ties float rounding then breaks either way.
    distinct = torch.unique(samples, dim=0)
    count = distinct.shape[0]
    if count >= size:
        means = distinct[torch.randperm(count, generator=generator)[:size]].clone()
    else:
        # Fewer distinct frames than codes: add jittered copies, well apart so that no two codes nearly tie.
        extra = distinct[torch.randint(count, (size - count,), generator=generator)]
        scale = samples.std(0).clamp_min(1e-3) * 0.5
        means = torch.cat([distinct, extra + scale * torch.randn(size - count, samples.shape[1], generator=generator)])
    sizes = torch.zeros(size)
    for _ in range(iters):
        assign = nearest(samples, means)
        sizes = torch.bincount(assign, minlength=size).float()
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        filled = sizes > 0
        means[filled] = sums[filled] / sizes[filled, None]  # empty clusters keep their seed
    return means, sizes
