"""Shared fixtures: speech-like test signals and a narrow SpeechTokenizer with filled codebooks."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec

NARROW_CODEC = dict(n_filters=8, dimension=32, semantic_dimension=32, strides=[8, 5, 4, 2],
                    codebook_size=64, n_q=2, lstm_layers=1)


def speechlike(seconds: float, *, seed: int = 0, sampling_rate: int = 16000) -> np.ndarray:
    """Harmonics of a wandering pitch under a syllable-rate envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    pitch = 120 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / sampling_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6))
    return (0.1 * voice * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.fixture(scope="session")
def make_speech():
    """The speech-like signal generator, for tests that need their own lengths and rates."""
    return speechlike


@pytest.fixture(scope="session")
def narrow_codec() -> SpeechTokenizerCodec:
    codec = SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=0)
    codec.fill_codebooks([speechlike(1.0, seed=s) for s in range(3)], seed=0)
    return codec


@pytest.fixture(scope="session")
def clips() -> list[np.ndarray]:
    """Mixed lengths, including ones that are not a multiple of the hop and one shorter than a hop."""
    return [speechlike(seconds, seed=i) for i, seconds in enumerate((0.5, 0.21, 1.03, 0.77, 0.015, 0.6))]
