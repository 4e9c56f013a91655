"""The loop that trains the codec's small helpers (`vocoder_training.py`, `speech_decoder_training.py`): AdamW,
a linear warm-up, then a cosine by minutes (or steps, whichever ends first), so that the schedule ends where
training does on any machine; the loss kept as the mean of every 10 steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

LOSS_WINDOW = 10  # steps a reported loss is the mean of


class TimedSettings(Protocol):
    max_minutes: float
    max_steps: int | None
    learning_rate: float
    warmup_steps: int


@dataclass
class TrainingReport:
    steps: int
    minutes: float
    clips: int
    losses: list[float]  # the mean training loss of every `LOSS_WINDOW` steps
    loss: str  # what the losses measure, for the summary

    def summary(self) -> str:
        return (f"{self.steps} steps on {self.clips} clips in {self.minutes:.1f} min, {self.loss} "
                f"{self.losses[0]:.3f} -> {self.losses[-1]:.3f}")


def train_for_minutes(module: nn.Module, batches: Iterator[Any], loss_of: Callable[[Any], torch.Tensor],
                      settings: TimedSettings, *, clips: int, loss: str, clip_norm: float | None = None
                      ) -> TrainingReport:
    """Train ``module`` (in train mode; eval mode after) on ``batches`` (an endless iterator) by ``loss_of(batch)``
    until ``settings.max_minutes`` or ``settings.max_steps``. ``clip_norm``: clip the gradients' norm to it."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=settings.learning_rate, weight_decay=0.01)
    limit, started, step, losses, window = settings.max_minutes * 60, time.monotonic(), 0, [], []
    while time.monotonic() - started < limit and (settings.max_steps is None or step < settings.max_steps):
        progress = (time.monotonic() - started) / limit
        if settings.max_steps is not None:
            progress = max(progress, step / settings.max_steps)
        warmup = min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else 1.0
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        value = loss_of(next(batches))
        optimizer.zero_grad()
        value.backward()
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(module.parameters(), clip_norm)
        optimizer.step()
        step += 1
        window.append(value.item())
        if len(window) == LOSS_WINDOW:
            losses.append(float(np.mean(window)))
            window = []
    if window:
        losses.append(float(np.mean(window)))
    module.eval()
    return TrainingReport(step, (time.monotonic() - started) / 60, clips, losses, loss)
