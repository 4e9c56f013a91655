"""The corpus's speech: per-clip voice settings and the Piper synthesizer (16 kHz, optional noise)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.constants import SAMPLE_RATE

if TYPE_CHECKING:
    from speechlm.demo.corpus import Voice

SENTENCE_GAP_SECONDS = 0.25  # Piper returns one chunk per sentence; join them with a short pause


def synthesis_settings(row_id: str, seed: int) -> dict:
    """Per-clip voice settings, stable for an id: speaking rate, Piper's two noise scales, added noise."""
    rng = np.random.default_rng([seed, zlib.crc32(row_id.encode())])
    snr = None if rng.random() < 0.5 else round(float(rng.uniform(15.0, 40.0)), 1)
    return {"length_scale": round(float(rng.uniform(0.8, 1.25)), 3),
            "noise_scale": round(float(rng.uniform(0.33, 0.9)), 3),
            "noise_w_scale": round(float(rng.uniform(0.4, 1.0)), 3),
            "snr_db": snr}


def clip_file_name(row_id: str, text: str, synthesis: dict, seed: int) -> str:
    """A clip's file name: it carries what was spoken and how, so a cached clip is never reused for another text."""
    spoken = zlib.crc32(json.dumps([text, synthesis, seed]).encode())
    return f"{row_id}-{spoken:08x}.flac"


def save_clip(audio: np.ndarray, path: Path) -> None:
    """16 kHz speech as 16-bit FLAC, written beside ``path`` and moved in whole (an interrupted write leaves none)."""
    staging = path.with_name(path.name + ".partial")
    sf.write(staging, np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    os.replace(staging, path)


class PiperSynthesizer:
    """Text -> 16 kHz float32 speech with the Piper voice (22.05 kHz, resampled by speech_io)."""

    def __init__(self, voice: Voice) -> None:
        from piper import PiperVoice

        self.voice = PiperVoice.load(voice.model, config_path=voice.config)

    def __call__(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                 snr_db: float | None, seed: int = 0) -> np.ndarray:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
        chunks = list(self.voice.synthesize(text, config))
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}")
        rate = chunks[0].sample_rate
        gap = np.zeros(int(SENTENCE_GAP_SECONDS * rate), np.float32)
        pieces = [piece for chunk in chunks for piece in (chunk.audio_float_array, gap)][:-1]
        audio = load_audio(np.concatenate(pieces), sampling_rate=rate, name=f"Piper audio of {text[:40]!r}")
        if snr_db is not None:
            rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
            rms = float(np.sqrt(np.mean(audio**2))) or 1e-4
            audio = audio + (rms / 10 ** (snr_db / 20) * rng.standard_normal(audio.size)).astype(np.float32)
        return audio

