"""The loop that trains the codec's small helpers (`vocoder_training.py`, `speech_decoder_training.py`): AdamW,
a linear warm-up, then a cosine by minutes (or steps, whichever ends first), so that the schedule ends where
training does on any machine; bfloat16 autocast where the CPU has it natively (a minutes-bounded training
takes 1.4-1.9x the steps: BENCHMARKS.md); the loss kept as the mean of every 10 steps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from speechlm.adapters.audio_encoder import native_bfloat16, warn_float32_fallback
from speechlm.speech_io.config_errors import ConfigProblems

LOSS_WINDOW = 10  # steps a reported loss is the mean of


@dataclass
class TimedTraining:
    """The settings every minutes-bounded training of a codec helper has (`VocoderTraining`,
    `SpeechDecoderTraining` add what they train on)."""

    max_minutes: float = field(default=15.0, metadata={"help": "stop after this many minutes of steps"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many steps (first of the two)"})
    max_clips: int | None = field(default=None, metadata={"help": "clips of the manifests to train on (null: all)"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate (cosine decay by minutes)"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    bf16: bool = field(default=True, metadata={"help": "bfloat16 autocast where the CPU has native bfloat16 "
                                                       "(float32 elsewhere, with a warning); weights stay float32"})
    seed: int = field(default=0, metadata={"help": "example order and initialization"})
    what: ClassVar[str] = "training settings"  # how errors name these settings

    def __post_init__(self) -> None:
        self.problems().raise_if_any(self.what)

    def problems(self) -> ConfigProblems:
        """The settings' problems (a subclass adds its own fields')."""
        problems = ConfigProblems()
        problems.check(isinstance(self.max_minutes, (int, float)) and self.max_minutes > 0,
                       f"max_minutes={self.max_minutes!r} (expected a positive number)")
        problems.positive_integers(self, "batch_size")
        problems.positive_integers(self, "max_steps", "max_clips", optional=True)
        problems.check(isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0,
                       f"learning_rate={self.learning_rate!r} (expected a positive number)")
        problems.check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                       f"warmup_steps={self.warmup_steps!r} (expected a non-negative integer)")
        problems.check(isinstance(self.bf16, bool), f"bf16={self.bf16!r} (expected true or false)")
        return problems


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
                      settings: TimedTraining, *, clips: int, loss: str, clip_norm: float | None = None
                      ) -> TrainingReport:
    """Train ``module`` (on the CPU; in train mode, eval mode after) on ``batches`` (an endless iterator) by
    ``loss_of(batch)`` until ``settings.max_minutes`` or ``settings.max_steps``. ``clip_norm``: clip the gradients'
    norm to it. With ``settings.bf16`` the forward runs in bfloat16 autocast (softmax and losses in float32, as
    autocast keeps them)."""
    bf16 = settings.bf16 and native_bfloat16("cpu")
    if settings.bf16 and not bf16:
        warn_float32_fallback("bf16", "the training", "cpu")
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = loss_of(next(batches)).float()
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
