"""Training RVQ completion for a codec: it learns, saves into the codec's folder, and the codec completes with it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from speechlm.cli import main
from speechlm.finetune.completion_training import (
    CompletionTraining,
    _batch,
    completion_config,
    completion_examples,
    train_codec_completion,
    train_completion,
)
from speechlm.speech_io.audio import load_audio
from speechlm.speech_io.codec import SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError

TINY = dict(hidden_size=32, num_blocks=2, num_heads=2, dropout=0.0)


def test_examples_hold_every_layer_and_crops_pad_as_the_model_reads_them(demo_corpus, demo_codec):
    examples = completion_examples(demo_codec, [demo_corpus], demo_codec.n_q, max_clips=4)
    assert len(examples) == 4 and all(codes.shape[0] == 2 and codes.shape[1] >= 20 for codes in examples)
    settings = CompletionTraining(batch_size=3, crop_frames=30, prompt_frames=12)
    prompt, prompt_padding, target, target_padding, known = _batch(examples, np.random.default_rng(0), settings)
    assert prompt.shape[:2] == (3, 2) and target.shape[:2] == (3, 2) and known == 1
    assert prompt.shape[2] <= 12 and target.shape[2] <= 30
    # prompts padded on the left, targets on the right
    assert not prompt_padding[:, -1].any() and not target_padding[:, 0].any()


def test_a_tiny_completion_model_learns(demo_corpus, demo_codec):
    examples = completion_examples(demo_codec, [demo_corpus], demo_codec.n_q, max_clips=None)
    settings = CompletionTraining(max_steps=60, batch_size=4, crop_frames=40, prompt_frames=20, learning_rate=1e-2,
                                  warmup_steps=5)
    model, report = train_completion(examples, completion_config(demo_codec, **TINY), settings,
                                     codebooks=demo_codec.codebook_vectors(demo_codec.n_q))
    assert report.steps == 60 and report.clips == len(examples) and len(report.losses) == 6
    assert report.losses[-1] < 0.8 * report.losses[0]
    assert not model.training and model.config.codebook_fingerprint


def test_train_completion_command_saves_into_the_codec_and_the_codec_completes(demo_corpus, tmp_path):
    codec_dir = tmp_path / "codec"
    shutil.copytree(demo_corpus.parent / "codec", codec_dir)
    overrides = [f"completion.{key}={value}" for key, value in TINY.items()]
    overrides += ["training.max_steps=3", "training.batch_size=2", "training.max_clips=4"]
    assert main(["train-completion", str(demo_corpus), "--codec", str(codec_dir), *overrides]) == 0
    codec = SpeechTokenizerCodec.from_pretrained(codec_dir)
    assert codec.completion is not None and (codec_dir / "completion" / "completion_config.json").is_file()
    voice = demo_corpus.parent / json.loads(demo_corpus.read_text().splitlines()[0])["audio"]
    units = codec.encode([load_audio(voice)])[0][0]
    codes = codec.complete(units, voice)
    assert codes.shape == (codec.n_q, len(units)) and (codes[0] == units).all()
    assert codec.decode(codes).shape == (len(units) * 320,)
    codec.save_pretrained(tmp_path / "again")  # the completion model travels with the codec
    assert SpeechTokenizerCodec.from_pretrained(tmp_path / "again").completion is not None
    with pytest.raises(ValueError, match="completion starts from layer 1 alone"):
        codec.complete(codes, voice)


def test_training_errors(demo_corpus, demo_codec, tmp_path):
    with pytest.raises(ConfigError) as caught:
        CompletionTraining(crop_frames=0, prompt_frames=-1, max_minutes=0)
    assert [p.split("=")[0] for p in caught.value.problems] == ["max_minutes", "crop_frames", "prompt_frames"]
    with pytest.raises(ValueError, match="the codec in .* has 2 layers of 64 codes of width 32"):
        train_codec_completion(demo_corpus.parent / "codec", [demo_corpus],
                               completion_config(demo_codec, num_layers=3), CompletionTraining(max_steps=1))
    with pytest.raises(ValueError, match="nothing to learn from"):
        train_completion([torch.zeros(2, 5, dtype=torch.long)][:0], completion_config(demo_codec),
                         CompletionTraining(max_steps=1), codebooks=demo_codec.codebook_vectors(2))
    fresh = SpeechTokenizerCodec.from_pretrained(demo_corpus.parent / "codec")
    with pytest.raises(ValueError, match="no completion model"):
        fresh.complete([1, 2, 3], demo_corpus.parent / json.loads(demo_corpus.read_text().splitlines()[0])["audio"])
