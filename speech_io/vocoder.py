"""A vocoder for the codec's units, trained by the toolkit: units -> log-mel (a small convolutional network)
-> waveform (Griffin-Lim, `spectrogram.py`).

It decodes a codec without a trained decoder: whisper units (`whisper_units.py`, the quick start's: no decoder
at all) or a SpeechTokenizer built from a config (random weights: no published checkpoint installs offline).
The codec keeps its vocoders in its folder (``vocoder-rvq<k>/``) and decodes with them; a published
SpeechTokenizer checkpoint's decoder stays the one that decodes.

A unit enters as its codebook vector (the vocoder keeps a frozen copy of the codec's codebooks for the layers
it reads): codes near in the codec's latent space start near here, no row has to be learned for a code rare
in training, and a codec refilled since is refused. Learned embeddings of the same codes reached the same
held-out log-mel error in the same minutes (BENCHMARKS.md, "Speech out").

Shapes: units ``(B, k, T)`` at 50 Hz, k = ``num_layers`` -> summed codebook vectors ``(B, D, T)`` -> ``(B, H, T)``
-> upsampled to the spectrogram's frame rate ``(B, H, T * 320 / hop)`` -> dilated residual convolutions
-> log-mel ``(B, n_mels, T * 320 / hop)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechlm.speech_io.codec_streaming import appended_units
from speechlm.speech_io.config_errors import ConfigProblems, settings_from_dict
from speechlm.speech_io.saved_files import load_module, save_module
from speechlm.speech_io.spectrogram import MelSpectrogram, SpectrogramConfig

VOCODER_FOLDER_PATTERN = "vocoder-rvq*"  # a codec's folder keeps one vocoder per layer count it reads
VOCODER_CONFIG_NAME = "vocoder_config.json"
VOCODER_WEIGHTS_NAME = "model.safetensors"
CODEC_HOP = 320  # samples per unit: SpeechTokenizer's 50 Hz at 16 kHz
STREAM_CROSSFADE = 160  # samples over which a streamed chunk fades into the next (their phases differ)


def vocoder_folder(num_layers: int) -> str:
    """The folder, inside a codec's, of the vocoder that reads ``num_layers`` RVQ layers."""
    return f"vocoder-rvq{num_layers}"


