from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import whisper

from speechlm.adapters.building import build_whisper_unit_codec
from speechlm.speech_io.codec_loading import codec_type, load_codec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.vocoder import UnitVocoder, VocoderConfig
from speechlm.speech_io.whisper_units import WEIGHTS_NAME, WhisperUnitCodec, WhisperUnitConfig
from tests.conftest import save_tiny_whisper

UNITS = 16
TINY_VOCODER = dict(codebook_size=UNITS, codebook_dimension=32, hidden_size=16, num_blocks=2, kernel_size=3,
                    spectrogram=dict(n_fft=256, win_length=256, hop_length=160, n_mels=20, griffin_lim_iters=4))


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> str:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.pt", seed=3)


@pytest.fixture(scope="module")
def unit_codec(tiny_whisper, make_speech) -> WhisperUnitCodec:
    fill = [make_speech(seconds, seed=10 + i) for i, seconds in enumerate((1.0, 0.7, 1.3))]
    return build_whisper_unit_codec(tiny_whisper, fill, encoder_blocks=1, codebook_size=UNITS, seed=0)


def with_vocoder(codec: WhisperUnitCodec) -> UnitVocoder:
    torch.manual_seed(0)
    return UnitVocoder(VocoderConfig(num_layers=1, **TINY_VOCODER), codec.codebook_vectors(1)).eval()


def test_blocks_are_cut_from_the_whisper_checkpoint(tiny_whisper, unit_codec, make_speech):
    full = whisper.load_model(tiny_whisper, device="cpu").encoder
    assert len(unit_codec.model.blocks) == 1 and unit_codec.config.n_audio_state == 32
    assert torch.equal(unit_codec.model.conv2.weight, full.conv2.weight.float())
    assert torch.equal(unit_codec.model.blocks[0].mlp[0].weight, full.blocks[0].mlp[0].weight.float())
    assert unit_codec.config.source == tiny_whisper
    # The frames are Whisper's first block on the clip's own length (its positional embeddings, its front).
    wave = make_speech(0.64, seed=1)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(wave), n_mels=80)
    with torch.no_grad():
        x = torch.nn.functional.gelu(full.conv2(torch.nn.functional.gelu(full.conv1(mel[None])))).permute(0, 2, 1)
        expected = full.blocks[0](x + full.positional_embedding[: x.shape[1]])[0]
    assert torch.allclose(unit_codec.frames(wave), expected, atol=1e-5)


def test_units_shapes_and_one_at_a_time(unit_codec, clips):
    units = unit_codec.encode(clips)
    assert [u.shape for u in units] == [(1, unit_codec.num_frames(len(c))) for c in clips]
    assert all(u.dtype == np.int64 and u.min() >= 0 and u.max() < UNITS for u in units)
    for clip, together in zip(clips, units, strict=True):
        assert np.array_equal(unit_codec.encode([clip])[0], together)
    assert len({int(x) for u in units for x in u[0]}) > 3  # different sounds, different units
    assert unit_codec.encode(clips, n_q=1)[0].shape[0] == 1


def test_clips_over_thirty_seconds_run_in_windows(unit_codec, make_speech):
    wave = make_speech(31.0, seed=2)
    units = unit_codec.encode([wave])[0]
    assert units.shape == (1, unit_codec.num_frames(len(wave)))
    # The first window is the first 30 s on its own, to the log-mel's edge: its last STFT window reads samples
    # past the cut, and the clip's loudest frame (which sets the log-mel's floor) may lie in either.
    alone = unit_codec.encode([wave[: 30 * 16000]])[0][0]
    assert (units[0, :1500] == alone).mean() > 0.99


