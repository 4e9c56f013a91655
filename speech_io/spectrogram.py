"""Log-mel spectrograms and their way back to a waveform: the unit vocoder's target and its last step.

The mel filterbank is Slaney's (librosa's default, written out here: our dependencies ship none for an
arbitrary FFT size; openai-whisper's covers only its own 400-point FFT). The waveform comes back by
Griffin-Lim with momentum ("fast Griffin-Lim", Perraudin et al. 2013) from the filterbank's
pseudo-inverse magnitude. Measured on the quick start's held-out clips (BENCHMARKS.md, "Speech out"): Whisper
base transcribes audio rebuilt from their true log-mel as well as the original audio, so this last
step is not what limits the vocoder.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from speechlm.speech_io.config_errors import ConfigProblems
from speechlm.speech_io.constants import SAMPLE_RATE

LOG_FLOOR = 1e-5  # the magnitude under which log-mel is flat: silence, and what a padded frame holds


@dataclass
class SpectrogramConfig:
    """How a 16 kHz waveform becomes log-mel frames, and how many Griffin-Lim rounds bring it back."""

    n_fft: int = field(default=1024, metadata={"help": "FFT size (frequency bins: n_fft // 2 + 1)"})
    win_length: int = field(default=640, metadata={"help": "Hann window length in samples (<= n_fft)"})
    hop_length: int = field(default=160, metadata={"help": "samples between frames; must divide 320 (the codec's hop)"})
    n_mels: int = field(default=80, metadata={"help": "mel bands"})
    griffin_lim_iters: int = field(default=32, metadata={"help": "Griffin-Lim rounds when turning log-mel into audio"})

    def problems(self) -> ConfigProblems:
        problems = ConfigProblems()
        problems.positive_integers(self, "n_fft", "win_length", "hop_length", "n_mels", "griffin_lim_iters")
        if not problems and self.win_length > self.n_fft:
            problems.append(f"win_length={self.win_length} (expected at most n_fft={self.n_fft})")
        return problems

    def __post_init__(self) -> None:
        self.problems().raise_if_any("spectrogram config")


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Slaney-style triangular mel filters ``(n_mels, n_fft // 2 + 1)``, area-normalized, 0 Hz to Nyquist."""
    freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (center - lower)
    falling = (upper - freqs[None]) / (upper - center)
    filters = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
    return torch.tensor(filters, dtype=torch.float32)


def _hz_to_mel(hz):
    """Slaney's scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    return np.where(hz >= 1000.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (math.log(6.4) / 27.0),
                    hz * 3.0 / 200.0)


def _mel_to_hz(mel):
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27.0) * (mel - 15.0)), mel * 200.0 / 3.0)


class MelSpectrogram:
    """Waveform -> natural-log mel ``(n_mels, samples // hop + 1)``, and back by Griffin-Lim."""

    def __init__(self, config: SpectrogramConfig | None = None) -> None:
        self.config = config or SpectrogramConfig()
        self.window = torch.hann_window(self.config.win_length)
        self.filters = mel_filterbank(self.config.n_fft, self.config.n_mels)
        self.inverse_filters = torch.linalg.pinv(self.filters)

    def _stft(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.stft(waveform, c.n_fft, c.hop_length, c.win_length, self.window, return_complex=True)

    def _istft(self, spectrum: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.istft(spectrum, c.n_fft, c.hop_length, c.win_length, self.window)

    def log_mel(self, waveform: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Log-mel frames of a mono float waveform; frame i is centred on sample ``i * hop_length``."""
        magnitude = self._stft(torch.as_tensor(waveform, dtype=torch.float32)).abs()
        return torch.log(torch.clamp(self.filters @ magnitude, min=LOG_FLOOR))

    def waveform(self, log_mel: torch.Tensor, num_samples: int, *, seed: int = 0) -> np.ndarray:
        """``num_samples`` of float32 audio whose log-mel is close to ``log_mel`` ``(n_mels, frames)``.

        The phase starts from a seeded draw, so the same frames give the same audio every time."""
        magnitude = torch.clamp(self.inverse_filters @ torch.exp(log_mel.float()), min=0.0)
        generator = torch.Generator().manual_seed(seed)
        phase = torch.exp(2j * math.pi * torch.rand(magnitude.shape, generator=generator))
        momentum = 0.99 / (1 + 0.99)
        previous = torch.zeros_like(phase)
        for _ in range(self.config.griffin_lim_iters):
            rebuilt = self._stft(self._istft(magnitude * phase))
            accelerated = rebuilt - momentum * previous
            previous = rebuilt
            phase = accelerated / accelerated.abs().clamp(min=1e-8)
        audio = self._istft(magnitude * phase)
        audio = torch.nn.functional.pad(audio, (0, max(0, num_samples - audio.shape[0])))[:num_samples]
        return audio.clamp(-1.0, 1.0).numpy().astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self.config)
