"""Exact batching at 50 Hz for the SpeechTokenizer codec: an item's result is bit-for-bit the same alone
or in a padded batch (see `speechlm.speech_io.codec`). Each item is padded before a convolution as upstream
pads it alone, and the bidirectional LSTM runs its backward direction over each item's own frames reversed,
so padding never reaches a real frame."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from speechlm.speech_io.codec_upstream import INSTALL_HINT, upstream


def split_at_lstm(seanet: nn.Sequential) -> tuple[nn.Sequential, nn.Module, nn.Sequential]:
    """(layers before, the SLSTM, layers after) of a SEANet encoder's or decoder's ``model``."""
    lstm_type = upstream()["SLSTM"]
    where = [i for i, module in enumerate(seanet) if isinstance(module, lstm_type)]
    if len(where) != 1:
        raise TypeError(f"expected one SLSTM in SpeechTokenizer's SEANet, found {len(where)}; speechtokenizer's "
                        f"layout changed (expected 1.0.1: {INSTALL_HINT})")
    return seanet[: where[0]], seanet[where[0]], seanet[where[0] + 1:]


def pad_rows(items: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """``(1, C, T_i)`` tensors as one right-padded ``(B, C, T_max)`` batch of at least two rows.

    A one-row batch would send the LSTM's matmuls down the matrix-vector path, which rounds
    differently; a zero row keeps an item alone bit-identical to the same item in a batch.
    """
    lengths = [item.shape[-1] for item in items]
    batch = items[0].new_zeros(max(len(items), 2), items[0].shape[1], max(lengths))
    for row, item in enumerate(items):
        batch[row, :, : lengths[row]] = item[0]
    return batch, lengths + [1] * (batch.shape[0] - len(items))


def run_with_lengths(module: nn.Module, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``module(x)`` for a right-padded batch ``(B, C, T)``, as if each item ran alone.

    For the stacks next to the LSTM: stride-1 convolutions and elementwise activations. Returns the
    output (junk past each length) and each item's output length.
    """
    up = upstream()
    if isinstance(module, nn.Sequential):
        for child in module:
            x, lengths = run_with_lengths(child, x, lengths)
        return x, lengths
    if isinstance(module, up["SConv1d"]):
        return conv_with_lengths(module, x, lengths, up)
    if isinstance(module, (nn.Identity, nn.ELU, up["Snake1d"])):  # elementwise: padding cannot leak
        return module(x), lengths
    raise TypeError(f"unexpected {type(module).__name__} next to SpeechTokenizer's LSTM; speechtokenizer's "
                    f"layout changed (expected 1.0.1: {INSTALL_HINT})")


def conv_with_lengths(module: nn.Module, x: torch.Tensor, lengths: list[int], up: dict[str, Any]
                       ) -> tuple[torch.Tensor, list[int]]:
    """SConv1d per item: each item padded as upstream pads it alone, then one batched convolution."""
    conv = module.conv.conv
    kernel, stride, dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
    padding_total = (kernel - 1) * dilation - (stride - 1)
    if padding_total == 0 and stride == 1:
        return module.conv(x), lengths  # a pointwise conv: nothing crosses item boundaries
    pieces = []
    for row, length in enumerate(lengths):
        item = x[row:row + 1, :, :length]
        extra = up["extra_padding"](item, kernel, stride, padding_total)
        if module.causal:
            paddings = (padding_total, extra)
        else:
            right = padding_total // 2
            paddings = (padding_total - right, right + extra)
        pieces.append(up["pad1d"](item, paddings, mode=module.pad_mode))
    padded = x.new_zeros(x.shape[0], x.shape[1], max(p.shape[-1] for p in pieces))
    for row, piece in enumerate(pieces):
        padded[row, :, : piece.shape[-1]] = piece[0]
    span = dilation * (kernel - 1) + 1
    return module.conv(padded), [(p.shape[-1] - span) // stride + 1 for p in pieces]


class ExactLSTM:
    """An SLSTM over a right-padded batch, each item's frames unaffected by the padding.

    A unidirectional LSTM never looks right, so padding at the end is harmless. A bidirectional one
    is run layer by layer and direction by direction (one-direction LSTMs sharing upstream's weight
    tensors): the backward direction reads each item's own frames reversed, so it starts at the
    item's end rather than at the padding.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        lstm = module.lstm
        self.directions: list[tuple[nn.LSTM, nn.LSTM]] = []
        if module.bidirectional:
            for layer in range(lstm.num_layers):
                self.directions.append((self._one_direction(lstm, layer, ""),
                                        self._one_direction(lstm, layer, "_reverse")))

    @staticmethod
    def _one_direction(lstm: nn.LSTM, layer: int, suffix: str) -> nn.LSTM:
        weight_ih = getattr(lstm, f"weight_ih_l{layer}{suffix}")
        single = nn.LSTM(weight_ih.shape[1], lstm.hidden_size, 1, bias=lstm.bias)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") if lstm.bias else ("weight_ih", "weight_hh"):
            setattr(single, f"{name}_l0", getattr(lstm, f"{name}_l{layer}{suffix}"))  # shared, not copied
        return single.eval()

    def __call__(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        steps = x.permute(2, 0, 1)  # T, B, C
        if self.module.bidirectional:
            out = steps
            for forward, backward in self.directions:
                ahead, _ = forward(out)
                behind, _ = backward(reverse_each(out, lengths))
                out = torch.cat([ahead, reverse_each(behind, lengths)], dim=-1)
            steps = steps.repeat(1, 1, 2)  # upstream's skip for a doubled width
        else:
            out, _ = self.module.lstm(steps)
        if self.module.skip:
            out = out + steps
        return out.permute(1, 2, 0)  # B, C, T


def reverse_each(steps: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Reverse each item's first ``length`` steps of a ``(T, B, C)`` batch; padding stays in place."""
    time = torch.arange(steps.shape[0])[:, None]  # T, 1
    ends = torch.tensor(lengths)[None, :]  # 1, B
    index = torch.where(time < ends, ends - 1 - time, time)  # T, B
    return steps.gather(0, index[:, :, None].expand_as(steps))