def test_save_load_round_trip_with_its_vocoder(unit_codec, clips, tmp_path):
    unit_codec.add_vocoder(with_vocoder(unit_codec))
    try:
        unit_codec.save_pretrained(tmp_path / "codec")
        assert codec_type(tmp_path / "codec") == "whisper-units"
        assert json.loads((tmp_path / "codec" / "config.json").read_text())["encoder_blocks"] == 1
        loaded = load_codec(tmp_path / "codec")
        assert isinstance(loaded, WhisperUnitCodec) and loaded.decodes_with(1) == "vocoder"
        assert all(np.array_equal(a, b) for a, b in zip(loaded.encode(clips), unit_codec.encode(clips), strict=True))
        units = unit_codec.encode(clips[:2])
        for a, b in zip(loaded.decode_batch(units), unit_codec.decode_batch(units), strict=True):
            assert a.shape == b.shape and np.allclose(a, b)
        assert loaded.decode(units[0]).shape == (units[0].shape[1] * 320,)
        streamed = np.concatenate(list(loaded.decode_stream(iter(units[0][0].tolist()), chunk=4)))
        assert streamed.shape == (units[0].shape[1] * 320,)
    finally:
        unit_codec.vocoders.clear()


def test_errors(tiny_whisper, unit_codec, make_speech, tmp_path):
    fresh = WhisperUnitCodec.from_config(WhisperUnitConfig(n_audio_state=32, n_audio_head=2, encoder_blocks=1,
                                                           codebook_size=UNITS), seed=0)
    with pytest.raises(ValueError, match="empty codebook; call fill_codebooks"):
        fresh.encode([make_speech(0.5)])
    with pytest.raises(ValueError, match="at least one frame a code"):
        fresh.fill_codebooks([make_speech(0.1)])
    with pytest.raises(ValueError, match="no vocoder yet .*speechlm train-vocoder MANIFEST --codec"):
        unit_codec.decode(np.arange(5))
    with pytest.raises(ValueError, match="n_q=2; a whisper-units codec has one layer"):
        unit_codec.encode([make_speech(0.5)], n_q=2)
    with pytest.raises(ValueError, match="unit 99 at layer 0"):
        unit_codec._check_units(np.array([1, 99]), "units")
    with pytest.raises(ValueError, match="encoder_blocks=3, but the Whisper encoder in .* has 2 blocks"):
        build_whisper_unit_codec(tiny_whisper, [make_speech(1.0)], encoder_blocks=3, codebook_size=UNITS)
    with pytest.raises(ConfigError, match="n_audio_state=30 is not a multiple of n_audio_head=4"):
        WhisperUnitConfig(n_audio_state=30, n_audio_head=4)
    with pytest.raises(ValueError, match="does not fit this codec"):
        unit_codec.add_vocoder(UnitVocoder(VocoderConfig(num_layers=1, **{**TINY_VOCODER, "codebook_size": 8})))
    other = WhisperUnitCodec.from_config(unit_codec.config, seed=1)
    other.fill_codebooks([make_speech(1.0, seed=5)])
    with pytest.raises(ValueError, match="trained on another codebook"):
        other.add_vocoder(with_vocoder(unit_codec))
    # A saved folder whose weights do not fit its config, and one with a foreign key.
    unit_codec.save_pretrained(tmp_path / "codec")
    fresh.save_pretrained(tmp_path / "narrow")
    (tmp_path / "codec" / WEIGHTS_NAME).write_bytes((tmp_path / "narrow" / WEIGHTS_NAME).read_bytes())
    wider = json.loads((tmp_path / "codec" / "config.json").read_text()) | {"codebook_size": 32}
    (tmp_path / "codec" / "config.json").write_text(json.dumps(wider))
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME}: does not fit config.json .*codebook"):
        load_codec(tmp_path / "codec")
    (tmp_path / "codec" / "config.json").write_text(json.dumps(wider | {"codec_type": "mimi"}))
    with pytest.raises(ValueError, match="codec_type='mimi'; expected 'whisper-units'"):
        load_codec(tmp_path / "codec")
    (tmp_path / "codec" / "config.json").write_text(json.dumps(wider | {"codebook_size": 16, "layers": 3}))
    with pytest.raises(ValueError, match=r"unknown keys \['layers'\]"):
        load_codec(tmp_path / "codec")
