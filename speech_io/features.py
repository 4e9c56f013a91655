"""Whisper log-mel features for a batch of clips, computed by openai-whisper itself.

Each clip's log-mel is computed on its own (``whisper.audio.log_mel_spectrogram``, which normalizes
by the clip's own maximum), so an item's features never depend on what else is in the batch. Clips
are then right-padded with zeros to the longest; ``input_features_mask`` marks the real frames and the
model must mask the padded ones (zero is *not* what Whisper would compute for silence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from whisper.audio import N_FFT, log_mel_spectrogram

from speechlm.speech_io.constants import MAX_MEL_FRAMES, mel_frames

SUPPORTED_N_MELS = (80, 128)  # 80 for Whisper up to large-v2, 128 for large-v3 and turbo


@dataclass
class AudioFeatures:
    """A padded batch of log-mel features.

    input_features: float32 ``(B, n_mels, T_max)``, zeros after each clip's last frame.
    input_features_mask: int64 ``(B, T_max)``, 1 for real frames, 0 for padding.
    lengths: int64 ``(B,)``, real mel frames per clip (``constants.mel_frames(samples)``).
    """

    input_features: torch.Tensor
    input_features_mask: torch.Tensor
    lengths: torch.Tensor


def log_mel_features(waveforms: Sequence[np.ndarray], n_mels: int = 80) -> AudioFeatures:
    """Log-mel features of 16 kHz mono clips (as ``audio.load_audio`` returns them), padded into a batch."""
    if n_mels not in SUPPORTED_N_MELS:
        raise ValueError(f"n_mels={n_mels} is not a Whisper mel size; expected one of {SUPPORTED_N_MELS}")
    if len(waveforms) == 0:
        raise ValueError("log_mel_features got no waveforms; expected a list of at least one 16 kHz clip")
    mels = []
    for index, waveform in enumerate(waveforms):
        samples = np.asarray(waveform)
        if samples.ndim != 1:
            raise ValueError(f"waveform {index} has shape {samples.shape}; expected a mono (samples,) array "
                             f"(load it with speech_io.audio.load_audio)")
        frames = mel_frames(samples.shape[0])
        # Whisper's STFT reflect-pads by N_FFT // 2, which needs at least one full window of samples.
        if samples.shape[0] < N_FFT or frames > MAX_MEL_FRAMES:
            raise ValueError(f"waveform {index} has {samples.shape[0]} samples ({frames} mel frames); expected "
                             f"{N_FFT} samples (25 ms) to {MAX_MEL_FRAMES} frames (30 s) of 16 kHz audio")
        mel = log_mel_spectrogram(torch.from_numpy(samples.astype(np.float32, copy=False)), n_mels=n_mels)
        assert mel.shape == (n_mels, frames), (mel.shape, frames)  # whisper drops the STFT's last frame
        mels.append(mel)

    lengths = torch.tensor([mel.shape[-1] for mel in mels], dtype=torch.long)
    batch = torch.zeros(len(mels), n_mels, int(lengths.max()), dtype=torch.float32)
    for index, mel in enumerate(mels):
        batch[index, :, : mel.shape[-1]] = mel
    mask = (torch.arange(batch.shape[-1])[None, :] < lengths[:, None]).long()  # B, T_max
    return AudioFeatures(input_features=batch, input_features_mask=mask, lengths=lengths)
