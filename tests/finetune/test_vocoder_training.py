from __future__ import annotations

import shutil

import numpy as np
import pytest

from speechlm.cli import main
from speechlm.finetune.vocoder_training import (
    VocoderTraining,
    manifest_clips,
    train_codec_vocoder,
    train_vocoder,
    vocoder_examples,
)
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec import SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.vocoder import VocoderConfig, vocoder_folder

TINY = dict(codebook_size=64, codebook_dimension=32, hidden_size=16, num_blocks=2, kernel_size=3,
            spectrogram=dict(n_fft=256, win_length=256, hop_length=160, n_mels=20, griffin_lim_iters=4))


def test_examples_align_units_and_log_mel(demo_corpus, demo_codec):
    waves = [load_audio(clip) for clip in manifest_clips([demo_corpus], max_clips=3)]
    config = VocoderConfig(num_layers=2, **TINY)
    examples = vocoder_examples(demo_codec, waves, config)
    for example, wave in zip(examples, waves, strict=True):
        frames = -(-len(wave) // 320)
        assert example.units.shape == (2, frames)
        assert example.log_mel.shape == (20, 2 * frames)


def test_a_tiny_vocoder_learns(demo_corpus, demo_codec):
    waves = [load_audio(clip) for clip in manifest_clips([demo_corpus], max_clips=4)]
    config = VocoderConfig(num_layers=1, **TINY)
    examples = vocoder_examples(demo_codec, waves, config)
    settings = VocoderTraining(max_steps=40, batch_size=4, crop_units=20, learning_rate=1e-2, warmup_steps=5)
    vocoder, report = train_vocoder(demo_codec, examples, config, settings)
    assert report.steps == 40 and report.clips == 4 and len(report.losses) == 4
    assert report.losses[-1] < 0.7 * report.losses[0]
    assert not vocoder.training


def test_train_vocoder_command_saves_into_the_codec(demo_corpus, tmp_path):
    codec_dir = tmp_path / "codec"
    shutil.copytree(demo_corpus.parent / "codec", codec_dir)
    overrides = [f"vocoder.{key}={value}" for key, value in TINY.items() if key not in ("spectrogram", "codebook_size",
                                                                                         "codebook_dimension")]
    overrides += ["vocoder.spectrogram.n_fft=256", "vocoder.spectrogram.win_length=256",
                  "training.max_steps=3", "training.batch_size=2", "training.max_clips=2"]
    assert main(["train-vocoder", str(demo_corpus), "--codec", str(codec_dir), "--layers", "1", *overrides]) == 0
    assert (codec_dir / vocoder_folder(1) / "vocoder_config.json").is_file()
    codec = SpeechTokenizerCodec.from_pretrained(codec_dir)
    assert codec.decodes_with(1) == "vocoder"  # the demo corpus's codec was built from a config
    assert codec.decode(np.arange(6)).shape == (6 * 320,)


def test_training_errors(demo_corpus, tmp_path):
    with pytest.raises(ConfigError) as caught:
        VocoderTraining(max_minutes=0, batch_size=0, max_clips=-1)
    assert [p.split("=")[0] for p in caught.value.problems] == ["max_minutes", "batch_size", "max_clips"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "no audio here"}\n')
    with pytest.raises(ValueError, match="no rows with 'audio'"):
        manifest_clips([empty], max_clips=None)
    with pytest.raises(ValueError, match="the codec in .* has 2 layers of 64 codes of width 32"):
        train_codec_vocoder(demo_corpus.parent / "codec", [demo_corpus], VocoderConfig(num_layers=3, **TINY),
                            VocoderTraining(max_steps=1))


def test_whisper_units_codec_and_its_vocoder_from_the_command_line(demo_corpus, tmp_path):
    from speechlm.speech_io.codec_loading import load_codec
    from speechlm.speech_io.whisper_units import WhisperUnitCodec
    from tests.conftest import save_tiny_whisper

    checkpoint = save_tiny_whisper(tmp_path / "tiny.pt")
    codec_dir = tmp_path / "units"
    assert main(["whisper-units", checkpoint, str(demo_corpus), "--out", str(codec_dir), "--blocks", "1",
                 "--size", "64", "--max-clips", "4"]) == 0
    codec = load_codec(codec_dir)
    assert isinstance(codec, WhisperUnitCodec) and codec.decodes_with(1) == "none"
    overrides = [f"vocoder.{key}={value}" for key, value in TINY.items() if key not in ("spectrogram", "codebook_size",
                                                                                         "codebook_dimension")]
    overrides += ["vocoder.spectrogram.n_fft=256", "vocoder.spectrogram.win_length=256",
                  "training.max_steps=3", "training.batch_size=2", "training.max_clips=2"]
    assert main(["train-vocoder", str(demo_corpus), "--codec", str(codec_dir), "--layers", "1", *overrides]) == 0
    codec = load_codec(codec_dir)
    assert codec.decodes_with(1) == "vocoder"
    assert codec.decode(np.arange(6)).shape == (6 * 320,)
    with pytest.raises(ValueError, match="the codec in .* has 1 layers of 64 codes of width 32"):
        train_codec_vocoder(codec_dir, [demo_corpus], VocoderConfig(num_layers=2, **TINY), VocoderTraining(max_steps=1))
