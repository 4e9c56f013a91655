from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import soundfile as sf

from speechlm.speech_io.audio import AudioError, load_audio, save_wav


def _wav_bytes(array: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, array, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "subtype", "rate"), [
    ("WAV", "PCM_16", 44100), ("FLAC", "PCM_16", 48000), ("OGG", "VORBIS", 44100),
    ("OGG", "OPUS", 48000), ("MP3", "MPEG_LAYER_III", 44100),
])
def test_formats_stereo_to_16k_mono(tmp_path, fmt, subtype, rate, make_speech):
    speechlike = make_speech
    stereo = np.stack([speechlike(1.0, sampling_rate=rate), speechlike(1.0, seed=1, sampling_rate=rate)], axis=1)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, stereo, rate, format=fmt, subtype=subtype)
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - 16000) <= 16000 * 0.01  # encoders may add a few ms of priming
    assert np.abs(audio).max() > 0.01


def test_sources_agree(tmp_path, make_speech):
    speechlike = make_speech
    clip = speechlike(0.5)
    path = tmp_path / "a.wav"
    save_wav(path, clip)
    from_path = load_audio(str(path))
    assert np.allclose(from_path, clip, atol=1 / 16000)
    data = path.read_bytes()
    assert np.array_equal(load_audio(data), from_path)
    assert np.array_equal(load_audio({"path": str(path), "bytes": None}), from_path)
    assert np.array_equal(load_audio({"path": "ignored.wav", "bytes": data}), from_path)
    assert np.array_equal(load_audio({"array": clip, "sampling_rate": 16000}), clip)
    assert np.array_equal(load_audio(clip, sampling_rate=16000), clip)


def test_array_layouts_and_integer_pcm(make_speech):
    speechlike = make_speech
    clip = speechlike(0.5)
    both = np.stack([clip, clip])
    assert np.allclose(load_audio(both, sampling_rate=16000), clip)  # (channels, samples)
    assert np.allclose(load_audio(both.T, sampling_rate=16000), clip)  # (samples, channels)
    pcm = (clip * 32767).astype(np.int16)
    assert np.allclose(load_audio(pcm, sampling_rate=16000), pcm / 32768.0)
    assert np.allclose(load_audio(np.full(800, 128, np.uint8), sampling_rate=16000), 0.0)
    resampled = load_audio(speechlike(0.5, sampling_rate=48000), sampling_rate=48000)
    assert resampled.shape == (8000,)


def test_silence_and_clipping_are_valid(make_speech):
    speechlike = make_speech
    assert not load_audio(np.zeros(16000, np.float32), sampling_rate=16000).any()
    clipped = load_audio(np.clip(speechlike(0.5) * 100, -1, 1), sampling_rate=16000)
    assert np.abs(clipped).max() == 1.0


def test_max_seconds_can_be_disabled():
    long = np.zeros(16000 * 31, np.float32)
    with pytest.raises(AudioError, match=r"31.00 s long.*at most 30 s.*split"):
        load_audio(long, sampling_rate=16000)
    assert load_audio(long, sampling_rate=16000, max_seconds=None).shape == (16000 * 31,)


def test_broken_files(tmp_path, make_speech):
    speechlike = make_speech
    good = _wav_bytes(speechlike(0.5))
    cases = {
        "truncated.wav": (good[: len(good) // 2], r"truncated\.wav: truncated wav: the header declares 16000 bytes"),
        "header.wav": (good[:44], r"header\.wav: truncated wav: .* the file holds 0"),
        "notes.txt": (b"this is not audio\n" * 20, r"notes\.txt: not readable as audio"),
        "empty.wav": (b"", r"empty\.wav: the file is empty \(0 bytes\)"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AudioError, match=message):
            load_audio(tmp_path / name)
    with pytest.raises(AudioError, match="is a directory"):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match=r"missing\.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(AudioError, match=r"bytes \(18 bytes\): not readable"):
        load_audio(b"definitely not wav")


def test_header_only_wav_written_by_wave_module(tmp_path):
    path = tmp_path / "zero.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
    with pytest.raises(AudioError, match="zero.wav: .*no audio samples"):
        load_audio(path)


@pytest.mark.parametrize(("array", "kwargs", "message"), [
    (np.zeros(16000), {}, r"array: a bare array needs sampling_rate"),
    (np.zeros(0, np.float32), {"sampling_rate": 16000}, r"array: no audio samples"),
    (np.array([0.0, np.nan, np.inf] * 300), {"sampling_rate": 16000}, r"array: 600 samples are NaN or infinite \(first at sample 1\)"),
    (np.zeros((2, 2, 800)), {"sampling_rate": 16000}, r"3 dimensions"),
    (np.zeros((100, 900)), {"sampling_rate": 16000}, r"no dimension of at most 8 channels"),
    (np.zeros(16000, np.int64), {"sampling_rate": 16000}, r"dtype int64 are not audio"),
    (np.zeros(16000), {"sampling_rate": 0}, r"sampling_rate 0 Hz is not plausible"),
    (np.zeros(16000), {"sampling_rate": 500_000}, r"sampling_rate 500000 Hz"),
    (np.zeros(16000), {"sampling_rate": 16000.5}, r"sampling_rate 16000.5 is not an integer"),
    (np.zeros(16000), {"sampling_rate": "16k"}, r"sampling_rate '16k' is not an integer"),
    (np.zeros(399), {"sampling_rate": 16000}, r"399 samples \(24.9 ms at 16 kHz\) is shorter than one encoder frame; expected at least 400 samples \(25.0 ms\)"),
])
def test_bad_arrays(array, kwargs, message):
    with pytest.raises(AudioError, match=message):
        load_audio(array, **kwargs)


def test_bad_dicts_and_types(tmp_path, make_speech):
    speechlike = make_speech
    with pytest.raises(AudioError, match='has "array" but no "sampling_rate"'):
        load_audio({"array": np.zeros(800)})
    with pytest.raises(AudioError, match="hold no audio"):
        load_audio({"text": "hi"})
    with pytest.raises(AudioError, match="cannot load audio from a int"):
        load_audio(3)
    with pytest.raises(AudioError, match="clip #7: a bare array"):
        load_audio(np.zeros(800), name="clip #7")
    path = tmp_path / "a.wav"
    save_wav(path, speechlike(0.5))
    with pytest.raises(AudioError, match="sampling_rate=8000 was given but the file is 16000 Hz"):
        load_audio(path, sampling_rate=8000)


def test_save_wav_clips_and_rejects(tmp_path):
    path = tmp_path / "loud.wav"
    save_wav(path, np.full(800, 3.0, np.float32))
    assert np.allclose(load_audio(path), 32767 / 32768)
    with pytest.raises(AudioError, match=r"cannot write audio of shape \(2, 2, 2\)"):
        save_wav(tmp_path / "x.wav", np.zeros((2, 2, 2)))
