from __future__ import annotations

import pytest
import torch

from speechlm.adapters.projectors import PROJECTORS, build_projector, stack_frames


def test_stack_frames_groups_neighbours_and_zero_pads_the_tail():
    frames = torch.arange(1, 8, dtype=torch.float32).reshape(1, 7, 1)  # B=1, T=7, C=1
    stacked = stack_frames(frames, 3)
    assert stacked.shape == (1, 3, 3)
    assert stacked[0].tolist() == [[1, 2, 3], [4, 5, 6], [7, 0, 0]]


@pytest.mark.parametrize("name", sorted(PROJECTORS))
@pytest.mark.parametrize("length, stack, expected", [(10, 5, 2), (11, 5, 3), (3, 1, 3)])
def test_projector_shapes(name, length, stack, expected):
    projector = build_projector(name, 16, 24, stack_factor=stack, hidden_size=32)
    out = projector(torch.randn(2, length, 16))
    assert out.shape == (2, expected, 24)


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_projectors_learn(name):
    projector = build_projector(name, 8, 8, stack_factor=2, hidden_size=16)
    projector(torch.randn(1, 6, 8)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
