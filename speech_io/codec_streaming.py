"""Streamed decode for the SpeechTokenizer codec: the decoder LSTM's state carries from chunk to chunk, and
the non-causal convolutions around it re-run with exactly as much left context and lookahead as their
receptive field needs, so the chunks concatenate to the whole decode (see `speechlm.speech_io.codec`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from speechlm.speech_io.codec_batching import split_at_lstm
from speechlm.speech_io.codec_upstream import INSTALL_HINT, upstream

if TYPE_CHECKING:
    from speechlm.speech_io.codec import SpeechTokenizerCodec


@dataclass(frozen=True)
class StreamMargins:
    """Receptive field of the decoder around its LSTM, in frames: what a chunk needs on each side."""

    pre_left: int
    pre_right: int
    post_left: int
    post_right: int

    @staticmethod
    def of(decoder: nn.Sequential) -> StreamMargins:
        pre, lstm, post = split_at_lstm(decoder)
        assert not lstm.bidirectional, "streaming carries a unidirectional decoder LSTM's state"
        pre_left, pre_right, _ = reach(pre, 1.0)
        post_left, post_right, _ = reach(post, 1.0)
        return StreamMargins(math.ceil(pre_left), math.ceil(pre_right),
                              math.ceil(post_left) + 1, math.ceil(post_right) + 1)


def reach(module: nn.Module, frames_per_sample: float) -> tuple[float, float, float]:
    """(left, right) reach of ``module`` in frames, and the frames-per-sample of its output.

    Upper bounds: exact for stride-1 convolutions, generous by one input sample for transposed ones.
    """
    up = upstream()
    if isinstance(module, nn.Sequential):
        left = right = 0.0
        for child in module:
            child_left, child_right, frames_per_sample = reach(child, frames_per_sample)
            left, right = left + child_left, right + child_right
        return left, right, frames_per_sample
    if isinstance(module, up["SConv1d"]):
        conv = module.conv.conv
        assert conv.stride[0] == 1, "the decoder's convolutions do not downsample"
        total = (conv.kernel_size[0] - 1) * conv.dilation[0]
        left, right = (total, 0) if module.causal else (total - total // 2, total // 2)
        return left * frames_per_sample, right * frames_per_sample, frames_per_sample
    if isinstance(module, up["SConvTranspose1d"]):
        kernel, stride = module.convtr.convtr.kernel_size[0], module.convtr.convtr.stride[0]
        span = (kernel / stride + 1) * frames_per_sample
        return span, span, frames_per_sample / stride
    if isinstance(module, up["SEANetResnetBlock"]):
        block_left, block_right, _ = reach(module.block, frames_per_sample)
        short_left, short_right, _ = reach(module.shortcut, frames_per_sample)
        return max(block_left, short_left), max(block_right, short_right), frames_per_sample
    if isinstance(module, (nn.Identity, nn.ELU, up["Snake1d"])):
        return 0.0, 0.0, frames_per_sample
    raise TypeError(f"unexpected {type(module).__name__} in SpeechTokenizer's decoder; speechtokenizer's "
                    f"layout changed (expected 1.0.1: {INSTALL_HINT})")


def appended_units(units: torch.Tensor | None, item: Any, index: int, check_units) -> torch.Tensor:
    """A stream's units ``(k, N)`` so far (None or empty at its start) with ``item`` appended: an int (one
    layer-1 unit), a 1-D array or a ``(k, t)`` array, checked by ``check_units``; k is fixed for the stream."""
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        item = [int(item)]
    new = check_units(item, f"streamed units item {index}")
    if units is None or units.shape[1] == 0:
        return new
    if new.shape[0] != units.shape[0]:
        raise ValueError(f"streamed units item {index} has {new.shape[0]} layers but the stream began "
                         f"with {units.shape[0]}; expected the same number throughout")
    return torch.cat([units, new], dim=1)


class UnitStream:
    """State of one streamed decode: units so far, the LSTM's carried state, frames already emitted."""

    def __init__(self, codec: SpeechTokenizerCodec, chunk: int) -> None:
        self.codec = codec
        self.chunk = chunk
        decoder = codec.model.decoder.model
        self.margins = StreamMargins.of(decoder)
        self.pre, self.lstm, self.post = split_at_lstm(decoder)
        self.units = torch.zeros(0, 0, dtype=torch.long)  # k, N
        self.lstm_state: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lstm_out = torch.zeros(1, self.lstm.lstm.hidden_size, 0)  # 1, C, frames [offset, lstm_done)
        self.offset = 0  # absolute frame of lstm_out[..., 0]
        self.lstm_done = 0  # frames whose LSTM output is final
        self.emitted = 0  # frames whose audio has been yielded

    def run(self, source: Iterable[Any]) -> Iterator[np.ndarray]:
        for index, item in enumerate(source):
            self._append(item, index)
            ready = self.units.shape[1] - self.margins.pre_right - self.margins.post_right
            if ready - self.emitted >= self.chunk:
                yield self._advance(final=False)
        if self.units.shape[1] > self.emitted:
            yield self._advance(final=True)

    def _append(self, item: Any, index: int) -> None:
        self.units = appended_units(self.units, item, index, self.codec._check_units)

    @torch.inference_mode()
    def _advance(self, *, final: bool) -> np.ndarray:
        """Run the LSTM as far as its inputs are final, then emit every frame whose audio is final."""
        margins, total, hop = self.margins, self.units.shape[1], self.codec.hop_length
        target = total if final else total - margins.pre_right
        if target > self.lstm_done:
            start = max(0, self.lstm_done - margins.pre_left)
            latent = self.codec.model.quantizer.decode(self.units[:, None, start:total])  # 1, D, frames
            hidden = self.pre(latent)[..., self.lstm_done - start: target - start]
            steps = hidden.permute(2, 0, 1)  # T, 1, C
            out, self.lstm_state = self.lstm.lstm(steps, self.lstm_state)
            if self.lstm.skip:
                out = out + steps
            self.lstm_out = torch.cat([self.lstm_out, out.permute(1, 2, 0)], dim=-1)
            self.lstm_done = target
        end = self.lstm_done if final else self.lstm_done - margins.post_right
        start = max(0, self.emitted - margins.post_left)
        wav = self.post(self.lstm_out[..., start - self.offset: self.lstm_done - self.offset])  # 1, 1, samples
        piece = wav[0, 0, (self.emitted - start) * hop: (end - start) * hop]
        self.emitted = end
        # LSTM outputs left of the next window are never read again.
        drop = max(0, self.emitted - margins.post_left - self.offset)
        self.lstm_out, self.offset = self.lstm_out[..., drop:], self.offset + drop
        return piece.numpy().astype(np.float32)
