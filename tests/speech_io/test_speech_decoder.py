"""The speech decoder: text -> symbols -> frames -> units; saving, loading, and its codec's checks."""

from __future__ import annotations

import json

import pytest
import torch

from speechlm.finetune.demo_data import NARROW_CODEC
from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec
from speechlm.speech_io.codec_loading import load_codec
from speechlm.speech_io.config_errors import ConfigError
from speechlm.speech_io.speech_decoder import (
    SPEECH_DECODER_FOLDER,
    UNKNOWN,
    SpeechDecoder,
    SpeechDecoderConfig,
    codebook_fingerprint,
    merged_units,
    smooth_flickers,
    spread,
    text_sentences,
)
from speechlm.speech_io.whisper_units import WhisperUnitCodec, WhisperUnitConfig

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, dropout=0.0)


def tiny_decoder(codebook_size: int = 64, *, symbols: str = "characters", seed: int = 0, **changes) -> SpeechDecoder:
    torch.manual_seed(seed)
    config = SpeechDecoderConfig(codebook_size=codebook_size, symbols=symbols, vocabulary=list("abcdehilorstw "),
                                 units_per_symbol=2.5, **TINY | {"units_per_position": 1} | changes)
    return SpeechDecoder(config).eval()


def test_sentences_of_characters_and_phonemes():
    assert text_sentences("Hi there. How are you?", "characters") == [list("hi there."), list("how are you?")]
    assert text_sentences("  ...  ", "characters") == [list("...")]
    assert text_sentences("", "characters") == []
    phonemes = text_sentences("Hello world. Good morning!", "phonemes")
    assert len(phonemes) == 2 and phonemes[0][-1] == " "
    assert "h" in phonemes[0] and "w" in phonemes[0]  # /həloʊ wɜːld/
    with pytest.raises(ValueError, match="symbols='words'"):
        text_sentences("hi", "words")


@pytest.mark.parametrize(("frames", "symbols"), [(10, 4), (4, 4), (2, 5), (17, 3)])
def test_spread_gives_every_symbol_a_frame(frames, symbols):
    counts = spread(frames, symbols)
    assert len(counts) == symbols and counts.min() >= 1
    assert abs(int(counts.sum()) - max(frames, symbols)) <= 1
    assert counts.max() - counts.min() <= 2


@pytest.mark.parametrize(("frames", "weights"), [(10, [4.0, 1.0]), (6, [0.1, 0.1, 10.0]), (4, [0.0, 5.0, 0.0]),
                                                  (40, [0.2, 1.0, 0.9, 15.0, 0.0, 2.5])])
def test_spread_by_weights_keeps_the_length(frames, weights):
    counts = spread(frames, len(weights), torch.tensor(weights))
    assert int(counts.sum()) == max(frames, len(weights)) and counts.min() >= 1  # not one more per short symbol
    assert int(counts.argmax()) == int(torch.tensor(weights).argmax())  # the longest symbol keeps the most


def test_speaking_shapes_and_lengths():
    decoder = tiny_decoder()
    ids = decoder.encode_text("Hello world. What is this?")
    assert [len(i) for i in ids] == [12, 13]
    assert UNKNOWN in ids[0].tolist()  # "." and "?" are not in the tiny vocabulary
    assert decoder.positions(ids[0]).shape == (30,)  # 12 symbols at 2.5 a symbol
    assert decoder(decoder.positions(ids[0])[None]).shape == (1, 30, 65)  # the units and CTC's blank
    units = decoder.speak("Hello world. What is this?")
    assert len(units) == 30 + round(13 * 2.5)
    assert all(0 <= u < 64 for u in units)
    assert decoder.speak("") == [] and decoder.speak(" \n") == []


def test_positions_repeat_each_symbol_over_its_share():
    decoder = tiny_decoder(units_per_position=2)
    ids = torch.tensor([5, 6, 7])
    assert decoder.positions(ids, 12).tolist() == [5, 5, 6, 6, 7, 7]  # 12 frames: 6 positions, 2 a symbol
    assert decoder.positions(ids, 2).tolist() == [5, 6, 7]  # too few frames: each symbol still gets a position


@pytest.mark.parametrize("kernel", [1, 3, 5])  # position-wise feed-forwards, and over 3 or 5 positions
def test_a_padded_batch_speaks_as_its_rows_alone(kernel):
    decoder = tiny_decoder(feed_forward_kernel=kernel, num_layers=2)
    rows = [decoder.positions(decoder.encode_text(text)[0]) for text in ("Hello world", "the cat")]
    batch = decoder(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
                    torch.tensor([[False] * len(rows[0]), [False] * len(rows[1]) + [True] * 10]))
    for index, row in enumerate(rows):
        alone = decoder(row[None])[0]
        torch.testing.assert_close(batch[index, :len(alone)], alone, atol=1e-5, rtol=1e-4)