@dataclass
class VocoderConfig:
    """The vocoder's architecture and its spectrogram; saved as ``vocoder_config.json``."""

    num_layers: int = field(default=8, metadata={"help": "RVQ layers it reads (1: layer 1 alone, the LM's units)"})
    codebook_size: int = field(default=1024, metadata={"help": "codes per RVQ layer (the codec's)"})
    codebook_dimension: int = field(default=1024, metadata={"help": "width of the codec's codebook vectors"})
    hidden_size: int = field(default=256, metadata={"help": "channels of the network"})
    num_blocks: int = field(default=8, metadata={"help": "residual blocks; dilations cycle 1, 2, 4, 8"})
    kernel_size: int = field(default=5, metadata={"help": "odd kernel of the dilated convolutions"})
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig,
                                           metadata={"help": "the log-mel it predicts and its inversion"})

    def __post_init__(self) -> None:
        if isinstance(self.spectrogram, dict):
            self.spectrogram = SpectrogramConfig(**self.spectrogram)
        problems = ConfigProblems()
        problems.positive_integers(self, "num_layers", "codebook_size", "codebook_dimension", "hidden_size",
                                   "num_blocks", "kernel_size")
        if isinstance(self.kernel_size, int) and self.kernel_size % 2 == 0:
            problems.append(f"kernel_size={self.kernel_size} (expected an odd number: the network is centred)")
        if CODEC_HOP % self.spectrogram.hop_length:
            problems.append(f"spectrogram.hop_length={self.spectrogram.hop_length} (expected a divisor of "
                            f"{CODEC_HOP}, the codec's samples per unit)")
        problems.raise_if_any("vocoder config")

    @property
    def upsample(self) -> int:
        """Spectrogram frames per unit."""
        return CODEC_HOP // self.spectrogram.hop_length

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "vocoder config") -> VocoderConfig:
        return settings_from_dict(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_codebooks(module: nn.Module, codebooks: torch.Tensor | None, shape: tuple[int, int, int], what: str
                       ) -> None:
    """Give ``module`` a frozen copy of a codec's ``(num_layers, codebook_size, dimension)`` codebooks (buffer
    ``codebooks``: layer l's code c is row l * codebook_size + c) and ``input_scale``, which brings the codec's
    tiny or large latents to unit scale. None leaves zeros, for a module whose saved state is loaded next."""
    if codebooks is None:
        codebooks = torch.zeros(shape)
    elif tuple(codebooks.shape) != shape:
        raise ValueError(f"codebooks of shape {tuple(codebooks.shape)}; the {what} config expects {shape} "
                         f"(num_layers, codebook_size, codebook_dimension)")
    module.register_buffer("codebooks", codebooks.reshape(-1, shape[2]).clone().float())
    module.register_buffer("input_scale", torch.ones(()))
    if codebooks.abs().sum() > 0:
        module.input_scale.fill_(1.0 / codebooks[0].std().clamp(min=1e-8).item())


def summed_codebook_vectors(module: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """``(B, k, T)`` codes of layers 1..k -> the sum of their vectors in ``module``'s `register_codebooks` copy,
    scaled: ``(B, T, dimension)`` (a frame's latent, as far as its k layers go)."""
    offsets = torch.arange(codes.shape[1], device=codes.device)[None, :, None] * module.config.codebook_size
    return nn.functional.embedding(codes + offsets, module.codebooks).sum(dim=1) * module.input_scale


class _ResidualBlock(nn.Module):
    """A dilated convolution, a norm and a pointwise feed-forward, added to its input."""

    def __init__(self, hidden: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.norm = nn.GroupNorm(1, hidden)
        self.feed_forward = nn.Sequential(nn.Conv1d(hidden, 2 * hidden, 1), nn.GELU(), nn.Conv1d(2 * hidden, hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.feed_forward(self.norm(self.conv(x)))


class UnitVocoder(nn.Module):
    """Codec units -> log-mel -> 16 kHz audio of ``T * 320`` samples, as the codec's own decoder gives."""

    def __init__(self, config: VocoderConfig, codebooks: torch.Tensor | None = None) -> None:
        """``codebooks``: the codec's ``(num_layers, codebook_size, codebook_dimension)`` vectors (`codec_codebooks`);
        None leaves zeros, for a vocoder whose saved state is loaded next."""
        super().__init__()
        self.config = config
        h, up, d = config.hidden_size, config.upsample, config.codebook_dimension
        register_codebooks(self, codebooks, (config.num_layers, config.codebook_size, d), "vocoder")
        self.from_codebooks = nn.Conv1d(d, h, 3, padding=1)
        self.upsample = nn.ConvTranspose1d(h, h, 2 * up, stride=up, padding=up // 2) if up > 1 else nn.Identity()
        self.blocks = nn.Sequential(*[_ResidualBlock(h, config.kernel_size, 2 ** (i % 4))
                                      for i in range(config.num_blocks)])
        self.to_mel = nn.Conv1d(h, config.spectrogram.n_mels, 1)
        self.spectrogram = MelSpectrogram(config.spectrogram)

    def forward(self, units: torch.Tensor) -> torch.Tensor:
        """``units`` long ``(B, k, T)``, k = num_layers -> log-mel ``(B, n_mels, T * upsample)``."""
        vectors = summed_codebook_vectors(self, units)  # B, T, D
        x = self.from_codebooks(vectors.transpose(1, 2))  # B, H, T
        return self.to_mel(self.blocks(self.upsample(x)))

    @property
    def lookahead(self) -> int:
        """Units after a frame that its log-mel depends on (the network's right reach, and the spectrogram
        window's): a stream decodes a chunk once this many more units are in."""
        c = self.config
        mel_frames = sum(2 ** (i % 4) for i in range(c.num_blocks)) * (c.kernel_size // 2)
        mel_frames += c.spectrogram.n_fft // c.spectrogram.hop_length
        return -(-mel_frames // c.upsample) + 1  # + 1: the transposed convolution's overlap

    # ---- decoding -------------------------------------------------------------------------------------

    def decode(self, units: torch.Tensor) -> np.ndarray:
        """Audio of ``(k, T)`` units, k >= num_layers (the first ``num_layers`` are read)."""
        return self.decode_batch([units])[0]

    @torch.inference_mode()
    def decode_batch(self, units: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """``decode`` of each item; one at a time, so an item's audio never depends on its batch (on a CPU
        the convolutions gain nothing from batching)."""
        waves = []
        for codes in units:
            codes = self.check_units(codes)
            log_mel = self(codes[None])[0]
            waves.append(self.spectrogram.waveform(log_mel, codes.shape[1] * CODEC_HOP))
        return waves

    def check_units(self, units: torch.Tensor) -> torch.Tensor:
        """The layers it reads of ``(k, T)`` units, or an error that says how many it needs."""
        if units.ndim != 2 or units.shape[0] < self.config.num_layers:
            raise ValueError(f"the vocoder reads {self.config.num_layers} RVQ layers; got units of shape "
                             f"{tuple(units.shape)} (expected ({self.config.num_layers} or more, T)); train one "
                             f"with --layers {units.shape[0] if units.ndim == 2 else 1} for these units")
        return units[: self.config.num_layers].long()

    # ---- saving ---------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_module(self, self.config.to_dict(), directory, VOCODER_CONFIG_NAME, VOCODER_WEIGHTS_NAME)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> UnitVocoder:
        # its frozen codebooks come with the state
        return load_module(lambda data, source: cls(VocoderConfig.from_dict(data, source=source)), directory,
                           VOCODER_CONFIG_NAME, VOCODER_WEIGHTS_NAME, "vocoder")


def add_saved_vocoders(codec, folder: Path) -> None:
    """Give ``codec`` (either kind: its ``add_vocoder`` checks the fit) the vocoders saved in its ``folder``; an
    error names the vocoder's folder."""
    for vocoder_dir in sorted(folder.glob(VOCODER_FOLDER_PATTERN)):
        try:
            codec.add_vocoder(UnitVocoder.from_pretrained(vocoder_dir))
        except ValueError as err:
            raise ValueError(f"{vocoder_dir}: {err}") from None


class VocoderStream:
    """A streamed vocoder decode: each chunk of ``chunk`` units is vocoded with ``lookahead`` units of context
    on each side, and fades into the next over `STREAM_CROSSFADE` samples (each window's Griffin-Lim phase is
    its own, so the chunks are not sample-exact to the whole decode, unlike the SpeechTokenizer decoder's)."""

    def __init__(self, vocoders: dict[int, UnitVocoder], chunk: int, check_units) -> None:
        self.vocoders, self.chunk, self.check_units = vocoders, chunk, check_units
        self.units: torch.Tensor | None = None  # k, N
        self.emitted = 0  # units whose audio has been yielded
        self.tail: np.ndarray | None = None  # the last window's audio past its chunk, to fade from

    def run(self, source) -> Iterator[np.ndarray]:
        for index, item in enumerate(source):
            self.units = appended_units(self.units, item, index, self.check_units)
            if self.units.shape[0] not in self.vocoders:
                raise ValueError(f"streamed units have {self.units.shape[0]} layers; the codec's vocoders read "
                                 f"{sorted(self.vocoders)}")
            vocoder = self.vocoders[self.units.shape[0]]
            while self.units.shape[1] - self.emitted >= self.chunk + vocoder.lookahead:
                yield self._advance(vocoder, self.emitted + self.chunk)
        if self.units is not None and self.units.shape[1] > self.emitted:
            yield self._advance(self.vocoders[self.units.shape[0]], self.units.shape[1])

    def _advance(self, vocoder: UnitVocoder, end: int) -> np.ndarray:
        total = self.units.shape[1]
        start = max(0, self.emitted - vocoder.lookahead)
        stop = min(total, end + vocoder.lookahead)
        audio = vocoder.decode(self.units[:, start:stop])
        fade = STREAM_CROSSFADE if end < total else 0
        piece = audio[(self.emitted - start) * CODEC_HOP: (end - start) * CODEC_HOP + fade].copy()
        if self.tail is not None:
            ramp = np.linspace(0.0, 1.0, len(self.tail), endpoint=False, dtype=np.float32)
            piece[: len(self.tail)] = self.tail * (1.0 - ramp) + piece[: len(self.tail)] * ramp
        self.tail = piece[len(piece) - fade:] if fade else None
        self.emitted = end
        return piece[: len(piece) - fade]
