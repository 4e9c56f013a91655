"""Load and validate audio from every form it reaches us in; write 16 kHz wav files.

Whatever comes in (a path, file bytes, an array with its rate, a ``datasets`` Audio dict) leaves
``load_audio`` as one float32 mono 16 kHz numpy array, or as an ``AudioError`` that names the source,
what was wrong and what was expected.

Two-dimensional arrays may be ``(channels, samples)`` or ``(samples, channels)``: the smaller
dimension is taken as channels when it is at most ``MAX_CHANNELS`` (8); channels are averaged.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from speechlm.speech_io.constants import SAMPLE_RATE

# Anything load_audio accepts. A Mapping is a datasets Audio dict: {"array", "sampling_rate"}
# (decoded) or {"path", "bytes"} (undecoded).
AudioInput = str | os.PathLike | bytes | bytearray | np.ndarray | Mapping[str, Any]

# One Whisper STFT window (25 ms at 16 kHz); shorter audio gives no encoder frame at all.
MIN_SAMPLES = 400
# Whisper's encoder has positional embeddings for 30 s and no more.
MAX_SECONDS = 30.0
# A larger "channel" dimension is almost certainly time: refuse rather than guess.
MAX_CHANNELS = 8
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000

# Integer PCM arrays are scaled by their full-scale value; unsigned 8-bit PCM is offset by 128.
_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


class AudioError(ValueError):
    """Audio that cannot be used; the message names the source and what was expected."""


def load_audio(
    source: AudioInput,
    *,
    sampling_rate: int | None = None,
    max_seconds: float | None = MAX_SECONDS,
    min_samples: int = MIN_SAMPLES,
    name: str | None = None,
) -> np.ndarray:
    """Audio as a float32 mono 16 kHz array of shape ``(samples,)``.

    ``sampling_rate`` is required for a bare array and must match a file's own rate if given for one.
    ``name`` replaces the source description in error messages (e.g. a manifest row id).
    ``max_seconds=None`` disables the length limit (for callers that split long audio themselves).
    Silence and clipped audio are valid.
    """
    array, rate, label = _read(source, sampling_rate, name)
    rate = _check_rate(rate, label)
    if array.size == 0:
        raise AudioError(f"{label}: no audio samples (0 samples); expected a non-empty recording")
    mono = _to_mono(array, label)
    bad = ~np.isfinite(mono)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise AudioError(f"{label}: {int(bad.sum())} samples are NaN or infinite (first at sample {first}); "
                         f"expected finite values")
    seconds = mono.size / rate
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"{label}: {seconds:.2f} s long, but the Whisper encoder sees at most {max_seconds:g} s; "
                         f"split longer audio into segments before loading (or pass max_seconds=None "
                         f"if you split it yourself)")
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if mono.size < min_samples:
        raise AudioError(f"{label}: {mono.size} samples ({1000 * mono.size / SAMPLE_RATE:.1f} ms at 16 kHz) "
                         f"is shorter than one encoder frame; expected at least {min_samples} samples "
                         f"({1000 * min_samples / SAMPLE_RATE:.1f} ms)")
    return np.ascontiguousarray(mono, dtype=np.float32)


def save_wav(path: str | os.PathLike, array: np.ndarray, sampling_rate: int = SAMPLE_RATE) -> None:
    """Write ``array`` (``(samples,)`` or ``(samples, channels)`` floats) as 16-bit PCM wav.

    Values are clipped to [-1, 1] first: libsndfile's float -> int conversion does not clip by itself.
    """
    data = np.asarray(array)
    if data.ndim not in (1, 2) or data.size == 0:
        raise AudioError(f"{path}: cannot write audio of shape {data.shape}; expected (samples,) or "
                         f"(samples, channels) with at least one sample")
    rate = _check_rate(sampling_rate, str(path))
    data = np.clip(data.astype(np.float32, copy=False), -1.0, 1.0)
    try:
        sf.write(os.fspath(path), data, rate, subtype="PCM_16", format="WAV")
    except (sf.SoundFileError, OSError) as err:
        raise AudioError(f"{path}: could not write wav ({err})") from err


def _read(source: AudioInput, sampling_rate: int | None, name: str | None) -> tuple[np.ndarray, Any, str]:
    """(raw array, its rate, the label for messages) for any accepted source."""
    if isinstance(source, Mapping):
        return _read_mapping(source, sampling_rate, name)
    if isinstance(source, (str, os.PathLike)):
        label = name or os.fspath(source)
        array, rate = _read_file(Path(source), label)
        return array, _file_rate(rate, sampling_rate, label), label
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = name or f"bytes ({len(data)} bytes)"
        array, rate = _decode_bytes(data, label)
        return array, _file_rate(rate, sampling_rate, label), label
    if isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        label = name or "array"
        if sampling_rate is None:
            raise AudioError(f"{label}: a bare array needs sampling_rate=...; pass the rate it was recorded at")
        return _as_float(np.asarray(source), label), sampling_rate, label
    raise AudioError(f"{name or type(source).__name__}: cannot load audio from a {type(source).__name__}; "
                     f"expected a path, file bytes, a numpy array with sampling_rate, or a "
                     f'{{"array", "sampling_rate"}} / {{"path", "bytes"}} dict')


def _read_mapping(source: Mapping[str, Any], sampling_rate: int | None, name: str | None):
    path = source.get("path")
    if source.get("array") is not None:
        if "sampling_rate" not in source:
            raise AudioError(f'{name or path or "audio dict"}: has "array" but no "sampling_rate"; '
                             f"expected the datasets Audio form {{\"array\", \"sampling_rate\"}}")
        label = name or (f"{path} (array)" if path else "array")
        return _as_float(np.asarray(source["array"]), label), source["sampling_rate"], label
    if source.get("bytes") is not None:
        return _read(source["bytes"], sampling_rate, name or (f"{path} (bytes)" if path else None))
    if path is not None:
        return _read(path, sampling_rate, name)
    raise AudioError(f"{name or 'audio dict'}: keys {sorted(source)} hold no audio; expected "
                     f'{{"array", "sampling_rate"}}, or {{"path"}} / {{"bytes"}} as datasets stores it')


def _read_file(path: Path, label: str) -> tuple[np.ndarray, int]:
    if path.is_dir():
        raise AudioError(f"{label}: is a directory; expected an audio file")
    if not path.exists():
        raise AudioError(f"{label}: audio file not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AudioError(f"{label}: cannot read the file ({err})") from err
    return _decode_bytes(data, label)


def _decode_bytes(data: bytes, label: str) -> tuple[np.ndarray, int]:
    if not data:
        raise AudioError(f"{label}: the file is empty (0 bytes); expected wav, flac, ogg, opus or mp3 audio")
    _check_wav_complete(data, label)
    try:
        array, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{label}: not readable as audio ({err}); expected wav, flac, ogg, opus or mp3 "
                         f"(m4a/aac are not supported: convert them first)") from err
    if array.shape[0] == 0:
        raise AudioError(f"{label}: the file holds no audio samples (header only?); expected a recording")
    return array, rate


def _check_wav_complete(data: bytes, label: str) -> None:
    """Refuse a RIFF/WAVE whose data chunk is cut short: libsndfile reads such files without complaint."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk_id == b"data":
            available = len(data) - pos - 8
            # 0 and 0xFFFFFFFF are placeholders that streaming writers leave when the length is unknown.
            if size not in (0, 0xFFFFFFFF) and size > available:
                raise AudioError(f"{label}: truncated wav: the header declares {size} bytes of audio but the "
                                 f"file holds {available}; re-export or re-download the file")
            return
        pos += 8 + size + (size & 1)  # chunks are word-aligned