def test_symbol_durations_share_the_positions_and_set_the_length():
    vocabulary = list("abcdehilorstw ")
    decoder = tiny_decoder(symbol_durations=True, symbol_frames=[4.0 if s == "a" else 1.0 for s in vocabulary])
    ids = decoder.encode_text("ab")[0]
    a, b = ids.tolist()
    assert decoder.positions(ids).tolist() == [a] * 4 + [b]  # "a" speaks 4 frames, "b" 1
    assert decoder.positions(ids, 10).tolist() == [a] * 8 + [b] * 2  # a clip's own length, shared 4:1
    assert len(decoder.speak("ab")) == 5 and len(tiny_decoder().speak("ab")) == 5  # 2.5 frames a symbol
    with pytest.raises(ConfigError, match="symbol_frames has 2 entries"):
        SpeechDecoderConfig(vocabulary=["a"], symbol_frames=[1.0, 2.0])


def test_positions_that_speak_several_frames():
    decoder = tiny_decoder(units_per_position=2)
    ids = decoder.encode_text("Hello world. What is this?")
    assert decoder.positions(ids[0]).shape == (15,)  # 30 frames, 2 a position
    assert decoder.positions(ids[1], 33).shape == (17,)  # the last position's second frame is spoken too
    assert decoder(decoder.positions(ids[0])[None]).shape == (1, 30, 65)
    assert len(decoder.speak("Hello world. What is this?")) == 30 + round(13 * 2.5)
    assert decoder.speak_batch(["Hello world.", "the cat sat"]) == [decoder.speak("Hello world."),
                                                                     decoder.speak("the cat sat")]
    with pytest.raises(ConfigError, match="units_per_position=0"):
        SpeechDecoderConfig(units_per_position=0)


def test_speaking_is_sentence_by_sentence_and_batch_free():
    decoder = tiny_decoder()
    texts = ["Hello world. What is this?", "Short one.", "the cat sat"]
    together = decoder.speak(texts[0])
    assert together == decoder.speak("Hello world.") + decoder.speak("What is this?")
    assert decoder.speak_batch(texts) == [decoder.speak(t) for t in texts]


def test_each_frame_speaks_its_likeliest_unit_but_the_blank():
    decoder = tiny_decoder(codebook_size=4)
    with torch.no_grad():  # logits: the blank first on every frame, unit 1 next
        decoder.head.weight.zero_()
        decoder.head.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 5.0]))
    ids = decoder.encode_text("ab")[0]
    assert decoder.speak_sentence(ids) == [1] * 5
    original = decoder.forward

    def scripted(frames, padding=None):
        logits = original(frames, padding)
        logits[0, 1, 2] = 3.0  # one frame of unit 2 between two of unit 1: a flicker
        logits[0, 3:, 3] = 3.0  # the last two frames unit 3
        return logits

    decoder.forward = scripted
    assert decoder.speak_sentence(ids) == [1, 1, 1, 3, 3]


def test_a_one_frame_flicker_takes_its_neighbours_unit():
    assert smooth_flickers(torch.tensor([1, 2, 1, 3, 3, 2, 3, 4])).tolist() == [1, 1, 1, 3, 3, 3, 3, 4]
    assert smooth_flickers(torch.tensor([5, 6])).tolist() == [5, 6]  # too short to flicker
    assert smooth_flickers(torch.tensor([1, 2, 2, 1])).tolist() == [1, 2, 2, 1]  # two frames are a unit


def test_save_and_load_round_trip(tmp_path):
    decoder = tiny_decoder(symbols="phonemes")
    decoder.save_pretrained(tmp_path / "d")
    loaded = SpeechDecoder.from_pretrained(tmp_path / "d")
    assert loaded.config == decoder.config and not loaded.training
    assert loaded.speak("Hello world.") == decoder.speak("Hello world.")


def test_a_duration_predictor_sets_the_positions_and_is_saved_with_the_decoder(tmp_path):
    decoder = tiny_decoder(symbols="phonemes", units_per_position=2, duration_predictor=True, seed=3)
    with torch.no_grad():  # every symbol log(1 + 4) frames, whatever it reads
        decoder.durations.out.weight.zero_()
        decoder.durations.out.bias.fill_(float(torch.tensor(5.0).log()))
    ids = decoder.encode_text("Hello world.")[0]
    assert decoder.symbol_frames(ids).tolist() == pytest.approx([4.0] * len(ids))
    assert len(decoder.positions(ids)) == 2 * len(ids)  # 4 frames a symbol, 2 a position
    assert decoder.mean_symbol_frames(ids) is None  # this one has no mean frames: the predictor speaks
    decoder.save_pretrained(tmp_path / "d")
    loaded = SpeechDecoder.from_pretrained(tmp_path / "d")
    assert loaded.config.duration_predictor and loaded.speak("Hello world.") == decoder.speak("Hello world.")
    assert len(loaded.speak("Hello world.")) == 4 * len(ids)


