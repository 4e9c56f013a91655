"""FastDropout: torch's dropout semantics with a byte-drawn mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechlm.speech_io.fast_dropout import FastDropout, use_fast_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_drops_about_p_and_keeps_the_mean(dtype):
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    x = torch.ones(400, 1000, dtype=dtype)
    y = dropout(x)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 13 / 128) < 0.003  # p rounded to 13/128
    assert abs(y.float().mean().item() - 1.0) < 0.01  # the kept values scaled by 1 / (1 - p)
    values = torch.unique(y.float()).tolist()
    assert values[0] == 0.0 and len(values) == 2 and values[1] == pytest.approx(128 / 115, rel=1e-2)


def test_every_position_is_dropped_alike():
    # each byte of the random words (the top byte's too) draws a mask value: no position is dropped more
    torch.manual_seed(0)
    y = FastDropout(0.25).train()(torch.ones(20000, 8))
    per_position = (y == 0).float().mean(0)
    assert torch.allclose(per_position, torch.full((8,), 0.25), atol=0.015)


def test_eval_mode_and_zero_p_pass_the_input_through_and_it_is_seeded():
    x = torch.randn(3, 5, requires_grad=True)
    assert FastDropout(0.3).eval()(x) is x and FastDropout(0.0).train()(x) is x
    torch.manual_seed(1)
    a = FastDropout(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, FastDropout(0.3).train()(x))
    a.sum().backward()  # gradients flow through the kept values only
    assert torch.equal(x.grad == 0, a == 0)


def test_use_fast_dropout_replaces_every_dropout_but_attentions_own():
    layer = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True), 2,
                                  enable_nested_tensor=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    use_fast_dropout(layer)
    dropouts = [m for m in layer.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 6 and all(type(m) is FastDropout and m.p == 0.2 for m in dropouts)
    assert all(m.dropout == 0.2 for m in layer.modules() if isinstance(m, nn.MultiheadAttention))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # no weights added or moved
    layer.train()(torch.randn(2, 7, 16)).sum().backward()
