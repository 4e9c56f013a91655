"""FastDropout: torch's dropout semantics with a byte-drawn mask."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechlm.speech_io.fast_dropout import FastDropout, drop_levels, use_fast_dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_it_drops_p_rounded_to_128ths_and_keeps_the_mean(dtype):
    torch.manual_seed(0)
    dropout = FastDropout(0.1).train()
    assert dropout.p == 13 / 128  # what it drops, not what was asked
    x = torch.ones(400, 1000, dtype=dtype)
    y = dropout(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert abs((y == 0).float().mean().item() - 13 / 128) < 0.001
    assert abs(y.float().mean().item() - 1.0) < 0.01  # the kept values scaled by 1 / (1 - p)
    values = torch.unique(y.float()).tolist()
    assert values[0] == 0.0 and len(values) == 2
    assert values[1] == pytest.approx(128 / 115, rel=1e-6 if dtype == torch.float32 else 1e-2)


def test_a_small_or_large_p_keeps_some_dropout_and_p_set_later_takes_effect():
    assert [drop_levels(p) for p in (0.0, 0.001, 0.5, 0.999, 1.0)] == [0, 1, 64, 127, 128]
    dropout = FastDropout(0.001).train()
    assert dropout.p == 1 / 128
    dropout.p = 0.5
    torch.manual_seed(0)
    assert abs((dropout(torch.ones(100000)) == 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(FastDropout(1.0).train()(torch.ones(3)), torch.zeros(3))


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
    assert len(dropouts) == 6 and all(type(m) is FastDropout and m.p == 26 / 128 for m in dropouts)
    assert all(m.dropout == 0.2 for m in layer.modules() if isinstance(m, nn.MultiheadAttention))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # no weights added or moved
    layer.train()(torch.randn(2, 7, 16)).sum().backward()


def test_the_speech_decoder_trains_with_fast_dropout():
    from speechlm.speech_io.speech_decoder import SpeechDecoder, SpeechDecoderConfig

    decoder = SpeechDecoder(SpeechDecoderConfig(codebook_size=8, vocabulary=["a", "b"], hidden_size=16,
                                                num_layers=1, num_heads=2, dropout=0.1, duration_predictor=True))
    assert sum(type(m) is FastDropout for m in decoder.modules()) == 4  # 3 in the layer, 1 in the predictor
    assert not any(type(m) is nn.Dropout for m in decoder.modules())
    torch.manual_seed(0)
    positions = torch.tensor([[2, 2, 3, 3, 2]])
    decoder.train()(positions).sum().backward()
    assert decoder.embed.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(decoder.eval()(positions), decoder(positions))  # no dropout in eval mode
