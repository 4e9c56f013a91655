"""Projectors: Whisper encoder frames (50 Hz) -> LM embeddings, fewer of them.

Each variant stacks ``S`` neighbouring frames (``B, T, C -> B, ceil(T/S), C*S``) and maps the stack to
the LM width. Variants register by name; ``SpeechLMProjectorConfig.projector_type`` picks one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from speechlm.speech_io.constants import stacked_frames

PROJECTORS: dict[str, type[nn.Module]] = {}


def register_projector(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        PROJECTORS[name] = cls
        return cls

    return register


def stack_frames(frames: torch.Tensor, stack_factor: int) -> torch.Tensor:
    """``B, T, C -> B, ceil(T/S), C*S``; a partial last group is zero-padded (no audio is dropped)."""
    batch, length, channels = frames.shape
    stacked_length = stacked_frames(length, stack_factor)
    pad = stacked_length * stack_factor - length
    if pad:
        frames = F.pad(frames, (0, 0, 0, pad))
    return frames.reshape(batch, stacked_length, channels * stack_factor)


@register_projector("mlp")
class StackingMLPProjector(nn.Module):
    """Frame stacking + 2-layer MLP, as LLaMA-Omni: ``B, T, C -> B, T/S, C*S -> B, T/S, H -> B, T/S, D``."""

    def __init__(self, in_features: int, out_features: int, *, stack_factor: int, hidden_size: int):
        super().__init__()
        self.stack_factor = stack_factor
        self.linear_1 = nn.Linear(in_features * stack_factor, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, out_features)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        stacked = stack_frames(frames, self.stack_factor)
        return self.linear_2(F.relu(self.linear_1(stacked)))


@register_projector("swiglu")
class StackingSwiGLUProjector(nn.Module):
    """Frame stacking + RMSNorm + SwiGLU MLP, as Ultravox: ``B, T, C -> B, T/S, C*S -> B, T/S, D``.

    The stacked input and the SwiGLU hidden are RMS-normalised (Ultravox's ``ln_pre``/``ln_mid``), which
    is why it aligns faster than `StackingMLPProjector` (held-out loss after 200 steps of the quick start's
    ASR, frozen SmolLM2-135M: 0.74 vs 1.21 at learning rate 1e-3, 0.48 vs 1.03 at 3e-3).
    """

    def __init__(self, in_features: int, out_features: int, *, stack_factor: int, hidden_size: int):
        super().__init__()
        self.stack_factor = stack_factor
        self.norm_in = nn.RMSNorm(in_features * stack_factor)
        self.linear_1 = nn.Linear(in_features * stack_factor, 2 * hidden_size, bias=False)
        self.norm_mid = nn.RMSNorm(hidden_size)
        self.linear_2 = nn.Linear(hidden_size, out_features, bias=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        stacked = self.norm_in(stack_frames(frames, self.stack_factor))
        gate, value = self.linear_1(stacked).chunk(2, dim=-1)
        return self.linear_2(self.norm_mid(F.silu(gate) * value))


def build_projector(projector_type: str, in_features: int, out_features: int, *, stack_factor: int,
                    hidden_size: int) -> nn.Module:
    return PROJECTORS[projector_type](in_features, out_features, stack_factor=stack_factor, hidden_size=hidden_size)
