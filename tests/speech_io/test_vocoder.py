from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm.speech_io.codec import DECODER_TRAINED_KEY, SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.spectrogram import MelSpectrogram, SpectrogramConfig, mel_filterbank
from speechlm.speech_io.vocoder import UnitVocoder, VocoderConfig, vocoder_folder

TINY = dict(codebook_size=64, codebook_dimension=32, hidden_size=16, num_blocks=2, kernel_size=3,
            spectrogram=dict(n_fft=256, win_length=256, hop_length=160, n_mels=20, griffin_lim_iters=4))


def tiny_vocoder(codec: SpeechTokenizerCodec, num_layers: int = 1, seed: int = 0) -> UnitVocoder:
    torch.manual_seed(seed)
    return UnitVocoder(VocoderConfig(num_layers=num_layers, **TINY), codec.codebook_vectors(num_layers)).eval()


def test_mel_filterbank_covers_the_band():
    filters = mel_filterbank(1024, 80)
    assert filters.shape == (80, 513)
    assert (filters >= 0).all() and (filters.sum(dim=1) > 0).all()  # no empty band
    assert filters[:, 1:-1].sum(dim=0).gt(0).all()  # every bin inside the band is heard


def test_griffin_lim_rebuilds_the_log_mel(make_speech):
    spectrogram = MelSpectrogram(SpectrogramConfig(griffin_lim_iters=32))
    wave = make_speech(1.0)
    log_mel = spectrogram.log_mel(wave)
    assert log_mel.shape == (80, 16000 // 160 + 1)
    rebuilt = spectrogram.waveform(log_mel, len(wave))
    assert rebuilt.shape == wave.shape and rebuilt.dtype == np.float32
    error = (spectrogram.log_mel(rebuilt) - log_mel).abs().mean().item()
    silence = (torch.full_like(log_mel, log_mel.mean()) - log_mel).abs().mean().item()
    assert error < 0.25 * silence
    assert np.array_equal(rebuilt, spectrogram.waveform(log_mel, len(wave)))  # seeded phase: reproducible


def test_vocoder_reads_units_as_the_codec_decodes_them(narrow_codec):
    vocoder = tiny_vocoder(narrow_codec, num_layers=2)
    units = torch.randint(0, 64, (1, 2, 9))
    summed = torch.nn.functional.embedding(units + torch.tensor([0, 64])[None, :, None], vocoder.codebooks).sum(1)
    latent = narrow_codec.model.quantizer.decode(units.transpose(0, 1))  # the codec's decoder input, 1, D, T
    assert torch.allclose(summed.transpose(1, 2), latent, atol=1e-6)
    assert vocoder.input_scale.item() == pytest.approx(1 / narrow_codec.codebook_vectors(1).std().item())
    with pytest.raises(ValueError, match=r"codebooks of shape \(1, 64, 32\); the vocoder config expects \(2, 64, 32\)"):
        UnitVocoder(VocoderConfig(num_layers=2, **TINY), narrow_codec.codebook_vectors(1))


def test_vocoder_shapes_batch_and_round_trip(narrow_codec, tmp_path):
    vocoder = tiny_vocoder(narrow_codec, num_layers=2)
    units = [torch.randint(0, 64, (2, length)) for length in (7, 12, 3)]
    assert vocoder(units[1][None]).shape == (1, 20, 24)  # two mel frames a unit at hop 160
    waves = vocoder.decode_batch(units)
    assert [w.shape for w in waves] == [(7 * 320,), (12 * 320,), (3 * 320,)]
    assert all(np.array_equal(w, vocoder.decode(u)) for w, u in zip(waves, units, strict=True))
    vocoder.save_pretrained(tmp_path)
    loaded = UnitVocoder.from_pretrained(tmp_path)
    assert loaded.config == vocoder.config and torch.equal(loaded.codebooks, vocoder.codebooks)
    assert np.array_equal(loaded.decode(units[0]), waves[0])


def test_vocoder_errors(narrow_codec, tmp_path):
    with pytest.raises(ConfigError) as caught:
        VocoderConfig(num_layers=0, kernel_size=4, spectrogram=dict(hop_length=100))
    assert [p.split("=")[0] for p in caught.value.problems] == ["num_layers", "kernel_size", "spectrogram.hop_length"]
    with pytest.raises(ValueError, match=r"reads 2 RVQ layers; got units of shape \(1, 5\)"):
        tiny_vocoder(narrow_codec, num_layers=2).decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="vocoder_config.json: missing"):
        UnitVocoder.from_pretrained(tmp_path)
    tiny_vocoder(narrow_codec).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "vocoder_config.json").read_text())
    (tmp_path / "vocoder_config.json").write_text(json.dumps({**data, "hidden_size": 8}))
    with pytest.raises(ValueError, match="model.safetensors: does not fit vocoder_config.json"):
        UnitVocoder.from_pretrained(tmp_path)


