from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm.speech_io.codec import CodecConfig, SpeechTokenizerCodec
from speechlm.speech_io.config_errors import ConfigError

from_config = SpeechTokenizerCodec.from_config


def test_facts(narrow_codec):
    assert (narrow_codec.sample_rate, narrow_codec.frame_rate, narrow_codec.hop_length) == (16000, 50, 320)
    assert (narrow_codec.codebook_size, narrow_codec.n_q) == (64, 2)
    assert not narrow_codec.model.training


def test_encode_shapes_and_distinct_codes(narrow_codec, clips):
    codes = narrow_codec.encode(clips)
    assert [c.shape for c in codes] == [(2, -(-c.size // 320)) for c in clips]
    assert all(c.dtype == np.int64 for c in codes)
    assert len(np.unique(np.concatenate([c[0] for c in codes]))) > 5  # filled codebooks discriminate
    assert [c.shape for c in narrow_codec.encode(clips[:2], n_q=1)] == [(1, 25), (1, 11)]


def test_batching_is_exact(narrow_codec, clips):
    alone = narrow_codec.encode([clips[0]])[0], *(narrow_codec.encode([c])[0] for c in clips[1:])
    for batch_size in (2, 4, 6):
        batched = narrow_codec.encode(clips, batch_size=batch_size)
        assert all(torch.equal(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(alone, batched, strict=True))
    # Stronger than codes: the latents themselves are bit-identical.
    single = [narrow_codec._latents([c], batch_size=1)[0] for c in clips]
    batched = narrow_codec._latents(clips, batch_size=6)
    assert all(torch.equal(a, b) for a, b in zip(single, batched, strict=True))


def test_decode_shapes_and_batch(narrow_codec, clips):
    codes = narrow_codec.encode(clips)
    wav = narrow_codec.decode(codes[2])
    assert wav.dtype == np.float32 and wav.shape == (codes[2].shape[1] * 320,)
    assert narrow_codec.decode(codes[2][0]).shape == wav.shape  # layer 1 only
    assert narrow_codec.decode(codes[2][:1]).shape == wav.shape
    batch = narrow_codec.decode_batch([c for c in codes])
    assert all(np.array_equal(narrow_codec.decode(c), b) for c, b in zip(codes, batch, strict=True))


def test_unit_errors(narrow_codec):
    with pytest.raises(ValueError, match=r"unit 64 at layer 0, frame 1 is outside the codebook \[0, 64\)"):
        narrow_codec.decode(np.array([3, 64, 2]))
    with pytest.raises(ValueError, match=r"unit -1"):
        narrow_codec.decode(np.array([[3, 1], [0, -1]]))
    with pytest.raises(ValueError, match=r"shape \(3, 4\): 3 layers, but the codec has 2"):
        narrow_codec.decode(np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match=r"shape \(1, 2, 3\); expected"):
        narrow_codec.decode(np.zeros((1, 2, 3), np.int64))
    with pytest.raises(ValueError, match="dtype float64; expected integer units"):
        narrow_codec.decode(np.zeros(4))
    with pytest.raises(ValueError, match=r"n_q=3; this codec has 2 RVQ layers"):
        narrow_codec.encode([np.zeros(800, np.float32)], n_q=3)
    with pytest.raises(ValueError, match=r"waveform 0 has shape \(2, 800\)"):
        narrow_codec.encode([np.zeros((2, 800), np.float32)])


def test_empty_codebooks_are_refused():
    codec = from_config(CodecConfig(n_filters=4, dimension=8, semantic_dimension=8, codebook_size=4, n_q=1,
                                    lstm_layers=1), seed=0)
    with pytest.raises(ValueError, match="codebooks are empty.*fill_codebooks"):
        codec.encode([np.zeros(800, np.float32)])
    codec.fill_codebooks(None, seed=3)
    assert codec.codebooks_filled
    other = from_config(codec.config, seed=0)
    other.fill_codebooks(None, seed=3)
    assert torch.equal(codec.model.quantizer.vq.layers[0]._codebook.embed,
                       other.model.quantizer.vq.layers[0]._codebook.embed)


def test_save_load_round_trip(narrow_codec, clips, tmp_path):
    narrow_codec.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SpeechTokenizer.pt", "config.json"]
    loaded = SpeechTokenizerCodec.from_pretrained(tmp_path)
    assert loaded.config == narrow_codec.config
    for a, b in zip(narrow_codec.encode(clips), loaded.encode(clips), strict=True):
        assert np.array_equal(a, b)
    again = SpeechTokenizerCodec.from_pretrained(tmp_path / "config.json", checkpoint=tmp_path / "SpeechTokenizer.pt")
    assert np.array_equal(again.decode(np.arange(5)), narrow_codec.decode(np.arange(5)))


def test_load_errors(narrow_codec, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such codec directory"):
        SpeechTokenizerCodec.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    narrow_codec.save_pretrained(tmp_path)
    (tmp_path / "SpeechTokenizer.pt").rename(tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    with pytest.raises(ValueError, match=r"several \.pt files \(a\.pt, b\.pt\); pass checkpoint="):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    (tmp_path / "b.pt").unlink()
    assert SpeechTokenizerCodec.from_pretrained(tmp_path).n_q == 2  # the only .pt is unambiguous
    (tmp_path / "a.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \.pt state dict found"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    narrow_codec.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_q"}))
    with pytest.raises(ValueError, match=r"config\.json: missing SpeechTokenizer config keys \['n_q'\]"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_q": 3, "learning_rate": 1e-4}))
    with pytest.raises(ValueError, match=r"SpeechTokenizer\.pt: state dict does not match .*4 missing keys \(first: \[.quantizer\.vq\.layers\.2\."):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "dimension": 16}))
    with pytest.raises(ValueError, match=r"shape mismatches, checkpoint vs config"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not a readable JSON config"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "SpeechTokenizer.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"SpeechTokenizer\.pt: not a loadable torch state dict"):
        SpeechTokenizerCodec.from_pretrained(tmp_path)


def test_config_validation_names_fields():
    with pytest.raises(ConfigError) as error:
        CodecConfig(n_q=0, activation="ReLU", sample_rate=24000)
    assert [problem.split(" ")[0] for problem in error.value.problems] == ["n_q=0", "activation='ReLU'", "sample_rate=24000"]
    assert str(error.value).startswith("invalid SpeechTokenizer codec config:\n  - n_q=0 (expected a positive integer)")
    with pytest.raises(ValueError, match=r"strides=\[8, 0\]"):
        CodecConfig(strides=[8, 0])


def _snr(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference - estimate) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(reference**2) / noise)


@pytest.mark.parametrize("chunk", [1, 4, 10])
def test_stream_matches_whole_decode(narrow_codec, clips, chunk):
    units = narrow_codec.encode([clips[2]])[0]  # 52 frames, both layers
    whole = narrow_codec.decode(units)
    chunks = list(narrow_codec.decode_stream((units[:, i:i + 1] for i in range(units.shape[1])), chunk=chunk))
    assert all(len(c) == chunk * 320 for c in chunks[:-1])
    stream = np.concatenate(chunks)
    assert stream.shape == whole.shape
    assert _snr(whole, stream) > 60


def test_stream_yields_before_the_units_end(narrow_codec):
    consumed = []

    def generating():
        for step in range(40):
            consumed.append(step)
            yield step % narrow_codec.codebook_size

    stream = narrow_codec.decode_stream(generating(), chunk=5)
    first = next(stream)
    assert len(first) == 5 * 320
    assert len(consumed) == 5 + narrow_codec.stream_lookahead < 40
    rest = list(stream)
    whole = narrow_codec.decode(np.arange(40) % 64)
    assert _snr(whole, np.concatenate([first, *rest])) > 60


def test_stream_errors(narrow_codec):
    with pytest.raises(ValueError, match="streamed units item 1 has 2 layers but the stream began with 1"):
        list(narrow_codec.decode_stream([np.array([1, 2]), np.zeros((2, 3), np.int64)]))
    with pytest.raises(ValueError, match="streamed units item 0: unit 99"):
        list(narrow_codec.decode_stream([99]))
    with pytest.raises(ValueError, match="chunk=0"):
        narrow_codec.decode_stream([1], chunk=0)
