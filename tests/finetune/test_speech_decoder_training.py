from __future__ import annotations

import shutil

import pytest
import torch

from speechlm.cli import main
from speechlm.finetune.speech_decoder_training import (
    SpeechDecoderTraining,
    SpokenText,
    fit_symbol_frames,
    manifest_spoken_texts,
    train_speech_decoder,
)
from speechlm.speech_io.codec import SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, SpeechDecoderConfig, codebook_fingerprint

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, dropout=0.0)


def test_each_symbol_gets_its_own_frames_from_the_clips_lengths():
    # symbol 2 lasts 6 frames, symbol 3 two; symbol 4 is never said and keeps the mean rate; symbol 5, said once
    # before a long pause, stays near the rate
    clips = [[2, 3], [2, 2, 3], [3, 3, 3, 2], [2]] * 25
    pairs = [(torch.tensor(ids), [0] * sum(6 if i == 2 else 2 for i in ids)) for ids in clips]
    pairs.append((torch.tensor([5]), [0] * 40))
    rate, frames = fit_symbol_frames(pairs, vocabulary_size=4)
    assert rate == pytest.approx(sum(len(u) for _, u in pairs) / 251)
    assert frames[:3] == pytest.approx([6.0, 2.0, rate], rel=0.15)  # 100 short clips: the prior draws a little
    assert abs(frames[3] - rate) < 0.2 * (40 - rate)  # mostly the rate, not the one clip's 40
    assert fit_symbol_frames(pairs, 4, prior_weight=0.0)[1] == pytest.approx([6.0, 2.0, rate, 40.0], abs=1e-6)


def test_a_decoder_with_symbol_durations_spreads_by_them():
    spoken = [SpokenText("ab", [1] * 12 + [2] * 4), SpokenText("ba", [2] * 4 + [1] * 12),
              SpokenText("a", [1] * 12), SpokenText("b", [2] * 4)] * 25
    config = SpeechDecoderConfig(codebook_size=8, symbols="characters", units_per_position=1, symbol_durations=True,
                                 **TINY)
    decoder, _ = train_speech_decoder(spoken, config, SpeechDecoderTraining(max_steps=2, batch_size=2))
    frames = dict(zip(decoder.config.vocabulary, decoder.config.symbol_frames, strict=True))
    assert frames == pytest.approx({"a": 12.0, "b": 4.0}, abs=1.5)  # the prior draws them a little to the mean
    ids = decoder.encode_text("ab")[0]
    spans = decoder.positions(ids).tolist()
    assert spans.count(int(ids[0])) > 2 * spans.count(int(ids[1]))  # "a" speaks about three times as long as "b"
    even, _ = train_speech_decoder(spoken, SpeechDecoderConfig(codebook_size=8, symbols="characters",
                                                               symbol_durations=False, **TINY),
                                   SpeechDecoderTraining(max_steps=2, batch_size=2))
    assert even.config.symbol_frames == [] and even.config.units_per_symbol == decoder.config.units_per_symbol


def test_spoken_texts_come_with_their_units(demo_corpus, demo_codec):
    spoken = manifest_spoken_texts([demo_corpus], demo_codec, max_clips=3)
    assert len(spoken) == 3
    for item in spoken:
        assert item.text and len(item.units) > 10 and all(0 <= u < demo_codec.codebook_size for u in item.units)


@pytest.mark.parametrize(("symbols", "units_per_position", "symbol_durations"),
                         [("characters", 1, False), ("phonemes", 1, True), ("characters", 2, True)])
def test_a_tiny_speech_decoder_learns(symbols, units_per_position, symbol_durations):
    # Two "words" whose units differ: the decoder must learn which symbols sound like which units.
    spoken = [SpokenText("ab ab.", [1] * 6 + [2] * 6), SpokenText("ba.", [2] * 4 + [1] * 4),
              SpokenText("aab.", [1] * 8 + [2] * 4)] * 4
    config = SpeechDecoderConfig(codebook_size=8, symbols=symbols, units_per_position=units_per_position,
                                 symbol_durations=symbol_durations, **TINY)
    settings = SpeechDecoderTraining(max_steps=60, batch_size=4, learning_rate=1e-2, warmup_steps=5)
    decoder, report = train_speech_decoder(spoken, config, settings)
    assert report.steps == 60 and report.clips == 12 and len(report.losses) == 6
    assert report.losses[-1] < 0.5 * report.losses[0]
    assert not decoder.training and decoder.config.vocabulary  # filled from the texts
    assert decoder.config.units_per_symbol > 1
    assert set(decoder.speak("ab.")) <= {1, 2}


def test_train_speech_decoder_command_saves_into_the_codec(demo_corpus, tmp_path):
    codec_dir = tmp_path / "codec"
    shutil.copytree(demo_corpus.parent / "codec", codec_dir)
    overrides = [f"speech_decoder.{key}={value}" for key, value in TINY.items()]
    overrides += ["speech_decoder.symbols=characters", "training.max_steps=3", "training.batch_size=2",
                  "training.max_clips=4"]
    assert main(["train-speech-decoder", str(demo_corpus), "--codec", str(codec_dir), *overrides]) == 0
    codec = SpeechTokenizerCodec.from_pretrained(codec_dir)
    assert codec.speech_decoder is not None
    assert codec.speech_decoder.config.codebook_fingerprint == codebook_fingerprint(codec.codebook_vectors(1)[0])
    assert len(codec.speech_decoder.speak("hello there")) > 0
    assert (codec_dir / SPEECH_DECODER_FOLDER / "speech_decoder_config.json").is_file()


def test_training_errors(demo_corpus, demo_codec, tmp_path):
    with pytest.raises(ConfigError, match="max_minutes=0"):
        SpeechDecoderTraining(max_minutes=0)
    no_text = tmp_path / "no-text.jsonl"
    no_text.write_text(demo_corpus.read_text().splitlines()[0].replace('"text"', '"label"') + "\n")
    shutil.copytree(demo_corpus.parent / "wavs", tmp_path / "wavs")
    with pytest.raises(ValueError, match="no-text.jsonl: row 1 has audio but no 'text'"):
        manifest_spoken_texts([no_text], demo_codec, None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no audio here"}\n')
    with pytest.raises(ValueError, match="no rows with 'audio' and 'text'"):
        manifest_spoken_texts([empty], demo_codec, None)
    with pytest.raises(ValueError, match="nothing to learn"):
        train_speech_decoder([SpokenText("...", [])], SpeechDecoderConfig(codebook_size=8, symbols="characters",
                                                                          **TINY),
                             SpeechDecoderTraining(max_steps=1))
    codec_dir = tmp_path / "codec"
    shutil.copytree(demo_corpus.parent / "codec", codec_dir)
    assert main(["train-speech-decoder", str(demo_corpus), "--codec", str(codec_dir),
                 "speech_decoder.codebook_size=7", "training.max_steps=1"]) == 2
