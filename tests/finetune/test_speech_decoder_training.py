from __future__ import annotations

import shutil

import pytest
import torch

from speechlm.cli import main
from speechlm.finetune.speech_decoder_training import (
    SpeechDecoderTraining,
    SpokenText,
    alignment_frames,
    fit_symbol_frames,
    manifest_spoken_texts,
    row_alignment,
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


def test_alignment_frames_sum_to_the_clips_frames_in_proportion():
    frames = alignment_frames([0.1, 0.02, 0.3, 0.08], 26)
    assert frames.tolist() == [5, 1, 16, 4]  # cut at 5.2, 6.24, 21.84 and 26 frames
    assert int(alignment_frames([0.013] * 7, 5).sum()) == 5  # shorter than a frame each: some get none


def test_row_alignments_are_read_and_bad_ones_named():
    assert row_alignment({"text": "a"}, "m: row 1") is None
    assert row_alignment({"alignment": [[["h", 0.1], ["i", 0.2]], [["!", 0.05]]]}, "m") == [
        ("h", 0.1), ("i", 0.2), ("!", 0.05)]
    for bad in ([["h", 0.1]], [[["h", -1.0]]], [[["h"]]], "h 0.1", []):
        with pytest.raises(ValueError, match="m.jsonl: row 3: 'alignment' should be a list of sentences"):
            row_alignment({"alignment": bad}, "m.jsonl: row 3")


def aligned(text: str, seconds: dict[str, float], unit_of: dict[str, int]) -> SpokenText:
    """A clip of ``text`` whose phonemes last ``seconds`` (0.02 s a frame) and say ``unit_of`` their first letter."""
    from speechlm.speech_io.speech_decoder import text_sentences

    sentences = text_sentences(text, "phonemes")
    pairs = [(s, seconds.get(s, 0.04)) for sentence in sentences for s in sentence]
    units = [unit for s, sec in pairs for unit in [unit_of.get(s, 3)] * round(sec / 0.02)]
    return SpokenText(text, units, pairs, source=text)


def test_a_duration_predictor_learns_each_phonemes_frames_from_alignments():
    # "s" lasts 10 frames, every other phoneme 2: the predictor learns it, and the positions follow
    texts = ["sass", "so", "us", "see", "as"]
    spoken = [aligned(text, {"s": 0.2}, {"s": 1}) for text in texts] * 6
    config = SpeechDecoderConfig(codebook_size=8, symbols="phonemes", units_per_position=1, duration_predictor=True,
                                 **TINY)
    settings = SpeechDecoderTraining(max_steps=80, batch_size=6, learning_rate=1e-2, warmup_steps=5)
    decoder, report = train_speech_decoder(spoken, config, settings)
    assert report.losses[-1] < 0.3 * report.losses[0]
    ids = decoder.encode_text("sass")[0]
    frames = decoder.symbol_frames(ids)
    s = decoder.symbol_ids["s"]
    assert all(abs(f - (10 if i == s else 2)) < 2.5 for i, f in zip(ids.tolist(), frames.tolist(), strict=True)), frames
    assert len(decoder.positions(ids)) == pytest.approx(float(frames.sum()), abs=1)


def test_duration_training_errors():
    config = SpeechDecoderConfig(codebook_size=8, symbols="phonemes", duration_predictor=True, **TINY)
    with pytest.raises(ValueError, match="no clip has an 'alignment'"):
        train_speech_decoder([SpokenText("so", [1, 1, 2])], config, SpeechDecoderTraining(max_steps=1))
    wrong = SpokenText("so", [1, 1, 2], [("x", 0.1), ("y", 0.1)], source="m.jsonl: row 7")
    with pytest.raises(ValueError, match="m.jsonl: row 7.*not espeak-ng's for the text"):
        train_speech_decoder([wrong], config, SpeechDecoderTraining(max_steps=1))
    with pytest.raises(ConfigError, match="duration_predictor=true with symbols='characters'"):
        SpeechDecoderConfig(symbols="characters", duration_predictor=True)
    # without duration_predictor, an alignment is not read (nor checked)
    plain = SpeechDecoderConfig(codebook_size=8, symbols="phonemes", **TINY)
    train_speech_decoder([wrong], plain, SpeechDecoderTraining(max_steps=1))


def test_clips_without_alignments_are_spread_evenly_not_by_the_untrained_predictor(monkeypatch):
    from speechlm.speech_io.speech_decoder import SpeechDecoder

    monkeypatch.setattr(SpeechDecoder, "symbol_frames", lambda self, ids: pytest.fail("spread by the predictor"))
    spoken = [aligned("sass", {"s": 0.2}, {"s": 1}), SpokenText("so", [1] * 12 + [2] * 4)] * 3
    config = SpeechDecoderConfig(codebook_size=8, symbols="phonemes", units_per_position=1, duration_predictor=True,
                                 symbol_durations=False, **TINY)
    decoder, report = train_speech_decoder(spoken, config, SpeechDecoderTraining(max_steps=2, batch_size=2))
    assert report.steps == 2 and decoder.config.symbol_frames == []