def _file_rate(file_rate: int, requested: int | None, label: str) -> int:
    if requested is not None and requested != file_rate:
        raise AudioError(f"{label}: sampling_rate={requested} was given but the file is {file_rate} Hz; "
                         f"files carry their own rate, so leave sampling_rate out (audio is resampled to 16 kHz)")
    return file_rate


def _check_rate(rate: Any, label: str) -> int:
    if isinstance(rate, (float, np.floating)) and math.isfinite(rate) and float(rate).is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise AudioError(f"{label}: sampling_rate {rate!r} is not an integer number of Hz; expected e.g. 16000")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{label}: sampling_rate {rate} Hz is not plausible; expected {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE} Hz (is it the rate, or the number of samples?)")
    return int(rate)


def _as_float(array: np.ndarray, label: str) -> np.ndarray:
    """Integer PCM scaled to [-1, 1); floats as float32; anything else refused."""
    if array.dtype in _INT_SCALE:
        return (array.astype(np.float32) / _INT_SCALE[array.dtype]).astype(np.float32)
    if array.dtype == np.uint8:
        return ((array.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise AudioError(f"{label}: samples of dtype {array.dtype} are not audio; expected float, int8, int16, "
                     f"int32 or uint8 PCM")


def _to_mono(array: np.ndarray, label: str) -> np.ndarray:
    """Average the channels; see the module docstring for how the channel axis is chosen."""
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioError(f"{label}: array of shape {array.shape} has {array.ndim} dimensions; expected "
                         f"(samples,), (channels, samples) or (samples, channels)")
    rows, cols = array.shape
    if min(rows, cols) > MAX_CHANNELS:
        raise AudioError(f"{label}: array of shape {array.shape} has no dimension of at most {MAX_CHANNELS} "
                         f"channels; expected (channels, samples) or (samples, channels)")
    channel_axis = 0 if rows <= cols else 1
    return array.mean(axis=channel_axis, dtype=np.float32)
