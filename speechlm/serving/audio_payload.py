"""Audio as it travels in the API: base64 files in (``input_audio``), base64 16 kHz wav or raw PCM out."""

from __future__ import annotations

import base64
import binascii
import io
import wave
from typing import Any

import numpy as np

from speechlm.serving.errors import bad_request
from speechlm.speech_io.audio import AudioError, load_audio
from speechlm.speech_io.constants import SAMPLE_RATE

INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac")
# wav: a whole file (streamed: each delta is a short file of its own, playable as it comes);
# pcm16: raw 16-bit little-endian mono PCM at 16 kHz (streamed: deltas concatenate, as OpenAI's do).
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")


def decode_input_audio(part: Any, *, param: str, max_seconds: float) -> np.ndarray:
    """``{"data": <base64>, "format": "wav"|"mp3"|"flac"}`` -> float32 mono 16 kHz, or a 400 naming ``param``."""
    if not isinstance(part, dict):
        raise bad_request(f"{param} must be an object {{\"data\": <base64>, \"format\": \"wav\"}}, got "
                          f"{type(part).__name__}", param=param, code="invalid_value")
    unknown = sorted(set(part) - {"data", "format"})
    if unknown:
        raise bad_request(f"{param} has unknown field(s) {unknown}; expected 'data' and 'format'", param=param,
                          code="unknown_parameter")
    audio_format = part.get("format")
    if audio_format not in INPUT_AUDIO_FORMATS:
        raise bad_request(f"{param}.format={audio_format!r} is not supported; expected one of "
                          f"{list(INPUT_AUDIO_FORMATS)}", param=f"{param}.format", code="unsupported_format")
    data = part.get("data")
    if not isinstance(data, str) or not data:
        raise bad_request(f"{param}.data must be a non-empty base64 string", param=f"{param}.data",
                          code="invalid_value")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param}.data is not valid base64 (standard alphabet, padded; no data: URL prefix)",
                          param=f"{param}.data", code="invalid_base64") from None
    try:
        # The length is checked below with a message for API users; the body-size limit bounds the decode.
        waveform = load_audio(raw, max_seconds=None, name=f"{param}.data ({audio_format}, {len(raw)} bytes)")
    except AudioError as error:
        raise bad_request(str(error), param=f"{param}.data", code="invalid_audio") from None
    seconds = waveform.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise bad_request(f"{param}.data holds {seconds:.2f} s of audio; this model hears at most {max_seconds:g} s "
                          f"per clip: send shorter clips (several parts are fine)", param=f"{param}.data",
                          code="audio_too_long")
    return waveform


def encode_output_audio(waveform: np.ndarray, audio_format: str) -> str:
    """A float32 16 kHz waveform as base64 ``wav`` (a whole file) or ``pcm16`` (raw samples)."""
    pcm = (np.clip(waveform, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()
    if audio_format == "pcm16":
        return base64.b64encode(pcm).decode("ascii")
    if audio_format != "wav":
        raise ValueError(f"audio format {audio_format!r}; expected one of {list(OUTPUT_AUDIO_FORMATS)}")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
