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


def save_alignment(alignment: list, path: Path) -> None:
    """A clip's alignment (`PiperSynthesizer.synthesize`) as JSON at ``path``, moved in whole."""
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(alignment, ensure_ascii=False))
    os.replace(staging, path)


def alignment_path(clip: Path) -> Path:
    """Where a clip's alignment is kept: beside it."""
    return clip.with_name(clip.stem + ".alignment.json")


class PiperSynthesizer:
    """Text -> 16 kHz float32 speech with the Piper voice (22.05 kHz, resampled by speech_io), and how long each
    phoneme lasts in it (Piper's own durations: its ONNX graph patched in memory to give them, which needs onnx)."""

    def __init__(self, voice: Voice) -> None:
        from piper import PiperVoice

        self.voice = PiperVoice.load(voice.model, config_path=voice.config, include_alignments=True)

    def __call__(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                 snr_db: float | None, seed: int = 0) -> np.ndarray:
        return self.synthesize(text, length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale,
                               snr_db=snr_db, seed=seed)[0]

    def synthesize(self, text: str, *, length_scale: float, noise_scale: float, noise_w_scale: float,
                   snr_db: float | None, seed: int = 0) -> tuple[np.ndarray, list[list[list]]]:
        """The speech of ``text`` and its alignment: each sentence's phonemes (espeak-ng's, a word space after the
        last, as `text_sentences` reads them) with the seconds each lasts; the leading silence counts to the first
        phoneme, the trailing silence and the pause before the next sentence to the last space."""
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale, noise_w_scale=noise_w_scale)
        chunks = list(self.voice.synthesize(text, config, include_alignments=True))
        if not chunks:
            raise ValueError(f"Piper produced no audio for {text!r}")
        if any(chunk.phoneme_alignments is None for chunk in chunks):
            raise RuntimeError("Piper gave no phoneme durations: its voice is patched for them in memory, which "
                               "needs the onnx package (pip install onnx; the demo extra has it)")
        rate = chunks[0].sample_rate
        gap = np.zeros(int(SENTENCE_GAP_SECONDS * rate), np.float32)
        pieces = [piece for chunk in chunks for piece in (chunk.audio_float_array, gap)][:-1]
        alignment = []
        for index, chunk in enumerate(chunks):  # Piper's alignments: the sentence's start, its phonemes, its end
            start, *phonemes, end = [(a.phoneme, a.num_samples / rate) for a in chunk.phoneme_alignments]
            pause = SENTENCE_GAP_SECONDS if index < len(chunks) - 1 else 0.0
            sentence = [[symbol, seconds] for symbol, seconds in phonemes] + [[" ", end[1] + pause]]
            sentence[0][1] += start[1]
            alignment.append([[symbol, round(seconds, 5)] for symbol, seconds in sentence])
        audio = load_audio(np.concatenate(pieces), sampling_rate=rate, name=f"Piper audio of {text[:40]!r}")
        if snr_db is not None:
            rng = np.random.default_rng([seed, zlib.crc32(text.encode())])
            rms = float(np.sqrt(np.mean(audio**2))) or 1e-4
            audio = audio + (rms / 10 ** (snr_db / 20) * rng.standard_normal(audio.size)).astype(np.float32)
        return audio, alignment

