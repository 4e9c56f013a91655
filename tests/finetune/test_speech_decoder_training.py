from __future__ import annotations

import shutil

import pytest

from speechlm.cli import main
from speechlm.finetune.speech_decoder_training import (
    SpeechDecoderTraining,
    SpokenText,
    manifest_spoken_texts,
    train_speech_decoder,
)
from speechlm.speech_io.codec import SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.speech_decoder import SPEECH_DECODER_FOLDER, SpeechDecoderConfig, codebook_fingerprint

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, dropout=0.0)


def test_spoken_texts_come_with_their_units(demo_corpus, demo_codec):
    spoken = manifest_spoken_texts([demo_corpus], demo_codec, max_clips=3)
    assert len(spoken) == 3
    for item in spoken:
        assert item.text and len(item.units) > 10 and all(0 <= u < demo_codec.codebook_size for u in item.units)


@pytest.mark.parametrize(("symbols", "units_per_position"), [("characters", 1), ("phonemes", 1), ("characters", 2)])
def test_a_tiny_speech_decoder_learns(symbols, units_per_position):
    # Two "words" whose units differ: the decoder must learn which symbols sound like which units.
    spoken = [SpokenText("ab ab.", [1] * 6 + [2] * 6), SpokenText("ba.", [2] * 4 + [1] * 4),
              SpokenText("aab.", [1] * 8 + [2] * 4)] * 4
    config = SpeechDecoderConfig(codebook_size=8, symbols=symbols, units_per_position=units_per_position, **TINY)
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