def test_a_decoder_saved_before_its_newer_settings_speaks_as_it_did(tmp_path):
    decoder = tiny_decoder(units_per_position=1, feed_forward_kernel=1)
    decoder.save_pretrained(tmp_path / "d")
    config = tmp_path / "d" / "speech_decoder_config.json"
    data = json.loads(config.read_text())
    for key in ("units_per_position", "symbol_durations", "symbol_frames", "feed_forward_kernel"):
        del data[key]
    config.write_text(json.dumps(data))
    loaded = SpeechDecoder.from_pretrained(tmp_path / "d")
    assert loaded.config.units_per_position == 1 and SpeechDecoderConfig().units_per_position == 2
    assert loaded.config.feed_forward_kernel == 1 and SpeechDecoderConfig().feed_forward_kernel == 3
    assert not loaded.config.symbol_durations and loaded.config.symbol_frames == []  # every symbol the same
    assert loaded.speak("Hello world.") == decoder.speak("Hello world.")


def test_feed_forwards_read_each_position_with_its_neighbours():
    layer = tiny_decoder(feed_forward_kernel=3).layers.layers[0]
    positions = torch.arange(1.0, 7.0).reshape(1, 3, 2)  # three positions of width 2, the last one padding
    neighbours = layer._neighbours(positions, torch.tensor([[False, False, True]]))
    assert neighbours.tolist() == [[[0, 0, 1, 2, 3, 4], [1, 2, 3, 4, 0, 0], [3, 4, 0, 0, 0, 0]]]
    assert layer.linear1.in_features == 3 * TINY["hidden_size"]


@pytest.mark.parametrize("kernel", [0, 2, -3])
def test_a_feed_forward_kernel_is_odd_and_positive(kernel):
    with pytest.raises(ConfigError, match=f"feed_forward_kernel={kernel}"):
        SpeechDecoderConfig(feed_forward_kernel=kernel)


def test_loading_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="speech_decoder_config.json: missing"):
        SpeechDecoder.from_pretrained(tmp_path)
    tiny_decoder().save_pretrained(tmp_path / "d")
    config = tmp_path / "d" / "speech_decoder_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps(data | {"hidden_size": 32}))
    with pytest.raises(ValueError, match="does not fit speech_decoder_config.json"):
        SpeechDecoder.from_pretrained(tmp_path / "d")
    config.write_text(json.dumps(data | {"symbols": "words", "units_per_symbol": 0}))
    with pytest.raises(ValueError, match="speech_decoder_config.json: invalid speech decoder config") as error:
        SpeechDecoder.from_pretrained(tmp_path / "d")
    assert "symbols='words'" in str(error.value) and "units_per_symbol=0" in str(error.value)


def test_config_errors():
    with pytest.raises(ConfigError, match="hidden_size=30 .expected a multiple of num_heads=4"):
        SpeechDecoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="dropout=1"):
        SpeechDecoderConfig(dropout=1)


def test_merged_units():
    assert merged_units([3, 3, 1, 1, 1, 3, 2]) == [3, 1, 3, 2]
    assert merged_units([]) == []


def unit_codec(kind: str, make_speech, seed: int = 0):
    if kind == "speechtokenizer":
        codec = SpeechTokenizerCodec.from_config(CodecConfig(**NARROW_CODEC), seed=seed)
    else:
        codec = WhisperUnitCodec.from_config(WhisperUnitConfig(n_audio_state=32, n_audio_head=2, encoder_blocks=1,
                                                               codebook_size=64), seed=seed)
    codec.fill_codebooks([make_speech(1.0, seed=s + seed) for s in range(3)], seed=seed)
    return codec


@pytest.mark.parametrize("kind", ["speechtokenizer", "whisper-units"])
def test_the_codec_keeps_its_speech_decoder(kind, make_speech, tmp_path):
    codec = unit_codec(kind, make_speech)
    assert codec.speech_decoder is None
    decoder = tiny_decoder(codec.codebook_size, codebook_fingerprint=codebook_fingerprint(codec.codebook_vectors(1)[0]))
    codec.add_speech_decoder(decoder)
    codec.save_pretrained(tmp_path / "codec")
    assert (tmp_path / "codec" / SPEECH_DECODER_FOLDER / "model.safetensors").is_file()
    loaded = load_codec(tmp_path / "codec")
    assert loaded.speech_decoder.speak("the cat sat") == decoder.speak("the cat sat")

    other = unit_codec(kind, make_speech, seed=1)  # another codebook: the units mean other sounds
    with pytest.raises(ValueError, match="trained on another codebook"):
        other.add_speech_decoder(decoder)
    with pytest.raises(ValueError, match="a speech decoder for 32 units does not fit this codec .64 codes"):
        codec.add_speech_decoder(tiny_decoder(32))
    loaded.fill_codebooks([make_speech(2.0, seed=9)], seed=3)  # refilled: its decoder no longer fits
    assert loaded.speech_decoder is None


def test_a_codec_folder_with_a_broken_speech_decoder_names_it(make_speech, tmp_path):
    codec = unit_codec("whisper-units", make_speech)
    codec.add_speech_decoder(tiny_decoder(codec.codebook_size))
    codec.save_pretrained(tmp_path / "codec")
    (tmp_path / "codec" / SPEECH_DECODER_FOLDER / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{SPEECH_DECODER_FOLDER}.*not a readable safetensors file"):
        load_codec(tmp_path / "codec")
