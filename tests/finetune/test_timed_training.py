"""The loop that trains the codec's helpers: its clock, its schedule and its precision."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from torch import nn

from speechlm.finetune import timed_training
from speechlm.finetune.timed_training import TimedTraining, train_for_minutes
from speechlm.speech_io.config_errors import ConfigError


def _fit_a_line(settings: TimedTraining) -> tuple[nn.Module, list[bool], object]:
    torch.manual_seed(0)
    module = nn.Linear(4, 1)
    inputs = torch.randn(64, 4)
    targets = inputs @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    autocast = []

    def loss_of(_batch) -> torch.Tensor:
        autocast.append(torch.is_autocast_enabled("cpu"))
        return (module(inputs) - targets).pow(2).mean()

    report = train_for_minutes(module, itertools.repeat(None), loss_of, settings, clips=64, loss="MSE")
    return module, autocast, report


@pytest.mark.parametrize("bf16", [False, True])
def test_it_learns_in_either_precision_and_keeps_float32_weights(bf16, monkeypatch):
    monkeypatch.setattr(timed_training, "native_bfloat16", lambda device: True)
    settings = TimedTraining(max_steps=60, learning_rate=0.1, warmup_steps=5, bf16=bf16)
    module, autocast, report = _fit_a_line(settings)
    assert report.steps == 60 and len(report.losses) == 6
    assert report.losses[-1] < 0.1 * report.losses[0]
    assert autocast == [bf16] * 60  # the forward (and the loss) ran under bfloat16 autocast, or not at all
    assert module.weight.dtype == torch.float32 and not module.training


def test_a_cpu_without_native_bfloat16_trains_in_float32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(timed_training, "native_bfloat16", lambda device: False)
    timed_training.warn_float32_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        _, autocast, _ = _fit_a_line(TimedTraining(max_steps=3, bf16=True))
    assert autocast == [False] * 3
    assert "no native bfloat16" in caplog.text and "bf16" in caplog.text


def test_settings_errors_name_every_field():
    with pytest.raises(ConfigError) as caught:
        TimedTraining(max_minutes=-1, batch_size=0, learning_rate=0, warmup_steps=-2, bf16="yes")
    assert [p.split("=")[0] for p in caught.value.problems] == ["max_minutes", "batch_size", "learning_rate",
                                                                 "warmup_steps", "bf16"]