def test_codec_decodes_with_its_vocoder_while_its_decoder_is_untrained(narrow_codec, tmp_path):
    vocoder = tiny_vocoder(narrow_codec)
    units = np.arange(9) % 64
    codec = SpeechTokenizerCodec(narrow_codec.model, narrow_codec.config, decoder_trained=False)
    assert codec.decodes_with(1) == "speechtokenizer"  # no vocoder yet
    codec.add_vocoder(vocoder)
    assert codec.decodes_with(1) == "vocoder" and codec.decodes_with(2) == "speechtokenizer"
    assert np.array_equal(codec.decode(units), vocoder.decode(torch.from_numpy(units)[None]))
    assert codec.decode(np.stack([units, units])).shape == (9 * 320,)  # two layers: the codec's decoder

    codec.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[DECODER_TRAINED_KEY] is False
    assert (tmp_path / vocoder_folder(1) / "model.safetensors").is_file()
    loaded = SpeechTokenizerCodec.from_pretrained(tmp_path)
    assert loaded.decodes_with(1) == "vocoder"
    assert np.array_equal(loaded.decode(units), codec.decode(units))

    # A published checkpoint's config has no such key: its decoder decodes, whatever vocoder sits beside it.
    data = json.loads((tmp_path / "config.json").read_text())
    del data[DECODER_TRAINED_KEY]
    (tmp_path / "config.json").write_text(json.dumps(data))
    published = SpeechTokenizerCodec.from_pretrained(tmp_path)
    assert published.decoder_trained and published.decodes_with(1) == "speechtokenizer"
    assert np.array_equal(published.decode(units), narrow_codec.decode(units))

    # A codec refilled after its vocoder trained: the vocoder's codebooks no longer match, and loading says so.
    refilled = SpeechTokenizerCodec.from_pretrained(tmp_path)
    refilled.vocoders.clear()
    refilled.fill_codebooks(None, seed=1)
    refilled.save_pretrained(tmp_path / "refilled")
    (tmp_path / "refilled" / vocoder_folder(1)).mkdir()
    for name in ("vocoder_config.json", "model.safetensors"):
        (tmp_path / "refilled" / vocoder_folder(1) / name).write_bytes((tmp_path / vocoder_folder(1) / name).read_bytes())
    with pytest.raises(ValueError, match="vocoder-rvq1: the vocoder for 1 layers was trained on other codebooks"):
        SpeechTokenizerCodec.from_pretrained(tmp_path / "refilled")


def test_vocoder_stream_yields_early_and_matches_the_length(narrow_codec):
    codec = SpeechTokenizerCodec(narrow_codec.model, narrow_codec.config, decoder_trained=False)
    codec.add_vocoder(tiny_vocoder(narrow_codec))
    assert codec.stream_lookahead == codec.vocoders[1].lookahead
    consumed = []

    def generating():
        for step in range(60):
            consumed.append(step)
            yield step % 64

    stream = codec.decode_stream(generating(), chunk=5)
    first = next(stream)
    assert len(first) == 5 * 320
    assert len(consumed) == 5 + codec.stream_lookahead < 60
    whole = np.concatenate([first, *stream])
    assert whole.shape == (60 * 320,) and np.isfinite(whole).all()
    # Units of layers no vocoder reads stream through the codec's own decoder, as `decode` takes them.
    two_layers = np.stack([np.arange(12) % 64, np.arange(12)[::-1] % 64])
    streamed = np.concatenate(list(codec.decode_stream([two_layers[:, :7], two_layers[:, 7:]], chunk=4)))
    assert np.allclose(streamed, codec.decode(two_layers), atol=1e-5)


def test_add_vocoder_refuses_another_codebook(narrow_codec):
    codec = SpeechTokenizerCodec(narrow_codec.model, narrow_codec.config, decoder_trained=False)
    with pytest.raises(ValueError, match="does not fit this codec"):
        codec.add_vocoder(UnitVocoder(VocoderConfig(**{**TINY, "codebook_size": 32})))
    with pytest.raises(ValueError, match="trained on other codebooks than this codec's"):
        codec.add_vocoder(UnitVocoder(VocoderConfig(num_layers=1, **TINY), torch.ones(1, 64, 32)))
