from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper

from speechlm.speech_io.constants import mel_frames
from speechlm.speech_io.features import log_mel_features


@pytest.mark.parametrize("n_mels", [80, 128])
def test_single_clip_equals_whisper(make_speech, n_mels):
    clip = make_speech(0.73)
    features = log_mel_features([clip], n_mels=n_mels)
    expected = whisper.log_mel_spectrogram(clip, n_mels=n_mels)
    assert features.input_features.dtype == torch.float32
    assert torch.equal(features.input_features[0], expected)
    assert features.lengths.tolist() == [mel_frames(clip.size)] == [expected.shape[-1]]


def test_batch_is_per_item_padding_and_mask(make_speech):
    clips = [make_speech(0.5, seed=1), make_speech(1.2, seed=2), np.zeros(4000, np.float32)]
    batch = log_mel_features(clips)
    assert batch.input_features.shape == (3, 80, 120)
    assert batch.lengths.tolist() == [50, 120, 25]
    assert batch.input_features_mask.dtype == torch.long
    assert batch.input_features_mask.sum(1).tolist() == [50, 120, 25]
    for row, clip in enumerate(clips):
        alone = log_mel_features([clip]).input_features[0]
        length = int(batch.lengths[row])
        assert torch.equal(batch.input_features[row, :, :length], alone)
        assert not batch.input_features[row, :, length:].any()  # zero padding, masked by the model


def test_errors(make_speech):
    with pytest.raises(ValueError, match="n_mels=64 is not a Whisper mel size"):
        log_mel_features([make_speech(0.5)], n_mels=64)
    with pytest.raises(ValueError, match=r"waveform 1 has shape \(2, 800\)"):
        log_mel_features([make_speech(0.5), np.zeros((2, 800), np.float32)])
    with pytest.raises(ValueError, match=r"waveform 0 has 300 samples"):
        log_mel_features([np.zeros(300, np.float32)])
    with pytest.raises(ValueError, match=r"3100 mel frames"):
        log_mel_features([np.zeros(310 * 1600, np.float32)])
    with pytest.raises(ValueError, match="no waveforms"):
        log_mel_features([])
